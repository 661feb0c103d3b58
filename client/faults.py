"""TEST ONLY: fault injection (``fault.mode`` / ``fault.partitions`` or ``fault.plan``).

A misbehaving client forges one thing in an otherwise honest reply, so that tests with real
Flower processes can check that the server rejects exactly that reply, with its reason, and that
the run goes on. Nothing here runs unless a test configures it.

Training replies: ``nan``, ``shape``, ``extra-key``, ``huge`` (the update), ``crash`` (an error
reply), ``weight`` (num-examples 1e9), ``negative-weight``, ``extra-metric`` (a metric named like a
record field), ``missing-metric``, ``stale-round``, ``nan-metric``.
Evaluate replies: ``forged-calibration`` (confidence sums above the counts), ``other-bins``,
``negative-counts``, ``relabel`` (the reply's identity claims another partition, domain and role).
NLL-grid replies: ``negative-nll`` (negative sums, a negative example count).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from common.config import RunConfig

log = logging.getLogger("fedcal.client")
TRAIN_STATE = {"nan", "huge", "crash"}
TRAIN_RECORD = {"shape", "extra-key"}


def corrupt_state(cfg: RunConfig, partition_id: int, state: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn this client's honest update into a bad one (modes that touch the arrays)."""
    mode = cfg.fault.mode_for(partition_id)
    if mode not in TRAIN_STATE:
        return state
    key = next(iter(state))
    bad = dict(state)
    if mode == "nan":
        bad[key] = state[key].clone().fill_(float("nan"))
    elif mode == "huge":
        bad = {k: global_state[k] + cfg.fault.huge_scale * (v - global_state[k] + 1e-3) for k, v in state.items()}
    elif mode == "crash":
        raise RuntimeError("fault injection: client crashed on purpose (fault.mode=crash)")
    log.warning("fault injection: partition %d sends a %s update", partition_id, mode)
    return bad


def corrupt_arrays(cfg: RunConfig, partition_id: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Forge the packed arrays themselves: one value too many (shape), or an extra array (extra-key)."""
    mode = cfg.fault.mode_for(partition_id)
    if mode not in TRAIN_RECORD:
        return arrays
    key = next(iter(arrays))
    if mode == "shape":
        arrays = {**arrays, key: np.concatenate([arrays[key], arrays[key][:1]])}
    else:
        arrays = {**arrays, "fault.injected": np.zeros(3, dtype=np.float32)}
    log.warning("fault injection: partition %d sends a %s update", partition_id, mode)
    return arrays


def corrupt_train_metrics(cfg: RunConfig, partition_id: int, metrics: dict) -> dict:
    mode = cfg.fault.mode_for(partition_id)
    forged = {
        "weight": {"num-examples": 10**9},
        "negative-weight": {"num-examples": -5},
        "extra-metric": {"partition": 99},
        "stale-round": {"server-round": metrics["server-round"] - 1},
        "nan-metric": {"train-loss": float("nan")},
    }
    if mode == "missing-metric":
        return {k: v for k, v in metrics.items() if k != "lr"}
    return {**metrics, **forged.get(mode, {})}


def corrupt_eval_metrics(cfg: RunConfig, partition_id: int, metrics: dict) -> dict:
    mode = cfg.fault.mode_for(partition_id)
    out = dict(metrics)
    if mode == "forged-calibration":
        out["test-bin-conf-sum"] = [3.0 * v + 1.0 for v in metrics["test-bin-conf-sum"]]
    elif mode == "other-bins":
        out["test-n-bins"] = metrics["test-n-bins"] + 5
    elif mode == "negative-counts":
        out["test-bin-count"] = [-abs(v) - 1 for v in metrics["test-bin-count"]]
    return out


def corrupt_identity(cfg: RunConfig, partition_id: int, record: dict) -> dict:
    if cfg.fault.mode_for(partition_id) == "relabel":
        return {**record, "partition-id": 0, "domain": "forged", "role": "unseen" if record.get("role") == "seen" else "seen"}
    return record


def corrupt_nll(cfg: RunConfig, partition_id: int, sums: list[float], n: int) -> tuple[list[float], int]:
    if cfg.fault.mode_for(partition_id) == "negative-nll":
        return [-1e6 - s for s in sums], -5
    return sums, n
