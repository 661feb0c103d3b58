"""Zero-shot CLIP: no trainable tensors; the class prompts (one template or an ensemble) decide."""

from __future__ import annotations

from .base import ClipMethod


class ZeroShot(ClipMethod):
    name = "zeroshot"

    def _enter_wise(self, alpha: float):
        return lambda: None  # zero-shot is its own interpolation end point
