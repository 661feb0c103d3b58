"""CoOp and KgCoOp: learnable context vectors in front of each class name.

CoOp (Zhou et al., IJCV 2022): the prompt of class c is ``[ctx_1 ... ctx_M] <name of c> .`` with
M = ``method.prompt.n_ctx`` context vectors shared by all classes (class token at the end), either
drawn from N(0, 0.02) or initialised from the token embeddings of a phrase (``ctx_init``, e.g.
"a photo of a"; M is then its token count). The text encoder runs through the learned prompts.
Initialised from "a photo of a", the class features equal the hand-crafted prompt's exactly.

KgCoOp (Yao et al., CVPR 2023) adds ``lambda * mean_c ||t_c - t_c^clip||^2`` between the learned
and the hand-crafted (method.template) normalised class features, lambda = 8.0. For unit vectors
this is 2 (1 - cos), twice the ``1 - cos`` that the official code computes.
WiSE-FT: normalize((1-a) t^clip + a t).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError
from ..model import class_features, prompt_name
from .base import ClipMethod, MixesWithZeroShot


def encode_text_embeddings(clip, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` from token *embeddings* (the tokens only locate the EOT)."""
    cast_dtype = clip.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype) + clip.positional_embedding.to(cast_dtype)
    x = clip.transformer(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    from open_clip.transformer import text_global_pool

    x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    proj = clip.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x


class CoOp(MixesWithZeroShot, ClipMethod):
    name = "coop"
    text_tower_trainable = True

    def __init__(self, cfg, clip, tokenizer, class_names, templates):
        super().__init__(cfg, clip, tokenizer, class_names, templates)
        if not hasattr(clip, "token_embedding") or not hasattr(clip, "positional_embedding"):
            raise ConfigError(f"method.name={self.name} needs a CLIP with a standard text transformer; this open_clip model has a custom text tower")
        pc = cfg.prompt
        embed = clip.token_embedding
        with torch.no_grad():
            if pc.ctx_init:
                phrase = tokenizer([pc.ctx_init]).to(self.device)
                n_ctx = int((phrase[0] != 0).sum().item()) - 2  # minus SOT and EOT
                if n_ctx < 1:
                    raise ConfigError(f"method.prompt.ctx_init={pc.ctx_init!r} has no tokens")
                ctx = embed(phrase)[0, 1 : 1 + n_ctx].clone()
                prefix = pc.ctx_init
            else:
                n_ctx = pc.n_ctx
                ctx = torch.empty(n_ctx, embed.weight.shape[1], device=self.device).normal_(std=0.02)
                prefix = " ".join(["X"] * n_ctx)
            tokens = tokenizer([f"{prefix} {prompt_name(c)}." for c in self.class_names]).to(self.device)
            emb = embed(tokens)
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(ctx.float())
        self.register_buffer("prompt_tokens", tokens, persistent=False)
        self.register_buffer("token_prefix", emb[:, :1].clone(), persistent=False)
        self.register_buffer("token_suffix", emb[:, 1 + n_ctx :].clone(), persistent=False)
        self.register_buffer("handcrafted", self.zero_shot_text(), persistent=False)
        self._last_text: torch.Tensor | None = None

    def compute_text_features(self) -> torch.Tensor:
        k = self.prompt_tokens.shape[0]
        ctx = self.ctx.unsqueeze(0).expand(k, -1, -1).to(self.token_prefix.dtype)
        x = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)
        feats = class_features(encode_text_embeddings(self.clip, x, self.prompt_tokens), k, 1)
        if self._alpha < 1.0:
            feats = (1 - self._alpha) * self.handcrafted + self._alpha * feats
            feats = feats / feats.norm(dim=-1, keepdim=True)
        if self.training:
            self._last_text = feats
        return feats


class KgCoOp(CoOp):
    name = "kgcoop"

    def regularizer(self) -> torch.Tensor:
        text = self._last_text if self._last_text is not None else self.compute_text_features()
        return self.cfg.prompt.kg_weight * ((text - self.handcrafted) ** 2).sum(dim=-1).mean()
