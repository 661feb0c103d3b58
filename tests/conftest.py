"""Shared fixtures: the real PACS subset, tiny CLIPs, a session cache folder for data.cache_dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACS = Path(os.environ.get("FEDCAL_TEST_DATA", ROOT.parent / "shared" / "data" / "pacs-mini")).resolve()
CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]
REAL_PHOTOS = (PACS / "photo" / "dog").is_dir()
NO_REAL_PHOTOS = "real PACS photos: set FEDCAL_TEST_DATA to the pacs-mini folder (CI does)"
real_photos = pytest.mark.skipif(not REAL_PHOTOS, reason=NO_REAL_PHOTOS)


def stand_in_pacs(root: Path, cache: Path) -> Path:
    """A generated folder with pacs-mini's exact layout and counts (4 domains x 7 classes x 50
    images), filled from the offline demo's digits (common/demo.py): domain i of the demo plays PACS
    domain i, digit j plays class j. Used where the real photos are not available."""
    from common.demo import CLASS_NAMES, demo_folder

    demo = demo_folder(cache)
    sources = sorted(p.name for p in demo.iterdir() if p.is_dir())
    for domain, src in zip(DOMAINS, sources, strict=True):
        for cls, digit in zip(CLASSES, CLASS_NAMES, strict=False):
            folder = root / domain / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(sorted((demo / src / digit).iterdir())[:50]):
                (folder / f"{i:03d}{img.suffix}").symlink_to(img)
    return root

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def pacs_dir(tmp_path_factory) -> Path:
    """pacs-mini's real photos where FEDCAL_TEST_DATA (or ../shared) has them, else the stand-in."""
    if REAL_PHOTOS:
        return PACS
    if os.environ.get("FEDCAL_TEST_DATA"):
        pytest.fail(f"FEDCAL_TEST_DATA={os.environ['FEDCAL_TEST_DATA']} holds no pacs-mini (no photo/dog folder)")
    base = tmp_path_factory.mktemp("stand-in")
    return stand_in_pacs(base / "pacs", base / "cache")


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """data.cache_dir for tests that do not name one: the user's ~/.cache/fedcal stays untouched."""
    return tmp_path_factory.mktemp("fedcal-cache")


@pytest.fixture()
def tiny_cfg(pacs_dir, session_cache):
    """A RunConfig for the tiny CLIP on pacs-mini."""
    from common import config

    def make(**overrides):
        base = {
            "model__name": "fedcal-tiny",
            "model__pretrained": "",
            "data__path": str(pacs_dir),
            "data__partitioner": "domain",
            "data__cache_dir": str(session_cache),
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
