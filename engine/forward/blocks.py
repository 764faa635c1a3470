"""The pieces every family's decoder layer is made of, as pure differentiable functions of tensors.

Weights arrive in their stored dtype and are upcast here, one at a time, to the
hidden states' dtype (float32). Nothing works in place, so the same functions
serve a forward under autograd.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Observe = Callable[[str, torch.Tensor], None]
Rope = tuple[torch.Tensor, torch.Tensor]  # cos and sin, [T, rotary dims]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0) -> torch.Tensor:
    """[..., C] -> [..., C]; the scale is `offset + weight` (Gemma stores its norm weights as w - 1)."""
    return (offset + weight.to(x.dtype)) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def linear(x: torch.Tensor, weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """x @ W.T + b in x's dtype, for the module `name` (its `.weight`, and `.bias` when it has one)."""
    bias = weights.get(f"{name}.bias")
    return F.linear(x, weights[f"{name}.weight"].to(x.dtype), bias.to(x.dtype) if bias is not None else None)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """x [B, heads, T, head_dim] rotated by position; with partial rotary embeddings (a table narrower than the
    head) only the first dims rotate and the rest pass through."""
    cos, sin = rope
    dims = cos.shape[-1]
    if dims == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    turned, kept = x[..., :dims], x[..., dims:]
    return torch.cat((turned * cos + _rotate_half(turned) * sin, kept), dim=-1)


def attention_mask(valid: torch.Tensor, window: int | None) -> torch.Tensor:
    """valid: [B, T] bool -> [B, 1, T, T] bool, True where query i may attend key j."""
    length = valid.shape[1]
    i = torch.arange(length, device=valid.device)[:, None]
    j = torch.arange(length, device=valid.device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    return allowed[None, None] & valid[:, None, None, :]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, scale: float,
           softcap: float | None = None) -> torch.Tensor:
    """Grouped-query attention: q [B, heads, T, D], k and v [B, kv_heads, T, D] -> [B, T, heads * D].

    With `softcap` the scores pass through softcap * tanh(scores / softcap) before the mask (Gemma 2), which
    the fused kernel cannot do; masked scores are then the dtype's lowest finite value, not -inf, so a query
    with no key to see (a padded one) averages finite values instead of making NaN.
    """
    batch, heads, length, _ = q.shape
    groups = heads // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    if softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        scores = torch.tanh(q @ k.transpose(-1, -2) * (scale / softcap)) * softcap
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).reshape(batch, length, -1)
