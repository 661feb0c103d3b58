"""The trainable state on the wire: one contiguous array per dtype, described by a manifest.

A trainable state is a flat ``dict[str, Tensor]`` (144 tensors for FL²oRA's LoRA). Sent tensor by
tensor, Flower ships one object per tensor, each with its own id, header and request. fedcal sends
instead one flat array per dtype (all fp32 today: Flower's ArrayRecord rejects bfloat16) under the
key ``packed-<dtype>-<digest>``, where ``<digest>`` is the hash of the :class:`Manifest` (every
key, shape and dtype, sorted by key). Both sides derive the manifest from their own trainable tensors
and check the digest in the key before they use a byte: a node built with another model or method
configuration is refused in one line, not silently mis-sliced. The server decodes each reply once
(server/validation.py decides what it accepts). Flower's aggregators work element-wise (or on
whole-vector distances), so they aggregate the packed vector exactly as they would the tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

PACKED_PREFIX = "packed-"


class ManifestError(ValueError):
    """Arrays that do not match the manifest both sides agreed on; ``str(err)`` is one line."""


@dataclass(frozen=True)
class Manifest:
    """Keys, shapes and dtypes of a trainable state, in order; the wire layout derives from it."""

    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    @classmethod
    def of(cls, tensors: Iterable[tuple[str, torch.Tensor | np.ndarray]]) -> Manifest:
        """From (name, tensor) pairs; only shapes are read (no copy). Every tensor travels as fp32.
        Entries are sorted by name: the layout does not depend on the order a dict or a checkpoint
        file happens to list the tensors in (a resumed server reads them back sorted)."""
        return cls(tuple(sorted((k, tuple(int(d) for d in v.shape), "float32") for k, v in tensors)))

    @cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @cached_property
    def groups(self) -> dict[str, list[tuple[str, tuple[int, ...], int]]]:
        """Per dtype: (key, shape, numel) in order."""
        out: dict[str, list[tuple[str, tuple[int, ...], int]]] = {}
        for k, s, d in self.entries:
            out.setdefault(d, []).append((k, s, math.prod(s)))
        return out

    def array_key(self, dtype: str) -> str:
        return f"{PACKED_PREFIX}{dtype}-{self.digest}"

    def array_keys(self) -> dict[str, str]:
        """Wire key -> dtype."""
        return {self.array_key(d): d for d in self.groups}

    def numel(self, dtype: str) -> int:
        return sum(n for _, _, n in self.groups[dtype])

    @property
    def keys(self) -> list[str]:
        return [k for k, _, _ in self.entries]

    def describe_difference(self, other: Manifest) -> str:
        """The first entry where two manifests differ, for a one-line error."""
        for a, b in zip(self.entries, other.entries, strict=False):
            if a != b:
                return f"{a[0]!r} {a[1]} here vs {b[0]!r} {b[1]} there"
        return f"{len(self.entries)} tensors here vs {len(other.entries)} there"

    def to_json(self) -> str:
        return json.dumps([[k, list(s), d] for k, s, d in self.entries], separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        return cls(tuple((str(k), tuple(int(x) for x in s), str(d)) for k, s, d in json.loads(text)))


def pack_arrays(state: dict[str, torch.Tensor], manifest: Manifest | None = None) -> dict[str, np.ndarray]:
    """The state as one flat numpy array per dtype, keyed as on the wire (``manifest`` defaults to the state's own)."""
    manifest = manifest or Manifest.of(state.items())
    out = {}
    for dtype, group in manifest.groups.items():
        flat = np.empty(manifest.numel(dtype), dtype=np.dtype(dtype))
        pos = 0
        for key, shape, n in group:
            value = state[key]
            if tuple(value.shape) != shape:
                raise ManifestError(f"tensor {key!r} has shape {tuple(value.shape)}, the manifest says {shape}")
            flat[pos : pos + n] = value.detach().to("cpu", torch.float32).reshape(-1).numpy()
            pos += n
        out[manifest.array_key(dtype)] = flat
    return out


def pack(state: dict[str, torch.Tensor], manifest: Manifest | None = None) -> ArrayRecord:
    """The state as a Flower ArrayRecord of one flat array per dtype."""
    return ArrayRecord({k: Array(v) for k, v in pack_arrays(state, manifest).items()})


def _check_keys(got: list[str], manifest: Manifest) -> None:
    expected = manifest.array_keys()
    if set(got) != set(expected):
        theirs = next((k for k in got if k.startswith(PACKED_PREFIX)), None)
        if theirs and theirs not in expected:
            raise ManifestError(f"the arrays were packed for another manifest ({theirs}, expected {next(iter(expected))}): "
                                "both sides must build the same model and method (model.*, method.*)")
        raise ManifestError(f"arrays {sorted(got)} do not match the manifest's {sorted(expected)}")


def _check_array(key: str, arr: np.ndarray, dtype: str, manifest: Manifest) -> np.ndarray:
    if arr.dtype != np.dtype(dtype) or arr.shape != (manifest.numel(dtype),):
        raise ManifestError(f"{key!r} is a {arr.dtype} array of shape {arr.shape}, the manifest says {dtype} ({manifest.numel(dtype)},)")
    return arr


def check_flat(arrays: dict[str, np.ndarray], manifest: Manifest) -> dict[str, np.ndarray]:
    """Already decoded packed arrays (wire key -> vector), checked against ``manifest``; dtype -> vector."""
    _check_keys(list(arrays), manifest)
    return {dtype: _check_array(key, arrays[key], dtype, manifest) for key, dtype in manifest.array_keys().items()}


def flat_arrays(record: ArrayRecord, manifest: Manifest) -> dict[str, np.ndarray]:
    """The decoded flat arrays (dtype -> vector) of a packed record, checked against ``manifest``
    (the keys before any array is decoded)."""
    _check_keys(list(record.keys()), manifest)
    return {dtype: _check_array(key, record[key].numpy(), dtype, manifest) for key, dtype in manifest.array_keys().items()}


def unflatten(flats: dict[str, np.ndarray], manifest: Manifest) -> dict[str, torch.Tensor]:
    """Tensors (fp32 CPU, owning their memory) from decoded flat arrays, in manifest order."""
    pieces: dict[str, torch.Tensor] = {}
    for dtype, group in manifest.groups.items():
        flat = torch.from_numpy(np.array(flats[dtype], copy=True))
        pos = 0
        for key, shape, n in group:
            pieces[key] = flat[pos : pos + n].view(shape)
            pos += n
    return {k: pieces[k] for k in manifest.keys}


def unpack(record: ArrayRecord, manifest: Manifest) -> dict[str, torch.Tensor]:
    return unflatten(flat_arrays(record, manifest), manifest)


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """Tensor by tensor (kept for what stays on one machine: a client's persisted context.state)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().to("cpu", torch.float32).numpy())) for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def record_nbytes(record: ArrayRecord) -> int:
    return int(sum(len(a.data) for a in record.values()))


def update_norm(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum((update[k].astype(np.float64) - reference[k].astype(np.float64)) ** 2)) for k in reference))
