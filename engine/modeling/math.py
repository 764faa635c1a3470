"""The math of the added modules, once, as pure functions of tensors: the torch modules (`layers.py`) and the
streamed forward (`streamed.py`) both call these (docs/architecture.md, "Added modules").

Weights are used in the input's dtype; shapes: x [B, T, C], bottleneck width r, kernel size k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def adaptive_scale(y: torch.Tensor, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """An RMSNorm's output y times its per-token, per-channel scale `bias + up @ silu(down @ y)`:
    down [r, C], up [C, r], bias [C]. With up = 0 and bias = 1 the scale is exactly 1."""
    scale = F.linear(F.silu(F.linear(y, down.to(y.dtype))), up.to(y.dtype), bias.to(y.dtype))
    return y * scale


def token_mix(x: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor | None = None,
              past: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x + a causal depthwise convolution of x over the sequence: out_t = x_t + sum_j weight[:, j] * x_{t-k+1+j}.

    weight [C, k]; `valid` [B, T] (bool or 0/1): positions that are False count as zero, as do positions before
    the sequence unless `past` [B, k-1, C] gives the (already masked) inputs just before it. Returns the output and
    the last k-1 masked inputs (the `past` of the next call, for cached generation).
    """
    k = weight.shape[1]
    x_in = x * valid[..., None].to(x.dtype) if valid is not None else x
    if past is None:
        past = x_in.new_zeros(x.shape[0], k - 1, x.shape[2])
    padded = torch.cat((past.to(x.dtype), x_in), dim=1)  # [B, k-1+T, C]
    mixed = F.conv1d(padded.transpose(1, 2), weight.to(x.dtype)[:, None, :], groups=x.shape[2])
    return x + mixed.transpose(1, 2), padded[:, padded.shape[1] - (k - 1):]


def se_gate(y: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Squeeze-and-excitation of each token's channels: y * (1 + tanh(up @ silu(down @ y))); down [r, C],
    up [C, r]. With up = 0 it is exactly y."""
    return y * (1 + torch.tanh(F.linear(F.silu(F.linear(y, down.to(y.dtype))), up.to(y.dtype))))
