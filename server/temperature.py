"""Federated temperature scaling: one temperature for all clients, without seeing data or logits.

Each seen client computes, on its own ``eval.ts_split`` (validation by default), the SUM of its
negative log-likelihood at every candidate temperature (``nll-grid`` query) and sends those sums.
The server adds them, which gives the NLL of the pooled data at every candidate, and picks the
minimiser: the same temperature that centralised temperature scaling would fit on the pooled
validation set, up to the grid resolution (61 log-spaced values in 0.25..4, ~4.7% apart).
Held-out clients send nothing here and are evaluated with the global temperature.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from common.calibration import default_temperature_grid

from .nodes import reply_source

log = logging.getLogger("flwr.fedcal")


@dataclass
class GlobalTemperature:
    temperature: float
    nll_at_one: float | None  # mean NLL before scaling (T = 1), pooled over the clients
    nll_at_t: float | None  # mean NLL at the chosen temperature
    examples: int
    clients: int
    at_edge: bool
    errors: dict[int, str] = field(default_factory=dict)


def choose(grid: list[float], sums: np.ndarray, examples: int) -> tuple[float, float | None, float | None, bool]:
    """Argmin of the summed NLL over the grid; (T, mean NLL at T=1, mean NLL at T, T on an edge)."""
    if examples == 0:
        return 1.0, None, None, False
    i = int(np.argmin(sums))
    one = grid.index(1.0) if 1.0 in grid else None
    return float(grid[i]), (float(sums[one]) / examples if one is not None else None), float(sums[i]) / examples, i in (0, len(grid) - 1)


def fit_global_temperature(grid_api, node_ids: list[int], arrays: ArrayRecord, timeout: float, grid_size: int = 61, *,
                           registry, ledger=None, rnd: int = 0, ts_split: str = "val") -> GlobalTemperature:
    """Ask ``node_ids`` for their NLL sums over the grid and pick the pooled minimiser.

    Every reply passes server/validation.py first (grid length, finite non-negative sums, the
    declared number of examples); an invalid or failed reply is left out and goes to the ledger.
    """
    from .validation import Rejection, check_nll_grid, screen

    temps = default_temperature_grid(grid_size)
    messages = [
        Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"action": "nll-grid", "temperatures": temps})}), dst_node_id=n, message_type="query")
        for n in node_ids
    ]
    accepted: dict[int, tuple[np.ndarray, int]] = {}
    errors: dict[int, str] = {}
    answered: set[int] = set()
    for msg in grid_api.send_and_receive(messages, timeout=timeout):
        node = reply_source(msg, messages)
        ident = registry.ident(node)
        verdict = screen(msg, node, set(node_ids), answered)
        if verdict:
            errors[node] = verdict[1]
            _note(ledger, verdict[0], rnd, ident, verdict[1], verdict[2])
            continue
        try:
            sums, n = check_nll_grid(msg, registry.info[node], len(temps), ts_split)
        except Rejection as rej:
            errors[node] = f"{rej.reason}: {rej.detail}"
            _note(ledger, "rejected", rnd, ident, rej.reason, rej.detail)
            continue
        accepted[node] = (sums, n)
    for node in sorted(set(node_ids) - answered):
        errors[node] = "no reply"
        _note(ledger, "missing", rnd, registry.ident(node), None, None)
    # summed in partition order: the result does not depend on the order replies arrived in
    order = sorted(accepted, key=lambda n: (registry.info[n].partition_id, n))  # every accepted node is registered
    total = np.zeros(len(temps))
    for node in order:
        total += accepted[node][0]
    examples, clients = sum(accepted[n][1] for n in order), len(order)
    t, before, after, edge = choose(temps, total, examples)
    if edge:
        log.warning("federated temperature %.3g lies on the edge of the candidate grid [%.3g, %.3g]", t, temps[0], temps[-1])
    return GlobalTemperature(t, before, after, examples, clients, edge, errors)


def _note(ledger, outcome: str, rnd: int, ident: dict, reason: str | None, detail: str | None) -> None:
    if ledger is not None:
        ledger.note(outcome, rnd, "nll-grid", ident, reason=reason, detail=detail)
