"""Shared fixtures: the real PACS subset, tiny CLIPs, an isolated HOME for caches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACS = Path(os.environ.get("FEDCAL_TEST_DATA", ROOT.parent / "shared" / "data" / "pacs-mini")).resolve()
CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def pacs_dir() -> Path:
    if not (PACS / "photo" / "dog").is_dir():
        pytest.fail(f"test data missing: {PACS} (set FEDCAL_TEST_DATA to the pacs-mini folder)")
    return PACS


@pytest.fixture()
def tiny_cfg(pacs_dir):
    """A RunConfig for the tiny CLIP on pacs-mini."""
    from common import config

    def make(**overrides):
        base = {
            "model__name": "fedcal-tiny",
            "model__pretrained": "",
            "data__path": str(pacs_dir),
            "data__partitioner": "domain",
        }
        base.update(overrides)
        return config.load(None, **base)

    return make


@pytest.fixture()
def tiny_clip():
    from common.model import load_clip

    def make(name: str = "fedcal-tiny", seed: int = 0):
        torch.manual_seed(seed)
        return load_clip(name, None)

    return make
