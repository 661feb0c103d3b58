"""The trainable state on the wire: ArrayRecord conversion and validation of client updates.

Only the trainable tensors travel (fp32: Flower's ArrayRecord rejects bfloat16). Before the
server aggregates a reply it checks it against the global state: the same keys, shapes and dtypes,
every value finite, and optionally an update norm ||w_client - w_global|| below a bound. A reply
that fails is rejected with a short reason that is logged, recorded and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """A trainable state (fp32 CPU tensors) as a Flower ArrayRecord, keys in order."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().to("cpu", torch.float32).numpy())) for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def record_nbytes(record: ArrayRecord) -> int:
    return int(sum(len(a.data) for a in record.values()))


@dataclass(frozen=True)
class Rejection:
    reason: str  # short machine label: keys | shape | dtype | non-finite | norm | format
    detail: str


def update_norm(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum((update[k].astype(np.float64) - reference[k].astype(np.float64)) ** 2)) for k in reference))


def validate_update(record: ArrayRecord, reference: dict[str, np.ndarray], max_norm: float = 0.0) -> Rejection | None:
    """Check one client's ArrayRecord against the global state; None if it may be aggregated."""
    keys = list(record.keys())
    missing = [k for k in reference if k not in record]
    extra = [k for k in keys if k not in reference]
    if missing or extra:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        return Rejection("keys", f"{what} ({len(missing)} missing, {len(extra)} extra keys)")
    arrays: dict[str, np.ndarray] = {}
    for k, ref in reference.items():
        try:
            arr = record[k].numpy()
        except Exception as err:  # undecodable payload
            return Rejection("format", f"{k!r}: {err}")
        if arr.shape != ref.shape:
            return Rejection("shape", f"{k!r} has shape {arr.shape}, expected {ref.shape}")
        if arr.dtype != ref.dtype:
            return Rejection("dtype", f"{k!r} has dtype {arr.dtype}, expected {ref.dtype}")
        if not np.isfinite(arr).all():
            return Rejection("non-finite", f"{k!r} has {int((~np.isfinite(arr)).sum())} non-finite values")
        arrays[k] = arr
    if max_norm > 0:
        norm = update_norm(arrays, reference)
        if not math.isfinite(norm) or norm > max_norm:
            return Rejection("norm", f"update norm {norm:.4g} exceeds fl.max_update_norm={max_norm:g}")
    return None
