"""The Gemma family's forward math (Gemma 2, Gemma 3 text, and the language model of a multimodal Gemma 3), as
pure functions of tensors.

Where Gemma differs from Llama: the embeddings are scaled by sqrt(hidden_size)
(rounded to the embedding's dtype, as transformers does), norm weights are
stored as w - 1, every layer normalises its attention and MLP inputs and
outputs (four norms), the MLP is GeGLU (tanh-approximated GELU), queries are
scaled by `query_pre_attn_scalar`, and sliding-window and full-attention
layers alternate (`layer_types`). Gemma 2 soft-caps attention scores and the
final logits; Gemma 3 instead normalises each query and key head, and rotates
sliding layers with a local RoPE base and full layers with the global one
(which alone takes `rope_scaling`). Matches transformers in float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from recipekit.engine.core.architectures import layer_config, materialise
from recipekit.engine.core.names import MLP_TENSORS
from recipekit.engine.errors import PlanError
from recipekit.engine.forward import rope as rotary
from recipekit.engine.forward.blocks import Observe, Rope, apply_rope, attend, linear, rms_norm
from recipekit.engine.forward.llama import Expected, check_heads
from recipekit.engine.forward.support import FULL, SLIDING, forward_type, gemma_activation, gemma_ropes, number

NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


@dataclass(frozen=True)
class GemmaSpec:
    model_type: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    tied: bool
    layer_types: tuple[str, ...]  # per layer: sliding_attention or full_attention
    sliding: tuple[int | None, ...]  # per layer: the window, or None for full attention
    ropes: dict  # layer type -> RoPE parameters, as `support.gemma_ropes` reads them
    scale: float  # of the attention scores: query_pre_attn_scalar ** -0.5
    attn_softcap: float | None  # Gemma 2
    final_softcap: float | None
    approximate: str  # the GELU's
    qk_norm: bool  # Gemma 3
    embed_scale: float

    @classmethod
    def from_config(cls, config: dict) -> GemmaSpec:
        """Raise `PlanError` naming what is not supported (bidirectional attention, another activation or RoPE)."""
        c = materialise(layer_config(config))
        model_type = forward_type(c)
        try:
            heads, hidden = int(c["num_attention_heads"]), int(c["hidden_size"])
            types = tuple(str(t) for t in c["layer_types"])
        except (KeyError, TypeError, ValueError):
            raise PlanError("config.json lacks hidden_size, num_attention_heads or num_hidden_layers") from None
        approximate = gemma_activation(c)
        gemma3 = model_type != "gemma2"
        try:
            window = number(c, "sliding_window", 4096, int)
            head_dim = number(c, "head_dim", hidden // max(heads, 1), int)
            spec = cls(
                model_type=model_type, hidden=hidden, heads=heads,
                kv_heads=number(c, "num_key_value_heads", heads, int), head_dim=head_dim,
                eps=number(c, "rms_norm_eps", 1e-6, float),
                tied=bool(c.get("tie_word_embeddings", config.get("tie_word_embeddings", True))),
                layer_types=types, sliding=tuple(window if t == SLIDING else None for t in types),
                ropes=gemma_ropes(c),
                scale=number(c, "query_pre_attn_scalar", 256, float) ** -0.5,
                attn_softcap=None if gemma3 else _softcap(c, "attn_logit_softcapping", 50.0),
                final_softcap=_softcap(c, "final_logit_softcapping", None if gemma3 else 30.0),
                approximate=approximate, qk_norm=gemma3, embed_scale=math.sqrt(hidden),
            )
        except (TypeError, ValueError) as e:
            raise PlanError(f"config.json: {e}") from None
        check_heads(spec)
        return spec

    @property
    def score_copies(self) -> int:
        """[B, heads, T, T] attention scores held at once: two (the capped scores and their softmax, each made from
        the last, measured) where Gemma 2 soft-caps them; none where the fused kernel runs (Gemma 3)."""
        return 0 if self.attn_softcap is None else 2

    def rope_tables(self, length: int, device: torch.device) -> list[Rope]:
        """Per layer, cos and sin [length, head_dim]: the local table for sliding layers, the global one for full."""
        tables = {kind: rotary.tables(rope, self.head_dim, length, device) for kind, rope in self.ropes.items()}
        return [tables[FULL if kind == FULL else SLIDING] for kind in self.layer_types]

    def final_norm(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden, weight, self.eps, offset=1.0)

    def logits(self, states: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """[..., C] states, [vocab, C] head -> [..., vocab], soft-capped where the config says so."""
        logits = states @ head.T
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def layer_tensors(self, layer: int, shapes: dict[str, tuple[int, ...]], at: str) -> Expected:
        """What every layer must hold, with the shapes the config implies (the MLP's width is the model's own)."""
        q, kv, hidden = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden
        heads = f"num_attention_heads {self.heads} x head_dim {self.head_dim}, hidden_size {hidden}"
        kv_heads = f"num_key_value_heads {self.kv_heads} x head_dim {self.head_dim}, hidden_size {hidden}"
        out: Expected = {f"{n}.weight": ((hidden,), f"hidden_size {hidden}") for n in NORMS}
        out["self_attn.q_proj.weight"] = ((q, hidden), heads)
        out.update({f"self_attn.{p}.weight": ((kv, hidden), kv_heads) for p in ("k_proj", "v_proj")})
        out["self_attn.o_proj.weight"] = ((hidden, q), heads)
        if self.qk_norm:
            out.update({f"self_attn.{n}.weight": ((self.head_dim,), f"head_dim {self.head_dim}")
                        for n in ("q_norm", "k_norm")})
        out.update({name: (None, "") for name in MLP_TENSORS})
        return out


def _softcap(c: dict, key: str, default: float | None) -> float | None:
    """The soft cap the config sets (null: none), `default` where it leaves the key out."""
    if key not in c:
        return default
    return None if c[key] is None else number(c, key, 0.0, float)


def decoder_layer(spec: GemmaSpec, layer: int, weights: dict[str, torch.Tensor], hidden: torch.Tensor,
                  mask: torch.Tensor, rope: Rope, observe: Observe) -> torch.Tensor:
    """One decoder layer: hidden [B, T, C] -> [B, T, C]; `mask` from `blocks.attention_mask` with this layer's
    window, [B, 1, T, T]; `rope` this layer's cos and sin."""
    observe("residual", hidden)
    x = _norm(spec, hidden, weights, "input_layernorm")
    observe("attn_in", x)
    attended = linear(_attention(spec, weights, x, mask, rope), weights, "self_attn.o_proj")
    hidden = hidden + _norm(spec, attended, weights, "post_attention_layernorm")
    x = _norm(spec, hidden, weights, "pre_feedforward_layernorm")
    observe("mlp_in", x)
    gated = F.gelu(linear(x, weights, "mlp.gate_proj"), approximate=spec.approximate) * linear(
        x, weights, "mlp.up_proj")
    observe("down_in", gated)
    down = linear(gated, weights, "mlp.down_proj")
    observe("down_out", down)
    return hidden + _norm(spec, down, weights, "post_feedforward_layernorm")


def _norm(spec: GemmaSpec, x: torch.Tensor, weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return rms_norm(x, weights[f"{name}.weight"], spec.eps, offset=1.0)


def _attention(spec: GemmaSpec, weights: dict[str, torch.Tensor], x: torch.Tensor, mask: torch.Tensor,
               rope: Rope) -> torch.Tensor:
    """Self-attention of the normed input x [B, T, C] -> [B, T, heads * head_dim], before o_proj."""
    batch, length, _ = x.shape
    q = linear(x, weights, "self_attn.q_proj").view(batch, length, spec.heads, spec.head_dim)
    k, v = (linear(x, weights, f"self_attn.{p}").view(batch, length, spec.kv_heads, spec.head_dim)
            for p in ("k_proj", "v_proj"))
    if spec.qk_norm:  # Gemma 3: RMSNorm over each head, before RoPE
        q = _norm(spec, q, weights, "self_attn.q_norm")
        k = _norm(spec, k, weights, "self_attn.k_norm")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return attend(apply_rope(q, rope), apply_rope(k, rope), v, mask, scale=spec.scale, softcap=spec.attn_softcap)
