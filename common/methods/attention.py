"""Split open_clip's packed ``nn.MultiheadAttention`` into separate q/k/v/out linear layers.

open_clip's ViT and text transformers use ``nn.MultiheadAttention``, whose q, k and v projections
live in one packed ``in_proj_weight``. FL²oRA puts a separate rank-r LoRA on each of q, k and v,
so the attention is rebuilt with four ``nn.Linear`` layers holding the same weights; peft then
targets ``q_proj``/``k_proj``/``v_proj``/``out_proj`` like any linear layer.

The rebuilt block computes exactly what PyTorch's MHA computes on its general path (three input
projections, scaled dot-product attention, output projection); fedcal applies it to every method
so that all methods share one CLIP forward and a LoRA with B = 0 reproduces the zero-shot logits
bit for bit. tests/test_methods.py checks the split model against the original.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SplitAttention(nn.Module):
    """Drop-in replacement for ``nn.MultiheadAttention`` with separate projection layers."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("only standard self-attention MultiheadAttention blocks can be split")
        d, bias = mha.embed_dim, mha.in_proj_bias is not None
        self.embed_dim, self.num_heads, self.batch_first = d, mha.num_heads, mha.batch_first
        self.head_dim = d // mha.num_heads
        self.dropout = mha.dropout
        w = mha.in_proj_weight.detach()
        b = mha.in_proj_bias.detach() if bias else None
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=bias) for _ in range(3))
        for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
            proj.weight.data.copy_(w[i * d : (i + 1) * d])
            if bias:
                proj.bias.data.copy_(b[i * d : (i + 1) * d])
        self.out_proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None)
        self.out_proj.weight.data.copy_(mha.out_proj.weight.detach())
        if mha.out_proj.bias is not None:
            self.out_proj.bias.data.copy_(mha.out_proj.bias.detach())
        self.to(device=w.device, dtype=w.dtype)

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, key_padding_mask=None, **_):
        key = query if key is None else key
        value = key if value is None else value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        bsz, tgt, _ = query.shape
        src = key.shape[1]
        q = self.q_proj(query).view(bsz, tgt, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(bsz, src, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(bsz, src, self.num_heads, self.head_dim).transpose(1, 2)
        mask = _float_mask(attn_mask, q.dtype)
        if key_padding_mask is not None:
            pad = _float_mask(key_padding_mask, q.dtype).view(bsz, 1, 1, src)
            mask = pad if mask is None else mask + pad
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(bsz, tgt, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def split_attention(model: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` in ``model`` in place; returns how many were split."""
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.MultiheadAttention)]
    for name, mha in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, SplitAttention(mha))
    return len(targets)
