"""The Llama family's forward math (Llama, Mistral, Qwen2, Qwen3 and their MoE forms Mixtral, Qwen2-MoE,
Qwen3-MoE), as pure functions of tensors.

`LlamaSpec` reads what the math needs from a config dict; `decoder_layer`
runs one layer on a micro-batch given that layer's weights (by the name
after `layers.<i>.`), in the hidden states' dtype (float32): weights may be
held in a narrower dtype and are upcast one at a time. Matches transformers'
implementation in float32.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from recipekit.engine.core.added_modules import AddedModules
from recipekit.engine.core.architectures import layer_config, materialise
from recipekit.engine.core.moe_layouts import LAYOUTS
from recipekit.engine.core.names import DOWN, GATE, UP
from recipekit.engine.errors import PlanError
from recipekit.engine.forward.support import forward_type
from recipekit.engine.modeling import streamed as added_modules

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class LlamaSpec:
    model_type: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    tied: bool
    sliding: tuple[int | None, ...]  # per layer: the window, or None for full attention
    rope_theta: float
    rope: dict
    experts_per_token: int = 0  # MoE: top-k
    norm_topk: bool = False  # MoE: renormalise the top-k routing weights
    added: AddedModules | None = None  # the modules add_modules put into every layer

    @classmethod
    def from_config(cls, config: dict) -> LlamaSpec:
        """Raise `PlanError` naming what is supported when the config is not of the Llama family."""
        c = materialise(layer_config(config))
        model_type = forward_type(c)
        try:
            heads, hidden, layers = int(c["num_attention_heads"]), int(c["hidden_size"]), int(c["num_hidden_layers"])
        except (KeyError, TypeError, ValueError):
            raise PlanError("config.json lacks hidden_size, num_attention_heads or num_hidden_layers") from None
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES or rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise PlanError(f"RoPE type {rope_type!r} is not supported by the streamed forward "
                            f"(supported: {', '.join(ROPE_TYPES)})")
        window = c.get("sliding_window")
        if model_type == "mistral" or (model_type == "mixtral" and window):
            sliding = tuple(window for _ in range(layers))
        elif model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and isinstance(c.get("layer_types"), list):
            sliding = tuple(window if t == "sliding_attention" else None for t in c["layer_types"])
        else:
            sliding = tuple(None for _ in range(layers))
        try:
            spec = cls(
                model_type=model_type, hidden=hidden, heads=heads,
                kv_heads=_number(c, "num_key_value_heads", heads, int),
                head_dim=_number(c, "head_dim", hidden // max(heads, 1), int),
                eps=_number(c, "rms_norm_eps", 1e-6, float),
                tied=bool(c.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
                sliding=sliding,
                rope_theta=float(rope.get("rope_theta", _number(c, "rope_theta", 10000.0, float))),
                rope={**rope, "rope_type": rope_type},
                experts_per_token=_number(c, "num_experts_per_tok", 0, int) if model_type in LAYOUTS else 0,
                norm_topk=model_type == "mixtral" or bool(c.get("norm_topk_prob", False)),
                added=AddedModules.from_config(c),
            )
        except (TypeError, ValueError) as e:
            raise PlanError(f"config.json: {e}") from None
        if min(spec.hidden, spec.heads, spec.kv_heads, spec.head_dim) <= 0:
            raise PlanError(f"config.json: hidden_size {spec.hidden}, num_attention_heads {spec.heads}, "
                            f"num_key_value_heads {spec.kv_heads} and head_dim {spec.head_dim} must all be positive")
        if spec.heads % spec.kv_heads:
            raise PlanError(f"config.json: num_attention_heads {spec.heads} is not a multiple of "
                            f"num_key_value_heads {spec.kv_heads}")
        return spec

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies, [head_dim / 2], as transformers computes them."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        kind = self.rope["rope_type"]
        if kind == "linear":
            inv = inv / float(self.rope["factor"])
        elif kind == "llama3":
            inv = _llama3_inv_freq(inv, self.rope)
        return inv


def _number(config: dict, key: str, default: float, kind: type) -> float:
    """A number of the config (`default` when absent or null); text or a boolean where a number belongs is a
    ValueError naming the key."""
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ValueError(f"{key} should be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _llama3_inv_freq(inv: torch.Tensor, rope: dict) -> torch.Tensor:
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_context = float(rope["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(spec: LlamaSpec, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [length, head_dim], for positions 0..length-1."""
    positions = torch.arange(length, device=device).float()
    freqs = positions[:, None] * spec.inv_freq().to(device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """[..., C] -> [..., C]."""
    return weight.to(x.dtype) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_mask(valid: torch.Tensor, window: int | None) -> torch.Tensor:
    """valid: [B, T] bool -> [B, 1, T, T] bool, True where query i may attend key j."""
    length = valid.shape[1]
    i = torch.arange(length, device=valid.device)[:, None]
    j = torch.arange(length, device=valid.device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    return allowed[None, None] & valid[:, None, None, :]


def _linear(x: torch.Tensor, weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """x @ W.T + b in x's dtype; weights are held in their stored dtype and upcast here, one at a time."""
    bias = weights.get(f"{name}.bias")
    return F.linear(x, weights[f"{name}.weight"].to(x.dtype), bias.to(x.dtype) if bias is not None else None)


Observe = Callable[[str, torch.Tensor], None]


def decoder_layer(spec: LlamaSpec, layer: int, weights: dict[str, torch.Tensor], hidden: torch.Tensor,
                  mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, observe: Observe) -> torch.Tensor:
    """One decoder layer: hidden [B, T, C] -> [B, T, C]; `mask` from `attention_mask`, [B, 1, T, T]."""
    batch, length, _ = hidden.shape
    observe("residual", hidden)
    x = rms_norm(hidden, weights["input_layernorm.weight"], spec.eps)
    x = added_modules.attention_input(spec.added, weights, x, mask)
    observe("attn_in", x)
    q = _linear(x, weights, "self_attn.q_proj").view(batch, length, spec.heads, spec.head_dim)
    k = _linear(x, weights, "self_attn.k_proj").view(batch, length, spec.kv_heads, spec.head_dim)
    v = _linear(x, weights, "self_attn.v_proj").view(batch, length, spec.kv_heads, spec.head_dim)
    if "self_attn.q_norm.weight" in weights:  # Qwen3: RMSNorm over each head before RoPE
        q = rms_norm(q, weights["self_attn.q_norm.weight"], spec.eps)
        k = rms_norm(k, weights["self_attn.k_norm.weight"], spec.eps)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    groups = spec.heads // spec.kv_heads
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=spec.head_dim ** -0.5)
    attended = attended.transpose(1, 2).reshape(batch, length, spec.heads * spec.head_dim)
    hidden = hidden + _linear(attended, weights, "self_attn.o_proj")
    x = rms_norm(hidden, weights["post_attention_layernorm.weight"], spec.eps)
    x = added_modules.mlp_input(spec.added, weights, x)
    observe("mlp_in", x)
    if spec.model_type in LAYOUTS and LAYOUTS[spec.model_type].router in weights:
        return hidden + _moe_block(spec, weights, x, observe)
    gated = F.silu(_linear(x, weights, "mlp.gate_proj")) * _linear(x, weights, "mlp.up_proj")
    observe("down_in", gated)
    down = _linear(gated, weights, "mlp.down_proj")
    observe("down_out", down)
    return hidden + added_modules.mlp_output(spec.added, weights, down)


def _moe_block(spec: LlamaSpec, weights: dict[str, torch.Tensor], x: torch.Tensor, observe: Observe) -> torch.Tensor:
    """A sparse MoE MLP: softmax router, top-k experts (weights renormalised when `norm_topk`), plus Qwen2-MoE's
    sigmoid-gated shared expert. Observers see `router` (the router logits, [b, T, experts])."""
    layout = LAYOUTS[spec.model_type]
    logits = F.linear(x, weights[layout.router].to(x.dtype))
    observe("router", logits)
    probs = torch.softmax(logits.float(), dim=-1)
    top, chosen = probs.topk(spec.experts_per_token, dim=-1)
    if spec.norm_topk:
        top = top / top.sum(dim=-1, keepdim=True)
    flat, out = x.reshape(-1, x.shape[-1]), torch.zeros_like(x).reshape(-1, x.shape[-1])
    chosen, top = chosen.reshape(flat.shape[0], -1), top.reshape(flat.shape[0], -1).to(x.dtype)
    for e in range(logits.shape[-1]):
        tokens, slot = torch.where(chosen == e)
        if tokens.numel():
            gate, up, down = (layout.expert_tensor(e, t).removesuffix(".weight") for t in (GATE, UP, DOWN))
            part = flat[tokens]
            y = _linear(F.silu(_linear(part, weights, gate)) * _linear(part, weights, up), weights, down)
            out.index_add_(0, tokens, y * top[tokens, slot, None])
    out = out.reshape(x.shape)
    if layout.shared_gate is not None and layout.shared_gate in weights:
        gate, up, down = (layout.shared_tensor(t).removesuffix(".weight") for t in (GATE, UP, DOWN))
        shared = _linear(F.silu(_linear(x, weights, gate)) * _linear(x, weights, up), weights, down)
        out = out + torch.sigmoid(_linear(x, weights, layout.shared_gate.removesuffix(".weight"))) * shared
    return out
