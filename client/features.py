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

Beside them, a frozen-text file per (model, weights, precision, device type, class names,
templates) holds the class text features and the logit scale: a client of a method with frozen
towers (adapter, linear, zero-shot) builds its method on a :class:`~common.model.HeadlessClip`
with the cached embeddings of the splits it reads, and loads CLIP only if asked for a split the
cache lacks (:meth:`ClientRuntime.create`, :meth:`ClientRuntime.load_towers`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common.data import ClientData
from common.model import HeadlessClip, TransformRef, weights_identity

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
    path = embeddings_path(cache_dir, key)
    stored = read_embeddings(path, data, split)
    if stored is not None:
        return stored[0], stored[1], True
    embs, labels = compute_embeddings(method, data, split, transform, device, autocast_ctx, batch_size, num_workers)
    _write_atomically({"embeddings": embs.contiguous(), "labels": labels.contiguous()}, path)
    return embs, labels, False


def embeddings_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "features" / f"{key}.safetensors"


def read_embeddings(path: Path, data: ClientData, split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (embeddings, labels) of a split, or None when the file is absent, unreadable or
    holds other labels (a warning says which)."""
    if not path.is_file():
        return None
    expected = torch.as_tensor(data.labels(split)).long()
    try:
        stored = load_file(str(path))
        if stored["labels"].shape == expected.shape and torch.equal(stored["labels"], expected):
            return stored["embeddings"], stored["labels"]
        log.warning("feature cache %s does not match split %s; recomputing", path, split)
    except Exception as err:  # a truncated or foreign file: recompute
        log.warning("feature cache %s unreadable (%s); recomputing", path, err)
    return None


def _write_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Frozen text features: what adapter, linear and zero-shot need of CLIP once images are cached
# --------------------------------------------------------------------------------------------
#: Methods whose towers are both frozen and whose training needs only image embeddings and class
#: text features (without augmentation): with every split cached they never load CLIP.
FROZEN_TOWER_METHODS = ("adapter", "linear", "zeroshot")


def text_path(cache_dir: Path, model_name: str, pretrained: str, precision: str, device: torch.device,
              class_names: list[str], templates: list[str]) -> Path:
    """The frozen-text file beside the image embeddings: keyed by the model, its weights, the
    precision, the device type, the class names and the prompt templates."""
    parts = ["text-v1", model_name, weights_identity(pretrained), precision, device.type, json.dumps(class_names), json.dumps(templates)]
    return Path(cache_dir) / "features" / f"text-{hashlib.sha256(chr(31).join(parts).encode()).hexdigest()[:32]}.safetensors"


@torch.no_grad()
def store_frozen_text(path: Path, method, preprocess_eval, autocast_ctx) -> None:
    """Write the method's class text features (as its own code computes them, outside and, where
    the precision autocasts, inside autocast), CLIP's logit scale and what a :class:`HeadlessClip`
    needs to stand in for CLIP."""
    tensors = {"plain": method.compute_text_features().detach().cpu().contiguous(),
               "logit_scale": method.clip.logit_scale.detach().cpu().reshape(()).contiguous()}
    with autocast_ctx():
        if torch.is_autocast_enabled(method.device.type):
            tensors["autocast"] = method.compute_text_features().detach().cpu().contiguous()
    metadata = {"classes": json.dumps(method.class_names), "templates": json.dumps(method.templates),
                "output_dim": str(int(tensors["plain"].shape[1])), "total_params": str(sum(p.numel() for p in method.clip.parameters())),
                "eval_transform": repr(preprocess_eval)}
    _write_atomically(tensors, path, metadata)


def load_frozen_text(path: Path, class_names: list[str], templates: list[str], precision: str, device: torch.device) -> tuple[HeadlessClip, TransformRef] | None:
    """A HeadlessClip and the eval transform's stand-in from a frozen-text file; None when the
    file is absent, unreadable or for other classes or templates."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        if json.loads(meta["classes"]) != list(class_names) or json.loads(meta["templates"]) != list(templates):
            log.warning("frozen-text file %s is for other classes or templates; loading CLIP", path)
            return None
        text = {k: tensors[k] for k in ("plain", "autocast") if k in tensors}
        if text["plain"].shape != (len(class_names), int(meta["output_dim"])):
            raise ValueError(f"text features of shape {tuple(text['plain'].shape)}")
        clip = HeadlessClip(logit_scale=tensors["logit_scale"], text=text, class_names=class_names, templates=templates,
                            output_dim=int(meta["output_dim"]), total_params=int(meta["total_params"]), precision=precision, device=device)
        return clip, TransformRef(meta["eval_transform"])
    except Exception as err:  # truncated or foreign: CLIP is loaded and the file rewritten
        log.warning("frozen-text file %s unreadable (%s); loading CLIP", path, err)
        return None
