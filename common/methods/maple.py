"""MaPLe: multi-modal prompt learning (Khattak et al., CVPR 2023), on an open_clip ViT.

Text branch: the prompt of class c is ``[SOS] ctx_1..ctx_M <phrase tail> <name of c> . [EOS]``:
the first M = ``method.maple.n_ctx`` tokens after SOS of ``ctx_init + " " + name + "."`` are
learnable (initialised from the phrase's own token embeddings, as the official code does: with
"a photo of a" and M = 2 they replace "a photo"). In blocks 1..J-1 (J = ``method.maple.depth``)
those M positions are overwritten by deeper learnable text prompts (N(0, 0.02)).

Vision branch: M prompt tokens are appended to the patch tokens before ``ln_pre``; in blocks
1..J-1 they are overwritten. Every vision prompt is coupled to its text prompt by its own linear
map (text width -> vision width): the first by ``proj``, the deeper ones by
``compound_projections[i]``. Official defaults: M = 2, J = 9, ctx_init "a photo of a"; for
ViT-B-16 that is 2x512 + 8x2x512 + 9 x (512x768 + 768) = 3,555,072 trainable entries.

The appended vision tokens change every image embedding, so MaPLe is never exactly zero-shot
(with J = 1 the text features alone equal the hand-crafted prompt's) and its image tower is not
cacheable. Pooling takes the class token, as CLIP ViTs do; other open_clip towers are refused.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ..config import ConfigError
from ..model import class_features, prompt_name
from .base import ClipMethod

Inject = Callable[[int, torch.Tensor], torch.Tensor]


def run_blocks(transformer: nn.Module, x: torch.Tensor, inject: Inject, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """open_clip's ``Transformer.forward`` on batch-first ``x``, letting ``inject(i, x)`` rewrite
    the input of block i (batch-first) before the block runs."""
    for i, block in enumerate(transformer.resblocks):
        x = inject(i, x)
        if not transformer.batch_first:
            x = block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
        else:
            x = block(x, attn_mask=attn_mask)
    return x


def _check_standard(clip: nn.Module) -> None:
    visual = clip.visual
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post")
    if not all(hasattr(visual, a) for a in needed) or getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise ConfigError("method.name=maple needs a CLIP ViT image tower with class-token pooling (e.g. ViT-B-16); this open_clip model has another")
    if not hasattr(clip, "token_embedding") or not hasattr(clip, "transformer"):
        raise ConfigError("method.name=maple needs a CLIP with a standard text transformer; this open_clip model has a custom text tower")


class Maple(ClipMethod):
    name = "maple"
    image_tower_frozen = False
    text_tower_trainable = True

    def __init__(self, cfg, clip, tokenizer, class_names, templates):
        super().__init__(cfg, clip, tokenizer, class_names, templates)
        _check_standard(clip)
        mc = cfg.maple
        depth = min(mc.depth, len(clip.transformer.resblocks), len(clip.visual.transformer.resblocks))
        if depth != mc.depth:
            raise ConfigError(f"method.maple.depth={mc.depth} exceeds the encoders' {depth} blocks")
        embed = clip.token_embedding
        text_width, vision_width = embed.weight.shape[1], clip.visual.conv1.out_channels
        self.n_ctx, self.depth = mc.n_ctx, depth
        with torch.no_grad():
            if mc.ctx_init:
                phrase = tokenizer([mc.ctx_init]).to(self.device)
                if int((phrase[0] != 0).sum()) - 2 < mc.n_ctx:
                    raise ConfigError(f"method.maple.ctx_init={mc.ctx_init!r} has fewer than method.maple.n_ctx={mc.n_ctx} tokens")
                ctx = embed(phrase)[0, 1 : 1 + mc.n_ctx].clone()
                prefix = mc.ctx_init
            else:
                ctx = torch.empty(mc.n_ctx, text_width, device=self.device).normal_(std=0.02)
                prefix = " ".join(["X"] * mc.n_ctx)
            tokens = tokenizer([f"{prefix} {prompt_name(c)}." for c in self.class_names]).to(self.device)
            emb = embed(tokens)
        self.ctx = nn.Parameter(ctx.float())
        self.compound_text = nn.ParameterList(
            [nn.Parameter(torch.empty(mc.n_ctx, text_width, device=self.device).normal_(std=0.02)) for _ in range(depth - 1)]
        )
        self.proj = nn.Linear(text_width, vision_width).to(self.device)
        self.compound_projections = nn.ModuleList([copy.deepcopy(self.proj) for _ in range(depth - 1)])
        for layer in self.compound_projections:
            layer.reset_parameters()
        self.register_buffer("prompt_tokens", tokens, persistent=False)
        self.register_buffer("token_prefix", emb[:, :1].clone(), persistent=False)
        self.register_buffer("token_suffix", emb[:, 1 + mc.n_ctx :].clone(), persistent=False)

    # ------------------------------------------------------------------ prompts of each block
    def vision_prompts(self) -> list[torch.Tensor]:
        """The M vision tokens entering block 0, then those overwriting them in blocks 1..J-1."""
        first = self.proj(self.ctx)
        return [first] + [layer(p) for layer, p in zip(self.compound_projections, self.compound_text, strict=True)]

    def _replace(self, prompts: list[torch.Tensor], where: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Inject:
        def inject(i: int, x: torch.Tensor) -> torch.Tensor:
            if i == 0 or i >= len(prompts):
                return x
            return where(x, prompts[i].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1))

        return inject

    # ------------------------------------------------------------------ encoders
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        v = self.clip.visual
        x = v.conv1(images.to(v.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        prompts = self.vision_prompts()
        n = self.n_ctx
        x = torch.cat([x, prompts[0].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
        x = v.ln_pre(x)
        x = run_blocks(v.transformer, x, self._replace(prompts, lambda x, p: torch.cat([x[:, :-n], p], dim=1)))
        pooled = v.ln_post(x[:, 0])
        return pooled @ v.proj if v.proj is not None else pooled

    def compute_text_features(self) -> torch.Tensor:
        clip, n = self.clip, self.n_ctx
        k = self.prompt_tokens.shape[0]
        ctx = self.ctx.unsqueeze(0).expand(k, -1, -1).to(self.token_prefix.dtype)
        x = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)
        cast = clip.transformer.get_cast_dtype()
        x = x.to(cast) + clip.positional_embedding.to(cast)
        prompts = [self.ctx] + list(self.compound_text)
        x = run_blocks(clip.transformer, x, self._replace(prompts, lambda x, p: torch.cat([x[:, :1], p, x[:, 1 + n :]], dim=1)), attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        from open_clip.transformer import text_global_pool

        x = text_global_pool(x, self.prompt_tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        proj = clip.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return class_features(x, k, 1)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images)
