"""Linear probe initialised from the zero-shot text features (a zero-shot-initialised head).

logits = s * normalize(f) W^T + b with W (K x D) initialised to the normalised class prompt
features and b = 0, so round 0 is exactly zero-shot. W and b are trained; the image tower is
frozen. WiSE-FT: W = (1-a) W_zs + a W, b = a b (Wortsman et al.'s interpolation for a head).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ClipMethod, MixesWithZeroShot


class LinearHead(MixesWithZeroShot, ClipMethod):
    name = "linear"

    def __init__(self, cfg, clip, tokenizer, class_names, templates):
        super().__init__(cfg, clip, tokenizer, class_names, templates)
        zs = self.compute_text_features().detach()
        self.register_buffer("zs_weight", zs.clone(), persistent=False)
        self.head_weight = nn.Parameter(zs.clone().float())
        self.head_bias = nn.Parameter(torch.zeros(len(self.class_names), device=self.device))

    def _weight(self) -> torch.Tensor:
        if self._alpha < 1.0:
            return (1 - self._alpha) * self.zs_weight + self._alpha * self.head_weight
        return self.head_weight

    def text_features(self) -> torch.Tensor:
        return self._weight()

    def logits_from_embeddings(self, embeddings: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.image_features(embeddings)
        return self.logit_scale() * feats @ self._weight().to(feats.dtype).T + self._alpha * self.head_bias

    def pair_features(self, embeddings, labels, text=None):
        feats = self.image_features(embeddings)
        rows = self._weight()[labels]
        return feats, rows / rows.norm(dim=-1, keepdim=True), self.logit_scale()
