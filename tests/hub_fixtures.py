"""Local stand-ins of the hub datasets fedcal reads, with exactly their schemas.

Each fixture is a folder laid out like the hub repository (``data/<split>-00000-of-00001.parquet``)
with the dataset card's features: the same column names and types (Image, ClassLabel with the
card's class count, string domains, extra columns), a few tiny generated images per split. fedcal
loads it through its real hub path (``datasets.load_dataset``) by pointing ``data.hub_id`` at
the folder. Only the class *names* are placeholders: the counts and schema are the cards'.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

# name -> (columns: {column: kind}, splits: {split: rows}, classes of the label column)
#   kinds: "image", "label", "domain", ("classlabel", n), "string"
SCHEMAS: dict[str, tuple[dict, dict, int]] = {
    "pacs": ({"image": "image", "domain": "domain", "label": "label"}, {"train": 112}, 7),
    "office-home": ({"image": "image", "label": "label", "domain": "domain"}, {"train": 1040}, 65),
    "cifar10": ({"img": "image", "label": "label"}, {"train": 80, "test": 40}, 10),
    "cifar100": ({"img": "image", "fine_label": "label", "coarse_label": ("classlabel", 20)}, {"train": 120, "test": 60}, 100),
    "food101": ({"image": "image", "label": "label"}, {"train": 120, "validation": 60}, 101),
    "dtd": ({"image": "image", "label": "label"}, {"train": 60, "test": 30}, 47),
    "caltech101": ({"image": "image", "label": "label"}, {"train": 120}, 101),
    "flowers102": ({"image": "image", "label": "label"}, {"train": 120, "test": 60}, 102),
    "oxford-pets": ({"image": "image", "label": "label", "image_id": "string", "label_cat_dog": ("classlabel", 2)}, {"train": 60, "test": 30}, 37),
    "imagenet": ({"image": "image", "label": "label"}, {"train": 40, "validation": 20}, 1000),
}
DOMAINS = {"pacs": ["art_painting", "cartoon", "photo", "sketch"], "office-home": ["Art", "Clipart", "Product", "Real World"]}


def png(seed: int, size: int = 32) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _features(columns: dict, n_classes: int):
    import datasets

    out = {}
    for col, kind in columns.items():
        if kind == "image":
            out[col] = datasets.Image()
        elif kind == "label":
            out[col] = datasets.ClassLabel(names=[f"class_{i:04d}" for i in range(n_classes)])
        elif kind in ("domain", "string"):
            out[col] = datasets.Value("string")
        else:
            out[col] = datasets.ClassLabel(names=[f"group_{i}" for i in range(kind[1])])
    return datasets.Features(out)


def _column(kind, col: str, n: int, n_classes: int, name: str, split_seed: int):
    if kind == "image":
        return [{"bytes": png(split_seed * 10_000 + i), "path": None} for i in range(n)]
    if kind == "label":  # every class of the first rows appears, then a cycle: classes are well spread
        return [(i * 7 + split_seed) % n_classes for i in range(n)]
    if kind == "domain":
        doms = DOMAINS[name]
        return [doms[i % len(doms)] for i in range(n)]
    if kind == "string":
        return [f"{col}_{split_seed}_{i}" for i in range(n)]
    return [i % kind[1] for i in range(n)]


def hub_repo(root: Path, name: str) -> Path:
    """Write the stand-in of registry dataset ``name`` under ``root``; returns the folder."""
    import datasets

    columns, splits, n_classes = SCHEMAS[name]
    repo = Path(root) / name
    if repo.is_dir():
        return repo
    (repo / "data").mkdir(parents=True)
    features = _features(columns, n_classes)
    for s_idx, (split, n) in enumerate(splits.items()):
        data = {col: _column(kind, col, n, n_classes, name, s_idx + 1) for col, kind in columns.items()}
        datasets.Dataset.from_dict(data, features=features).to_parquet(str(repo / "data" / f"{split}-00000-of-00001.parquet"))
    return repo


def image_folder(root: Path, layout: dict[str, dict[str, int]], seed: int = 0) -> Path:
    """<root>/<domain>/<class>/<i>.png with ``layout[domain][class]`` images each."""
    k = 0
    for dom, classes in layout.items():
        for cls, n in classes.items():
            folder = Path(root) / dom / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{i}.png").write_bytes(png(seed * 1_000_000 + k, size=8))
                k += 1
    return Path(root)
