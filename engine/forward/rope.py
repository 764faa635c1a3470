"""Rotary position embeddings: the cos/sin tables of RoPE parameters as `support.rope_parameters` reads them
from a config, computed as transformers' rotary embedding modules compute them."""
from __future__ import annotations

import math

import torch

from recipekit.engine.errors import PlanError


def tables(rope: dict, head_dim: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [length, rotary dims], for positions 0..length-1 of sequences padded to `length` (longrope
    picks its long factors when `length` exceeds the pretraining context, as transformers does)."""
    inv, scaling = _inverse_frequencies(rope, head_dim, length)
    freqs = torch.arange(length, device=device).float()[:, None] * inv.to(device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def _inverse_frequencies(rope: dict, head_dim: int, length: int) -> tuple[torch.Tensor, float]:
    """[rotary dims / 2] and the factor cos and sin are scaled by."""
    dim = int(head_dim * rope["partial_rotary_factor"])
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    kind = rope["rope_type"]
    if kind == "longrope":
        return _longrope(rope, exponents, length)
    inv = 1.0 / (rope["rope_theta"] ** exponents)
    if kind == "linear":
        inv = inv / float(rope["factor"])
    elif kind == "llama3":
        inv = _llama3(inv, rope)
    return inv, 1.0


def _longrope(rope: dict, exponents: torch.Tensor, length: int) -> tuple[torch.Tensor, float]:
    """Per-dim rescaled frequencies (short factors within the pretraining context, long beyond it); cos and sin
    grow by sqrt(1 + ln(factor) / ln(pretraining context)) unless the config gives `attention_factor`."""
    context = float(rope["original_max_position_embeddings"])
    factor = rope.get("factor")
    if factor is None:
        factor = float(rope.get("max_position_embeddings") or context) / context
    scaling = rope.get("attention_factor")
    if scaling is None:
        scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(context))
    chosen = rope["long_factor"] if length > context else rope["short_factor"]
    if len(chosen) != len(exponents):
        raise PlanError(f"config.json: longrope factors need {len(exponents)} entries (half the rotary dims), "
                        f"got {len(chosen)}")
    return 1.0 / (torch.tensor(chosen, dtype=torch.float32) * rope["rope_theta"] ** exponents), float(scaling)


def _llama3(inv: torch.Tensor, rope: dict) -> torch.Tensor:
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_context = float(rope["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
