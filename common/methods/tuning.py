"""LayerNorm tuning and BitFit: FL²oRA's other PEFT types, selected tensors of CLIP unfrozen.

| name      | trains                                                          | source            |
|-----------|-----------------------------------------------------------------|-------------------|
| layernorm | every LayerNorm gain and bias of the chosen encoder(s)          | LN tuning         |
| bitfit    | every bias of the chosen encoder(s) (attention, MLP, LayerNorm) | Ben Zaken et al.  |

``method.peft.encoder`` picks vision, text or both (FL²oRA's encoder axis). Nothing new is
added, so round 0 is exactly zero-shot. For ViT-B-16, both encoders: LayerNorm = 2 x (26 x 768 +
25 x 512) = 65,536 tensors' entries; BitFit = 171,008 (after fedcal's q/k/v split, whose biases
are the rows of CLIP's in_proj_bias). WiSE-FT interpolates the tuned tensors with their
zero-shot values, which are small enough to keep.
"""

from __future__ import annotations

from torch import nn

from .base import ClipMethod


def _in_encoder(name: str, encoder: str) -> bool:
    vision = name.startswith("visual.")
    return encoder == "both" or (encoder == "vision") == vision


class _SelectedTensors(ClipMethod):
    """Unfreeze the CLIP tensors that :meth:`selects` picks, in the chosen encoder(s)."""

    def __init__(self, cfg, clip, tokenizer, class_names, templates):
        super().__init__(cfg, clip, tokenizer, class_names, templates)
        encoder = cfg.peft.encoder
        self.image_tower_frozen = encoder == "text"
        self.text_tower_trainable = encoder in ("text", "both")
        modules = dict(clip.named_modules())
        for name, p in clip.named_parameters():
            owner, _, leaf = name.rpartition(".")
            p.requires_grad_(_in_encoder(name, encoder) and self.selects(modules.get(owner), leaf))
        self._zero_shot = self.trainable_state()

    def selects(self, module: nn.Module | None, leaf: str) -> bool:
        raise NotImplementedError

    def _enter_wise(self, alpha: float):
        current = self.trainable_state()
        self.load_trainable_state({k: (1 - alpha) * self._zero_shot[k] + alpha * v for k, v in current.items()})
        return lambda: self.load_trainable_state(current)


class LayerNormTuning(_SelectedTensors):
    name = "layernorm"

    def selects(self, module, leaf):
        return isinstance(module, nn.LayerNorm) and leaf in ("weight", "bias")


class BitFit(_SelectedTensors):
    name = "bitfit"

    def selects(self, module, leaf):
        return leaf == "bias" or leaf.endswith("_bias")
