"""The trainable state on the wire: ArrayRecord conversion, sizes and the update norm.

Only the trainable tensors travel (fp32: Flower's ArrayRecord rejects bfloat16). What the server
accepts of a reply is decided in one place, server/validation.py.
"""

from __future__ import annotations

import math

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


def update_norm(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum((update[k].astype(np.float64) - reference[k].astype(np.float64)) ** 2)) for k in reference))
