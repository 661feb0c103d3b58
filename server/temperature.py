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


def fit_global_temperature(grid_api, node_ids: list[int], arrays: ArrayRecord, timeout: float, grid_size: int = 61) -> GlobalTemperature:
    temps = default_temperature_grid(grid_size)
    messages = [
        Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"action": "nll-grid", "temperatures": temps})}), dst_node_id=n, message_type="query")
        for n in node_ids
    ]
    total = np.zeros(len(temps))
    examples = clients = 0
    errors: dict[int, str] = {}
    for msg in grid_api.send_and_receive(messages, timeout=timeout):
        if msg.has_error():
            errors[reply_source(msg, messages)] = msg.error.reason
            continue
        m = msg.content["metrics"]
        sums = np.asarray(m["nll-sums"], dtype=np.float64)
        if sums.shape != total.shape or not np.isfinite(sums).all():
            errors[reply_source(msg, messages)] = "malformed nll-sums"
            continue
        total += sums
        examples += int(m["num-examples"])
        clients += 1
    t, before, after, edge = choose(temps, total, examples)
    if edge:
        log.warning("federated temperature %.3g lies on the edge of the candidate grid [%.3g, %.3g]", t, temps[0], temps[-1])
    return GlobalTemperature(t, before, after, examples, clients, edge, errors)
