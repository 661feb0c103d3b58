"""Shared helpers of the benchmarks: repo on sys.path, a tiny timing utility, a client on pacs-mini."""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

DATA = Path(os.environ.get("FEDCAL_TEST_DATA", ROOT.parent / "shared" / "data" / "pacs-mini"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of fn() over `repeat` runs after `warmup` runs (device synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def client(cfg, n: int = 256, seed: int = 0):
    """One client's data (train/test halves of n pacs-mini images) without a partitioner."""
    from common.data import ClientData, _scan_folder

    source = _scan_folder(DATA)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(source), size=min(n, len(source)), replace=False))
    half = len(rows) // 2
    return ClientData(0, 1, "all", "seen", source.class_names, source, {"train": rows[:half], "val": rows[:0], "test": rows[half:]})


def row(*cells) -> str:
    return " | ".join(str(c) for c in cells)
