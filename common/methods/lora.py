"""FL²oRA: LoRA on CLIP's attention projections through peft (Zanella & Ben Ayed's CLIP-LoRA).

After :func:`split_attention`, every attention block has ``q_proj``, ``k_proj``, ``v_proj`` and
``out_proj`` linear layers; peft wraps the configured ones (``method.lora.targets`` among
q,k,v,out,mlp; ``mlp`` = both MLP layers ``c_fc`` and ``c_proj``) in the configured blocks of the
vision and/or text encoder. Defaults follow FL²oRA: both encoders, q/k/v, all blocks, r = 2,
alpha = 1, rsLoRA scaling alpha/sqrt(r), dropout 0.25 on the LoRA input, A Kaiming-uniform and
B = 0 (so round 0 is exactly zero-shot). For ViT-B-16 that is 184,320 trainable parameters.
WiSE-FT scales every learned delta B A by alpha.
"""

from __future__ import annotations

import re

from ..config import ConfigError
from .base import ClipMethod

_PROJ = {"q": ["attn.q_proj"], "k": ["attn.k_proj"], "v": ["attn.v_proj"], "out": ["attn.out_proj"], "mlp": ["mlp.c_fc", "mlp.c_proj"]}


def _block_count(module) -> int:
    return len(module.resblocks) if hasattr(module, "resblocks") else 0


def parse_layers(spec: str, depth: int, tower: str) -> list[int]:
    if spec == "all":
        return list(range(depth))
    if "-" in spec:
        lo, hi = (int(x) for x in spec.split("-"))
        layers = list(range(lo, hi + 1))
    else:
        layers = sorted({int(x) for x in spec.split(",")})
    bad = [i for i in layers if i >= depth]
    if not layers or bad:
        raise ConfigError(f"method.lora.layers={spec!r} names block {bad[0] if bad else '?'} but the {tower} encoder has {depth} blocks (0-{depth - 1})")
    return layers


def target_regex(clip, encoder: str, targets: str, layers: str) -> str:
    towers = []
    if encoder in ("vision", "both"):
        towers.append((r"visual\.transformer", _block_count(clip.visual.transformer), "vision"))
    if encoder in ("text", "both"):
        towers.append((r"transformer", _block_count(clip.transformer), "text"))
    projections = [p for t in targets.split(",") for p in _PROJ[t]]
    alternatives = []
    for prefix, depth, tower in towers:
        if depth == 0:
            raise ConfigError(f"model has no standard {tower} transformer blocks to put LoRA on; use method.lora.encoder without {tower}")
        ids = "|".join(str(i) for i in parse_layers(layers, depth, tower))
        alternatives.append(rf"{prefix}\.resblocks\.({ids})\.({'|'.join(re.escape(p) for p in projections)})")
    return "^(" + "|".join(alternatives) + ")$"


class Lora(ClipMethod):
    name = "lora"

    def __init__(self, cfg, clip, tokenizer, class_names, templates):
        super().__init__(cfg, clip, tokenizer, class_names, templates)
        lc = cfg.lora
        self.image_tower_frozen = lc.encoder == "text"
        self.text_tower_trainable = lc.encoder in ("text", "both")
        from peft import LoraConfig, inject_adapter_in_model

        peft_cfg = LoraConfig(
            r=lc.rank,
            lora_alpha=lc.alpha,
            lora_dropout=lc.dropout,
            use_rslora=lc.rslora,
            target_modules=target_regex(clip, lc.encoder, lc.targets, lc.layers),
            init_lora_weights=True,
            bias="none",
        )
        inject_adapter_in_model(peft_cfg, self.clip)
        for name, p in self.clip.named_parameters():
            p.requires_grad_("lora_" in name)

    def keeps_backbone_training_mode(self) -> bool:
        return True

    def lora_layers(self) -> list:
        from peft.tuners.lora import LoraLayer

        return [m for m in self.clip.modules() if isinstance(m, LoraLayer)]

    def _enter_wise(self, alpha: float):
        saved = [(layer, dict(layer.scaling)) for layer in self.lora_layers()]
        for layer, scaling in saved:
            for adapter, value in scaling.items():
                layer.scaling[adapter] = value * alpha

        def undo():
            for layer, scaling in saved:
                layer.scaling.update(scaling)

        return undo
