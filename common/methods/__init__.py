"""Trainable methods on a frozen CLIP: :func:`build_method` picks one by ``method.name``.

| name      | trains                                   | source                      |
|-----------|------------------------------------------|-----------------------------|
| zeroshot  | nothing                                  | CLIP (Radford et al. 2021)  |
| lora      | LoRA on q/k/v (configurable) via peft    | FL²oRA / CLIP-LoRA          |
| adapter   | attention adapter on the image embedding | FedCLIP                     |
| coop      | shared context vectors of the prompts    | CoOp                        |
| kgcoop    | CoOp + knowledge-guided regulariser      | KgCoOp                      |
| maple     | deep coupled text and vision prompts     | MaPLe                       |
| layernorm | LayerNorm gains and biases               | FL²oRA's PEFT ablation      |
| bitfit    | every bias                               | BitFit (FL²oRA's ablation)  |
| linear    | zero-shot-initialised linear head        | linear probe / LP           |
| full      | every CLIP weight                        | full fine-tuning (FedAvg)   |
"""

from __future__ import annotations

from typing import Any

import torch

from ..model import LoadedClip, templates_for
from ..names import METHODS as METHOD_NAMES
from .adapter import Adapter
from .attention import split_attention
from .base import ClipMethod, StateError
from .full import FullFinetune
from .linear import LinearHead
from .lora import Lora
from .maple import Maple
from .prompt import CoOp, KgCoOp
from .tuning import BitFit, LayerNormTuning
from .zeroshot import ZeroShot

METHODS: dict[str, type[ClipMethod]] = {
    cls.name: cls for cls in (ZeroShot, Lora, Adapter, CoOp, KgCoOp, Maple, LayerNormTuning, BitFit, LinearHead, FullFinetune)
}
if tuple(METHODS) != METHOD_NAMES:  # the names a config may give are declared once, in common/names.py
    raise ImportError(f"method registry {tuple(METHODS)} differs from common.names.METHODS {METHOD_NAMES}")

__all__ = ["METHODS", "ClipMethod", "StateError", "build_method", "split_attention"]


def build_method(cfg: Any, clip: LoadedClip | torch.nn.Module, class_names: list[str], *, tokenizer: Any = None, seed: int = 0) -> ClipMethod:
    """Wrap ``clip`` (a :class:`LoadedClip` or an open_clip model plus ``tokenizer``) in a method.

    ``cfg`` is a RunConfig or its ``method`` section. The CLIP is modified in place (attention
    split into q/k/v/out projections, adapters injected) and owned by the returned module. New
    tensors are initialised under ``torch.manual_seed(seed)``, so every process that builds the
    same method gets the same initial state.
    """
    mcfg = getattr(cfg, "method", cfg)
    if isinstance(clip, LoadedClip):
        model, tokenizer = clip.model, clip.tokenizer
    else:
        model = clip
    if tokenizer is None:
        raise ValueError("build_method needs a tokenizer: pass a LoadedClip or tokenizer=")
    if not class_names:
        raise ValueError("build_method needs at least one class name")
    split_attention(model)
    templates = templates_for(mcfg.templates, mcfg.template)
    devices = [model.logit_scale.device] if model.logit_scale.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        method = METHODS[mcfg.name](mcfg, model, tokenizer, class_names, templates)
    method.eval()
    return method
