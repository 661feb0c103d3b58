"""Checkpoints: the global trainable state and the strategy's own state, after every round.

``checkpoints/round-000k/`` holds ``global.safetensors`` (the trainable tensors),
``strategy.safetensors`` (server optimizer moments, FedAvgM momentum, FedDyn h, ...) and
``state.json`` (round, best round, counters). A checkpoint is written into a temporary folder and
renamed into place; only then does ``checkpoints/LATEST`` (itself replaced atomically) point at it,
so a crash at any moment leaves the previous checkpoint intact. ``state.json`` carries the
SHA-256 of both tensor files, checked on load: a truncated, garbled or bit-flipped checkpoint is a
one-line error naming the file, never a silently different state. ``final/`` holds the state after
the last round together with the fitted global temperature.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np

from common.config import ConfigError

from .records import atomic_text


@dataclass
class Checkpoint:
    round: int
    global_state: dict[str, torch.Tensor]
    strategy_arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


TENSOR_FILES = ("global.safetensors", "strategy.safetensors")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _save_dir(folder: Path, global_state: dict[str, torch.Tensor], strategy_arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_np({k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in global_state.items()}, str(tmp / "global.safetensors"))
    save_np({k: np.ascontiguousarray(v) for k, v in strategy_arrays.items()} or {"__empty__": np.zeros(0)}, str(tmp / "strategy.safetensors"))
    sums = {name: _sha256(tmp / name) for name in TENSOR_FILES}
    (tmp / "state.json").write_text(json.dumps({**meta, "sha256": sums}, indent=2, sort_keys=True, default=str))
    for name in (*TENSOR_FILES, "state.json"):
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def save(run_dir: Path, server_round: int, global_state: dict[str, torch.Tensor], strategy_arrays: dict[str, np.ndarray], meta: dict[str, Any], keep_rounds: bool = False) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"round-{server_round:05d}"
    _save_dir(folder, global_state, strategy_arrays, {**meta, "round": server_round})
    previous = (root / "LATEST").read_text().strip() if (root / "LATEST").exists() else ""
    atomic_text(root / "LATEST", folder.name)
    if previous and previous != folder.name and not keep_rounds:
        shutil.rmtree(root / previous, ignore_errors=True)
    return folder


def save_final(run_dir: Path, server_round: int, global_state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """The final global state (after ``server_round``) with the fitted temperature: what a user deploys."""
    folder = Path(run_dir) / "final"
    _save_dir(folder, global_state, {}, {**meta, "round": server_round})
    return folder


def latest(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "LATEST"
    if not pointer.exists():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if (folder / "state.json").exists() else None


def load(folder: Path) -> Checkpoint:
    """A verified checkpoint; any damage is a ConfigError naming the file."""
    fix = "resume from an intact run folder, or delete checkpoints/LATEST's target and resume from the round before"
    try:
        meta = json.loads((folder / "state.json").read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("round"), int):
            raise ValueError("no round number")
    except (OSError, ValueError) as err:
        raise ConfigError(f"checkpoint file {folder / 'state.json'} is unreadable ({err}); {fix}") from None
    sums = meta.get("sha256")
    if not isinstance(sums, dict) or set(sums) != set(TENSOR_FILES):
        raise ConfigError(f"checkpoint file {folder / 'state.json'} carries no checksums of {', '.join(TENSOR_FILES)}; {fix}")
    for name, digest in sums.items():
        try:
            ok = _sha256(folder / name) == digest
        except OSError as err:
            raise ConfigError(f"checkpoint file {folder / name} is unreadable ({err.strerror}); {fix}") from None
        if not ok:
            raise ConfigError(f"checkpoint file {folder / name} does not match its checksum (truncated or corrupted); {fix}")
    try:
        arrays = load_np(str(folder / "global.safetensors"))
        strategy_arrays = {k: v for k, v in load_np(str(folder / "strategy.safetensors")).items() if k != "__empty__"}
    except Exception as err:  # safetensors raises its own error types for garbled files
        raise ConfigError(f"checkpoint {folder} is unreadable ({type(err).__name__}: {err}); {fix}") from None
    return Checkpoint(int(meta["round"]), {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, strategy_arrays, meta)
