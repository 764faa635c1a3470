"""Rotary position embeddings: the config's RoPE parameters read into one plain dict, and the cos/sin tables.

Configs spell RoPE several ways (`rope_parameters`, the older `rope_theta` /
`rope_scaling`, Phi-3's `su`); `parameters` reads any of them into
`{"rope_type", "rope_theta", "partial_rotary_factor", ...the type's own keys}`
and refuses, naming what is supported, a type the forward does not compute.
`tables` computes what transformers' rotary embedding module returns.
"""
from __future__ import annotations

import math

import torch

from recipekit.engine.errors import PlanError

# the keys each RoPE type needs besides rope_theta
_NEEDS = {"default": (), "linear": ("factor",),
          "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
          "longrope": ("short_factor", "long_factor", "original_max_position_embeddings")}


def parameters(rope: dict | None, config: dict, *, kinds: tuple[str, ...], theta: float = 10000.0,
               partial: bool = False) -> dict:
    """The RoPE dict `rope` (from the config, or None) completed from `config`: the type (`rope_type` or the older
    `type`), `rope_theta` (else the config's, else `theta`), `partial_rotary_factor` (only where the family
    rotates part of each head, `partial`), and for longrope the context lengths. `PlanError` when the type is
    not in `kinds` or lacks a key it needs."""
    out = dict(rope or {})
    kind = out.get("rope_type", out.get("type", "default"))
    if kind in ("su", "yarn") and "longrope" in kinds:  # Phi-3's older names for longrope, as transformers reads them
        kind = "longrope"
    factor = out.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if kind not in kinds:
        raise PlanError(f"RoPE type {kind!r} is not supported by the streamed forward for model type "
                        f"{config.get('model_type')!r} (supported RoPE types: {', '.join(kinds)})")
    if not isinstance(factor, (int, float)) or (factor != 1.0 and not partial):
        raise PlanError(f"partial_rotary_factor {factor!r} is not supported by the streamed forward for model type "
                        f"{config.get('model_type')!r} (supported: 1.0, every dim rotates)")
    if kind == "longrope":  # transformers prefers the config's own pretraining length to the rope dict's
        out["original_max_position_embeddings"] = config.get("original_max_position_embeddings",
                                                             out.get("original_max_position_embeddings"))
        out.setdefault("max_position_embeddings", config.get("max_position_embeddings"))
    missing = [key for key in _NEEDS[kind] if out.get(key) is None]
    if missing:
        raise PlanError(f"config.json: RoPE type {kind!r} needs {', '.join(missing)}")
    out.update(rope_type=kind, rope_theta=float(out.get("rope_theta", config.get("rope_theta") or theta)),
               partial_rotary_factor=float(factor))
    return out


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
