"""An in-process Flower Grid for tests of the round schedule: fedcal's real ServerApp flow
(server.app.run_federation) talks to fedcal's real ClientApp functions (client.app) in this
process, one Flower Context per node, so whole runs take seconds and every phase is counted.

Only the transport is left out (the SuperLink, the SuperNodes, serialisation): what is compared
here is what the server sends, what the nodes compute and what the server records.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Message, RecordDict

from client import app as client_app
from tests.flower_helpers import set_identity


class LocalGrid:
    def __init__(self, run_config: dict, num_nodes: int, node_config: dict | None = None):
        self.contexts = {
            1000 + 17 * (num_nodes - p): Context(run_id=1, node_id=1000 + 17 * (num_nodes - p),
                                                 node_config={"partition-id": p, "num-partitions": num_nodes, **(node_config or {})},
                                                 state=RecordDict(), run_config=dict(run_config))
            for p in range(num_nodes)
        }
        self.phases: list[list[str]] = []  # per phase (one send_and_receive), the kinds of its messages

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        set_identity()
        self.phases.append(sorted(_kind(m) for m in messages))
        return [client_app.serve(_kind(m), m, self.contexts[m.metadata.dst_node_id]) for m in messages]

    def phase_kinds(self) -> list[str]:
        """Each phase as one word: train, evaluate, train+evaluate, info, nll-grid."""
        return ["+".join(sorted(set(p))) for p in self.phases]


def _kind(msg: Message) -> str:
    kind = msg.metadata.message_type
    if kind == "query":
        return str(msg.content["config"].get("action", "info"))
    return kind


def run(run_config: dict, num_nodes: int) -> tuple[dict, LocalGrid]:
    """One whole fedcal run in this process; (its summary, the grid with the phases it used)."""
    from server.app import run_federation

    set_identity()  # Flower stamps every message it builds with the run's identity
    grid = LocalGrid(run_config, num_nodes)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    return run_federation(grid, context), grid
