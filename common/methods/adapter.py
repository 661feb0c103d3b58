"""FedCLIP's attention adapter on the image embedding (Lu et al., 2023).

    a = softmax(W2 tanh(W1 f) + b2),   f' = a * f      (element-wise; W1, W2: d x d with biases)

2(d^2 + d) trainable parameters (525,312 for ViT-B-32, d = 512); the text features stay frozen.
By default the last layer starts at zero (``method.adapter_init = "zero"``): the softmax is then
exactly uniform, f' = f / d points the same way as f, and round 0 gives exactly the zero-shot
predictions. FedCLIP initialises both layers with PyTorch's default, which is zero-shot only
approximately; ``method.adapter_init = "pytorch"`` reproduces that.
WiSE-FT: the normalised features are interpolated, normalize((1-a) f/|f| + a f'/|f'|).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ClipMethod, MixesWithZeroShot


class AttentionAdapter(nn.Module):
    def __init__(self, dim: int, init: str = "zero"):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        if init == "zero":
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc2(torch.tanh(self.fc1(f))), dim=-1) * f


class Adapter(MixesWithZeroShot, ClipMethod):
    name = "adapter"

    def __init__(self, cfg, clip, tokenizer, class_names, templates):
        super().__init__(cfg, clip, tokenizer, class_names, templates)
        dim = int(clip.text_projection.shape[1]) if hasattr(clip, "text_projection") else int(clip.visual.output_dim)
        self.adapter = AttentionAdapter(dim, cfg.adapter_init).to(self.device)

    def image_features(self, embeddings: torch.Tensor) -> torch.Tensor:
        f = embeddings.float()
        adapted = self.adapter(f)
        adapted = adapted / adapted.norm(dim=-1, keepdim=True)
        if self._alpha < 1.0:
            base = f / f.norm(dim=-1, keepdim=True)
            mixed = (1 - self._alpha) * base + self._alpha * adapted
            return mixed / mixed.norm(dim=-1, keepdim=True)
        return adapted
