"""Full fine-tuning: every CLIP weight trainable (including logit_scale).

This is the full-model FedAvg baseline that the communication savings of the parameter-efficient
methods are measured against, and the setting of FLYP/CaRot. WiSE-FT interpolates every weight
with the zero-shot weights, (1-a) theta_zs + a theta; the zero-shot copy is kept on the CPU only
when method.wise_alpha < 1.
"""

from __future__ import annotations

from .base import ClipMethod


class FullFinetune(ClipMethod):
    name = "full"
    image_tower_frozen = False
    text_tower_trainable = True

    def __init__(self, cfg, clip, tokenizer, class_names, templates):
        super().__init__(cfg, clip, tokenizer, class_names, templates)
        for p in self.clip.parameters():
            p.requires_grad_(True)
        self._zero_shot = self.trainable_state() if cfg.wise_alpha < 1.0 else None

    def _enter_wise(self, alpha: float):
        if self._zero_shot is None:
            raise ValueError("WiSE-FT for method 'full' needs the zero-shot weights: set method.wise_alpha < 1 before the model is built")
        current = self.trainable_state()
        mixed = {k: (1 - alpha) * self._zero_shot[k] + alpha * v for k, v in current.items()}
        self.load_trainable_state(mixed)
        return lambda: self.load_trainable_state(current)
