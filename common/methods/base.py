"""What every trainable method on a frozen CLIP shares.

A method is an ``nn.Module`` around an open_clip CLIP whose weights are frozen; it adds (or
unfreezes) a few tensors and defines how class logits are formed:

    logits = s * cos(image feature, class text feature)          (s: CLIP's exp(logit_scale) or method.logit_scale)

Only :meth:`trainable_state` crosses the network: exactly the tensors with ``requires_grad``, in
fp32 on the CPU, under stable names. :meth:`load_trainable_state` is strict: a missing, extra or
mis-shaped key is an error naming it.

Methods whose image tower stays frozen (``image_tower_frozen``) can be fed precomputed image
embeddings (:meth:`logits_from_embeddings`), which is what the client's frozen-feature cache uses.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..model import encode_text_features, prompt_name, zero_shot_classifier


class StateError(ValueError):
    """A trainable state that does not fit the method (missing, extra or mis-shaped key)."""


class MixesWithZeroShot:
    """WiSE-FT for methods that mix their output with the zero-shot one by a factor ``self._alpha``
    (1 = fine-tuned only); ``_alpha`` is set for the duration of ``ClipMethod.wise``."""

    _alpha: float = 1.0

    def _enter_wise(self, alpha: float) -> Callable[[], None]:
        self._alpha = alpha

        def undo() -> None:
            self._alpha = 1.0

        return undo


class ClipMethod(nn.Module):
    name = "base"
    image_tower_frozen = True  # image embeddings may be cached
    text_tower_trainable = False  # text features must be recomputed with grad while training

    def __init__(self, cfg: Any, clip: nn.Module, tokenizer: Any, class_names: list[str], templates: list[str]):
        super().__init__()
        self.cfg = cfg
        self.clip = clip
        self.tokenizer = tokenizer
        self.class_names = list(class_names)
        self.templates = list(templates)
        self.fixed_scale = float(cfg.logit_scale)
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self._text_cache: torch.Tensor | None = None

    # ------------------------------------------------------------------ device helpers
    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def zero_shot_text(self) -> torch.Tensor:
        """Hand-crafted prompt features (K, D) from the frozen CLIP (open_clip's classifier builder)."""
        return zero_shot_classifier(self.clip, self.tokenizer, self.class_names, self.templates, self.device)

    # ------------------------------------------------------------------ the forward pieces
    def logit_scale(self) -> torch.Tensor:
        if self.fixed_scale > 0:
            return torch.tensor(self.fixed_scale, device=self.device)
        return self.clip.logit_scale.exp()

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) CLIP image embeddings; no graph when the image tower is frozen."""
        if self.image_tower_frozen:
            with torch.no_grad():
                return self.clip.encode_image(images)
        return self.clip.encode_image(images)

    def image_features(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Normalised image features from raw embeddings (the adapter overrides this)."""
        return embeddings / embeddings.norm(dim=-1, keepdim=True)

    def compute_text_features(self) -> torch.Tensor:
        """Normalised class text features (K, D); differentiable for trainable text towers."""
        return encode_text_features(self.clip, self.tokenizer, self.class_names, self.templates, self.device)

    def text_features(self) -> torch.Tensor:
        if self.text_tower_trainable and self.training:
            return self.compute_text_features()
        if self._text_cache is None:
            with torch.no_grad():
                self._text_cache = self.compute_text_features().detach()
        return self._text_cache

    def logits_from_embeddings(self, embeddings: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits from raw image embeddings; ``text`` = this step's text features, if known."""
        feats = self.image_features(embeddings)
        text = self.text_features() if text is None else text
        return self.logit_scale() * feats @ text.to(feats.dtype).T

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_embeddings(self.image_embeddings(images))

    def pair_features(self, embeddings: torch.Tensor, labels: torch.Tensor, text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image features, text features of each image's class prompt, scale) for contrastive losses."""
        feats = self.image_features(embeddings)
        text = self.text_features() if text is None else text
        return feats, text[labels].to(feats.dtype), self.logit_scale()

    def caption_features(self, labels: torch.Tensor, templates: list[str], template_ids: torch.Tensor) -> torch.Tensor:
        """Normalised text features of one caption per example, ``templates[id].format(class name)``
        (FLYP's image-caption pairs); differentiable where the text tower trains."""
        names = [prompt_name(self.class_names[int(k)]) for k in labels.tolist()]
        tokens = self.tokenizer([templates[int(t)].format(n) for n, t in zip(names, template_ids.tolist(), strict=True)]).to(self.device)
        feats = self.clip.encode_text(tokens)
        return feats / feats.norm(dim=-1, keepdim=True)

    def regularizer(self) -> torch.Tensor:
        """Method-specific loss term (KgCoOp's knowledge-guided term); zero by default."""
        return torch.zeros((), device=self.device)

    # ------------------------------------------------------------------ train/eval
    def train(self, mode: bool = True):
        super().train(mode)
        if self.text_tower_trainable:  # a frozen text tower's class features are constants: kept across rounds
            self._text_cache = None
        if not self.keeps_backbone_training_mode():
            self.clip.eval()
        return self

    def keeps_backbone_training_mode(self) -> bool:
        """True where stochastic layers inside the backbone must follow train() (LoRA dropout)."""
        return False

    # ------------------------------------------------------------------ the state that travels
    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", torch.float32).clone() for n, p in self.trainable_named_parameters()}

    def load_trainable_state(self, state: dict[str, Any]) -> None:
        params = dict(self.trainable_named_parameters())
        missing = [k for k in params if k not in state]
        extra = [k for k in state if k not in params]
        if missing:
            raise StateError(f"trainable state is missing key {missing[0]!r} ({len(missing)} missing) for method {self.name!r}")
        if extra:
            raise StateError(f"trainable state has unexpected key {extra[0]!r} ({len(extra)} extra) for method {self.name!r}")
        with torch.no_grad():
            for key, param in params.items():
                value = torch.as_tensor(state[key])
                if param.dim() == 0 and tuple(value.shape) == (1,):
                    value = value.reshape(())  # Flower's Array carries a 0-d tensor (e.g. logit_scale) as shape (1,)
                if tuple(value.shape) != tuple(param.shape):
                    raise StateError(f"trainable state key {key!r} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
                param.copy_(value.to(param.device, param.dtype))
        if self.text_tower_trainable:
            self._text_cache = None

    def num_trainable(self) -> int:
        return sum(p.numel() for _, p in self.trainable_named_parameters())

    def sizes(self) -> dict[str, int | float | None]:
        """Parameter counts and the bytes of one update (fp32 on the wire), as `fedcal describe`
        reports them and as the server records them: the one place these are computed."""
        state = self.trainable_state()
        total = getattr(self.clip, "frozen_total_params", None) or sum(p.numel() for p in self.clip.parameters())
        trainable = sum(v.numel() for v in state.values())
        update = trainable * 4
        return {"trainable_params": int(trainable), "total_params": int(total), "trainable_fraction": trainable / total,
                "tensors": len(state), "update_bytes": int(update), "full_model_bytes": int(total * 4),
                "traffic_reduction": (total * 4 / update) if update else None}

    # ------------------------------------------------------------------ WiSE-FT
    @contextmanager
    def wise(self, alpha: float):
        """Evaluate between zero-shot (alpha 0) and fine-tuned (alpha 1); each method defines how."""
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"method.wise_alpha must be in [0, 1] (got {alpha})")
        if alpha == 1.0:
            yield self
            return
        undo = self._enter_wise(float(alpha))
        self._text_cache = None
        try:
            yield self
        finally:
            undo()
            self._text_cache = None

    def _enter_wise(self, alpha: float) -> Callable[[], None]:
        raise NotImplementedError(f"WiSE-FT interpolation is not defined for method {self.name!r}")
