"""Which SuperNodes take part, and as what: partition, domain, role (seen/unseen), classes.

The server never sees data; it asks each new node once (a ``query`` message with action
``info``) and keeps the answer. Nodes are ordered by partition id, so that seeded client sampling
picks the same partitions in every run, whatever node ids the SuperLink hands out. Held-out
(unseen) nodes are never offered to the training sampler and are always evaluated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict

log = logging.getLogger("flwr.fedcal")


class FederationError(RuntimeError):
    """The federation cannot run as configured; ``str(err)`` is one line that says why."""


def reply_source(msg: Message, sent: list[Message]) -> int:
    """The node a reply is about. Error replies the SuperLink itself generates (e.g. "node
    unavailable" after missed heartbeats) come from the SuperLink's own id; map them back to the
    destination of the message they answer (the Grid sets message ids when it pushes)."""
    node = msg.metadata.src_node_id
    if any(m.metadata.dst_node_id == node for m in sent):
        return node
    for m in sent:
        if m.metadata.message_id and m.metadata.message_id == msg.metadata.reply_to_message_id:
            return m.metadata.dst_node_id
    return node


@dataclass
class NodeInfo:
    node_id: int
    partition_id: int
    num_partitions: int
    domain: str
    role: str
    class_names: list[str]
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"p{self.partition_id}:{self.domain}"


class NodeRegistry:
    def __init__(self, info_timeout: float = 600.0):
        self.info: dict[int, NodeInfo] = {}
        self.failed: dict[int, str] = {}
        self.info_timeout = info_timeout

    # ------------------------------------------------------------------ discovery
    def wait_for_nodes(self, grid, minimum: int, timeout: float, poll: float = 1.0) -> list[int]:
        """Wait (bounded) until ``minimum`` nodes are connected; FederationError on timeout."""
        deadline = time.monotonic() + timeout
        last_log = 0.0
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= minimum:
                return nodes
            if time.monotonic() > deadline:
                raise FederationError(
                    f"only {len(nodes)} of fl.min_available_nodes={minimum} SuperNodes connected within "
                    f"fl.node_wait_timeout={timeout:g}s: start more SuperNodes (simulation: --federation-config "
                    f"'num-supernodes={minimum}') or lower fl.min_available_nodes"
                )
            if time.monotonic() - last_log > 10:
                log.info("waiting for SuperNodes: %d connected, %d needed", len(nodes), minimum)
                last_log = time.monotonic()
            time.sleep(poll)

    def discover(self, grid, ledger=None, rnd: int = 0, node_ids: Iterable[int] | None = None) -> list[NodeInfo]:
        """Ask every node not yet known for its identity; returns the newly accepted ones.

        A node whose identity is malformed or conflicts with the registered ones (a partition id
        taken, another number of partitions, other class names) is rejected and never asked again;
        a node that answers with an error has failed to join. Neither ends the federation. Each
        outcome goes to the ``ledger`` when one is given.
        """
        ids = sorted(grid.get_node_ids()) if node_ids is None else sorted(node_ids)
        new = [n for n in ids if n not in self.info and n not in self.failed]
        if not new:
            return []
        messages = [Message(RecordDict({"config": ConfigRecord({"action": "info"})}), dst_node_id=n, message_type="query") for n in new]
        replies = list(grid.send_and_receive(messages, timeout=self.info_timeout))
        candidates = self._screen_identities(replies, messages, new, ledger, rnd)
        added = self._accept(candidates, ledger, rnd)
        for node in set(new) - set(candidates) - set(self.failed):
            log.warning("node %d did not answer the info query within %.0fs; it will be asked again", node, self.info_timeout)
        for info in sorted(added, key=lambda i: i.partition_id):
            log.info("node %d: partition %d/%d, domain %s, %s, train/val/test %d/%d/%d", info.node_id, info.partition_id,
                     info.num_partitions, info.domain, info.role, info.sizes["train"], info.sizes["val"], info.sizes["test"])
        return added

    def _screen_identities(self, replies, messages, new, ledger, rnd: int) -> dict[int, dict]:
        """The well-formed identities among the replies (one per asked node); the rest refused."""
        from .validation import Rejection, check_identity

        candidates: dict[int, dict] = {}
        for msg in replies:
            node = reply_source(msg, messages)
            if node not in new or node in candidates or node in self.failed:
                continue
            if msg.has_error():
                self._refuse(ledger, rnd, node, "failed", msg.error.reason, None)
                continue
            try:
                candidates[node] = check_identity(msg)
            except Rejection as rej:
                self._refuse(ledger, rnd, node, "rejected", rej.reason, rej.detail)
        return candidates

    def _accept(self, candidates: dict[int, dict], ledger, rnd: int) -> list[NodeInfo]:
        """Register the identities that agree with the federation; refuse the conflicting ones."""
        added = []
        reference = self._reference_classes(candidates.values())
        for node in sorted(candidates):
            fields = candidates[node]
            why = self._conflict(fields, reference)
            if why:
                self._refuse(ledger, rnd, node, "rejected", "identity", why)
                continue
            info = NodeInfo(node, **fields)
            self.info[node] = info
            added.append(info)
            if ledger is not None:
                ledger.note("joined", rnd, "join", self.ident(node), fields={"sizes": info.sizes})
        return added

    def _refuse(self, ledger, rnd: int, node: int, outcome: str, reason: str | None, detail: str) -> None:
        self.failed[node] = f"{reason}: {detail}" if detail else str(reason)
        if ledger is not None:
            ledger.note(outcome, rnd, "join", self.ident(node), reason=reason, detail=detail)
        else:
            log.error("node %d cannot join: %s", node, self.failed[node])

    def _reference_classes(self, candidates) -> list[str] | None:
        """The federation's class names: the registered ones, else the most common among newcomers."""
        if self.info:
            return next(iter(self.info.values())).class_names
        names = [tuple(c["class_names"]) for c in candidates]
        return list(max(set(names), key=lambda n: (names.count(n), n))) if names else None

    def _conflict(self, fields: dict, reference: list[str] | None) -> str | None:
        for other in self.info.values():
            if other.partition_id == fields["partition_id"]:
                return f"partition {fields['partition_id']} is already held by node {other.node_id}: give every SuperNode its own partition-id"
            if other.num_partitions != fields["num_partitions"]:
                return f"num-partitions={fields['num_partitions']}, the federation has {other.num_partitions}"
        if reference is not None and fields["class_names"] != reference:
            return f"classes {fields['class_names'][:3]}... differ from the federation's {reference[:3]}...: every client must read the same dataset"
        return None

    # ------------------------------------------------------------------ views
    def ident(self, node: int | None) -> dict:
        """The identity a record row carries: always the registry's, never a reply's (None if unknown)."""
        info = self.info.get(node) if node is not None else None
        return {"node_id": node, "partition": info.partition_id if info else None, "domain": info.domain if info else None,
                "role": info.role if info else None}

    def _ordered(self, ids: Iterable[int]) -> list[int]:
        return sorted((n for n in ids if n in self.info), key=lambda n: self.info[n].partition_id)

    def seen(self, connected: Iterable[int]) -> list[int]:
        return [n for n in self._ordered(connected) if self.info[n].role == "seen"]

    def unseen(self, connected: Iterable[int]) -> list[int]:
        return [n for n in self._ordered(connected) if self.info[n].role == "unseen"]

    def class_names(self) -> list[str]:
        if not self.info:
            raise FederationError("no SuperNode answered the info query; see the node errors above")
        return next(iter(self.info.values())).class_names

    def num_seen(self) -> int:
        return sum(1 for i in self.info.values() if i.role == "seen")


class GridView:
    """A Grid restricted to some nodes (ordered by partition): Flower's samplers see only these.

    ``get_node_ids`` gives the currently connected allowed nodes. Flower's sampler waits, without a
    bound, for enough nodes; this view turns a wait longer than ``timeout`` into a FederationError.
    """

    def __init__(self, grid, allowed: Iterable[int], minimum: int, timeout: float):
        self._grid = grid
        self._allowed = list(allowed)
        self._minimum = minimum
        self._timeout = timeout
        self._since: float | None = None

    def get_node_ids(self) -> list[int]:
        connected = set(self._grid.get_node_ids())
        ids = [n for n in self._allowed if n in connected]
        if len(ids) < self._minimum:
            self._since = self._since or time.monotonic()
            if time.monotonic() - self._since > self._timeout:
                raise FederationError(
                    f"only {len(ids)} eligible SuperNodes connected, {self._minimum} needed this round "
                    f"(waited {self._timeout:g}s): restart the missing SuperNodes or lower fl.min_train_nodes"
                )
        else:
            self._since = None
        return ids

    def __getattr__(self, name):
        return getattr(self._grid, name)
