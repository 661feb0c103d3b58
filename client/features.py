"""Frozen-feature cache: image embeddings computed once per client and reused across rounds.

Methods whose image tower is frozen (adapter, coop, kgcoop, linear, zeroshot, and LoRA on the
text encoder only) see the same image embedding for an image every round, as long as the image
goes through a deterministic transform. In deployment every message starts a fresh process, so
without a cache each round would re-encode the client's whole dataset.

The cache is a safetensors file per (model, weights, precision, device type, data split,
transform) under ``<data.cache_dir>/features/``; the key is a hash of all of them, so a change of
any one gives a new file. Files are written atomically (temp file + rename) and a file that does
not match the split (row count or labels) is recomputed. Embeddings are stored in the dtype the
image tower produced, so cached and uncached logits are identical.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.data import ClientData
from common.model import weights_identity

log = logging.getLogger(__name__)


def cache_key(model_name: str, pretrained: str, precision: str, device: torch.device, data: ClientData, split: str, transform: object) -> str:
    parts = [
        "v1",
        model_name,
        weights_identity(pretrained),
        precision,
        device.type,
        data.fingerprint(split),
        repr(transform),
    ]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def _loader(data: ClientData, split: str, transform, batch_size: int, num_workers: int):
    return torch.utils.data.DataLoader(data.dataset(split, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers)


@torch.no_grad()
def compute_embeddings(method, data: ClientData, split: str, transform, device: torch.device, autocast_ctx, batch_size: int = 128, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw image embeddings (N, D) of a split, in order, plus labels (N,)."""
    embs, labels = [], []
    for images, y in _loader(data, split, transform, batch_size, num_workers):
        with autocast_ctx():
            embs.append(method.image_embeddings(images.to(device)).detach().cpu())
        labels.append(y)
    if not embs:
        return torch.zeros(0, int(getattr(method.clip.visual, "output_dim", 0))), torch.zeros(0, dtype=torch.long)
    return torch.cat(embs), torch.cat(labels).long()


def cached_embeddings(method, data: ClientData, split: str, transform, device: torch.device, autocast_ctx, *, cache_dir: Path, key: str, batch_size: int = 128, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Embeddings of a split from the cache, computing and storing them on a miss.

    Returns (embeddings, labels, hit).
    """
    path = Path(cache_dir) / "features" / f"{key}.safetensors"
    expected = torch.as_tensor(data.labels(split)).long()
    if path.is_file():
        try:
            stored = load_file(str(path))
            if stored["labels"].shape == expected.shape and torch.equal(stored["labels"], expected):
                return stored["embeddings"], stored["labels"], True
            log.warning("feature cache %s does not match split %s; recomputing", path, split)
        except Exception as err:  # a truncated or foreign file: recompute
            log.warning("feature cache %s unreadable (%s); recomputing", path, err)
    embs, labels = compute_embeddings(method, data, split, transform, device, autocast_ctx, batch_size, num_workers)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"embeddings": embs.contiguous(), "labels": labels.contiguous()}, str(tmp))
    os.replace(tmp, path)
    return embs, labels, False
