"""The Llama family's forward math, as pure functions of tensors: Llama, Mistral, Qwen2, Qwen3, their MoE forms
(Mixtral, Qwen2-MoE, Qwen3-MoE), Phi-3 and OLMo 2.

The members differ only by flags of `LlamaSpec`: Phi-3 fuses q/k/v into
`qkv_proj` and gate/up into `gate_up_proj` (split here, in the math, so the
stored tensors are read as they are) and may rotate part of each head or use
longrope; OLMo 2 normalises the attention and MLP outputs instead of their
inputs, and q/k over the whole projection. `decoder_layer` runs one layer on
a micro-batch given that layer's weights (by the name after `layers.<i>.`),
in the hidden states' dtype (float32). Matches transformers in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from recipekit.engine.core.added_modules import AddedModules
from recipekit.engine.core.architectures import layer_config, materialise
from recipekit.engine.core.moe_layouts import LAYOUTS
from recipekit.engine.core.names import DOWN, GATE, MLP_TENSORS, UP
from recipekit.engine.core.words import counted
from recipekit.engine.errors import PlanError
from recipekit.engine.forward import rope as rotary
from recipekit.engine.forward.blocks import Observe, Rope, apply_rope, attend, linear, rms_norm
from recipekit.engine.forward.support import forward_type, llama_rope, number
from recipekit.engine.modeling import streamed as added_modules

Expected = dict[str, tuple[tuple[int, ...] | None, str]]  # tensor -> (its shape, or None for any; the config's why)


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
    rope: dict  # as `support.rope_parameters` reads it
    experts_per_token: int = 0  # MoE: top-k
    norm_topk: bool = False  # MoE: renormalise the top-k routing weights
    fused: bool = False  # Phi-3: qkv_proj and gate_up_proj
    post_norms: bool = False  # OLMo 2: norms after attention and MLP, q/k norms over the whole projection
    embed_scale: float = 1.0
    added: AddedModules | None = None  # the modules add_modules put into every layer
    score_copies = 0  # (not a field) [B, heads, T, T] attention scores held: none, the fused kernel makes none

    @classmethod
    def from_config(cls, config: dict) -> LlamaSpec:
        """Raise `PlanError` naming what is supported when the config is not of the Llama family."""
        c = materialise(layer_config(config))
        model_type = forward_type(c)
        try:
            heads, hidden, layers = int(c["num_attention_heads"]), int(c["hidden_size"]), int(c["num_hidden_layers"])
        except (KeyError, TypeError, ValueError):
            raise PlanError("config.json lacks hidden_size, num_attention_heads or num_hidden_layers") from None
        window = c.get("sliding_window")
        if model_type == "mistral" or (model_type in ("mixtral", "phi3") and window):
            sliding = tuple(window for _ in range(layers))
        elif model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and isinstance(c.get("layer_types"), list):
            sliding = tuple(window if t == "sliding_attention" else None for t in c["layer_types"])
        else:
            sliding = tuple(None for _ in range(layers))
        try:
            spec = cls(
                model_type=model_type, hidden=hidden, heads=heads,
                kv_heads=number(c, "num_key_value_heads", heads, int),
                head_dim=number(c, "head_dim", hidden // max(heads, 1), int),
                eps=number(c, "rms_norm_eps", 1e-6, float),
                tied=bool(c.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
                sliding=sliding, rope=llama_rope(c),
                experts_per_token=number(c, "num_experts_per_tok", 0, int) if model_type in LAYOUTS else 0,
                norm_topk=model_type == "mixtral" or bool(c.get("norm_topk_prob", False)),
                fused=model_type == "phi3", post_norms=model_type == "olmo2", added=AddedModules.from_config(c),
            )
        except (TypeError, ValueError) as e:
            raise PlanError(f"config.json: {e}") from None
        check_heads(spec)
        return spec

    def rope_tables(self, length: int, device: torch.device) -> list[Rope]:
        """Per layer, cos and sin [length, rotary dims] (one table, shared by every layer)."""
        table = rotary.tables(self.rope, self.head_dim, length, device)
        return [table for _ in self.sliding]

    def final_norm(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden, weight, self.eps)

    def logits(self, states: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """[..., C] states, [vocab, C] head -> [..., vocab]."""
        return states @ head.T

    def layer_tensors(self, layer: int, shapes: dict[str, tuple[int, ...]], at: str) -> Expected:
        """What layer `layer` must hold, given what it does hold (`shapes`, by the name after `at`), with the
        shapes the config implies; `PlanError` when an MoE layer's experts and router do not fit together."""
        q, kv, hidden = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden
        heads = f"num_attention_heads {self.heads} x head_dim {self.head_dim}, hidden_size {hidden}"
        kv_heads = f"num_key_value_heads {self.kv_heads} x head_dim {self.head_dim}, hidden_size {hidden}"
        width = (f"hidden_size {hidden}",)
        norms = ("post_attention_layernorm", "post_feedforward_layernorm") if self.post_norms else (
            "input_layernorm", "post_attention_layernorm")
        out: Expected = {f"{n}.weight": ((hidden,), width[0]) for n in norms}
        if self.fused:
            out["self_attn.qkv_proj.weight"] = ((q + 2 * kv, hidden), f"{heads}; {kv_heads}")
        else:
            out["self_attn.q_proj.weight"] = ((q, hidden), heads)
            out.update({f"self_attn.{p}.weight": ((kv, hidden), kv_heads) for p in ("k_proj", "v_proj")})
        out["self_attn.o_proj.weight"] = ((hidden, q), heads)
        if self.added is not None:
            out.update({rest: (shape, f"added_modules, hidden_size {hidden}")
                        for rest, (shape, _) in self.added.tensors(hidden).items()})
        if self.post_norms:
            out["self_attn.q_norm.weight"] = ((q,), f"num_attention_heads {self.heads} x head_dim {self.head_dim}")
            out["self_attn.k_norm.weight"] = ((kv,), f"num_key_value_heads {self.kv_heads} x head_dim {self.head_dim}")
        layout = LAYOUTS.get(self.model_type)
        if layout is not None and layout.router in shapes:
            experts = shapes[layout.router][0]
            missing = [layout.expert_tensor(e, t) for e in range(experts) for t in MLP_TENSORS
                       if layout.expert_tensor(e, t) not in shapes]
            if missing:
                raise PlanError(f"layer {layer} has a router for {counted(experts, 'expert')} but no {at}{missing[0]}")
            if not 0 < self.experts_per_token <= experts:
                raise PlanError(f"config.json: num_experts_per_tok {self.experts_per_token} must lie in 1..{experts}, "
                                f"the experts of layer {layer}")
            out[layout.router] = (None, "")
        elif layout is not None and any(".experts." in rest for rest in shapes):
            raise PlanError(f"layer {layer} has experts but no router ({at}{layout.router})")
        elif self.fused:
            inner = shapes.get(DOWN, (0, 0))[-1]
            out["mlp.gate_up_proj.weight"] = ((2 * inner, hidden),
                                              f"twice {DOWN}'s inputs ({inner}), hidden_size {hidden}")
            out[DOWN] = (None, "")
        else:
            out.update({name: (None, "") for name in MLP_TENSORS})
        return out


def check_heads(spec) -> None:
    """The attention sizes of a spec must be positive and the query heads a multiple of the key/value heads."""
    if min(spec.hidden, spec.heads, spec.kv_heads, spec.head_dim) <= 0:
        raise PlanError(f"config.json: hidden_size {spec.hidden}, num_attention_heads {spec.heads}, "
                        f"num_key_value_heads {spec.kv_heads} and head_dim {spec.head_dim} must all be positive")
    if spec.heads % spec.kv_heads:
        raise PlanError(f"config.json: num_attention_heads {spec.heads} is not a multiple of "
                        f"num_key_value_heads {spec.kv_heads}")


def decoder_layer(spec: LlamaSpec, layer: int, weights: dict[str, torch.Tensor], hidden: torch.Tensor,
                  mask: torch.Tensor, rope: Rope, observe: Observe) -> torch.Tensor:
    """One decoder layer: hidden [B, T, C] -> [B, T, C]; `mask` from `blocks.attention_mask`, [B, 1, T, T];
    `rope` this layer's cos and sin."""
    observe("residual", hidden)
    x = hidden if spec.post_norms else rms_norm(hidden, weights["input_layernorm.weight"], spec.eps)
    x = added_modules.attention_input(spec.added, weights, x, mask)
    observe("attn_in", x)
    attended = linear(_attention(spec, weights, x, mask, rope), weights, "self_attn.o_proj")
    if spec.post_norms:
        attended = rms_norm(attended, weights["post_attention_layernorm.weight"], spec.eps)
    hidden = hidden + attended
    x = hidden if spec.post_norms else rms_norm(hidden, weights["post_attention_layernorm.weight"], spec.eps)
    x = added_modules.mlp_input(spec.added, weights, x)
    observe("mlp_in", x)
    if spec.model_type in LAYOUTS and LAYOUTS[spec.model_type].router in weights:
        return hidden + _moe_block(spec, weights, x, observe)
    gated = _swiglu(spec, weights, x)
    observe("down_in", gated)
    down = linear(gated, weights, "mlp.down_proj")
    observe("down_out", down)
    if spec.post_norms:
        down = rms_norm(down, weights["post_feedforward_layernorm.weight"], spec.eps)
    return hidden + added_modules.mlp_output(spec.added, weights, down)


def _swiglu(spec: LlamaSpec, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up [B, T, intermediate]. The gate projection is not kept by a name: it is freed as soon as
    silu has read it, so three [B, T, intermediate] tensors are held at most (Phi-3's fused output counts two)."""
    if spec.fused:  # Phi-3: gate_up_proj holds the gate's rows, then the up projection's
        gate, up = linear(x, weights, "mlp.gate_up_proj").chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.silu(linear(x, weights, "mlp.gate_proj")) * linear(x, weights, "mlp.up_proj")


def _attention(spec: LlamaSpec, weights: dict[str, torch.Tensor], x: torch.Tensor, mask: torch.Tensor,
               rope: Rope) -> torch.Tensor:
    """Self-attention of the normed input x [B, T, C] -> [B, T, heads * head_dim], before o_proj."""
    batch, length, _ = x.shape
    q_size, kv_size = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    if spec.fused:
        q, k, v = linear(x, weights, "self_attn.qkv_proj").split((q_size, kv_size, kv_size), dim=-1)
    else:
        q, k, v = (linear(x, weights, f"self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj"))
    if spec.post_norms:  # OLMo 2: one norm over the whole projection, before the split into heads
        q = rms_norm(q, weights["self_attn.q_norm.weight"], spec.eps)
        k = rms_norm(k, weights["self_attn.k_norm.weight"], spec.eps)
    q = q.view(batch, length, spec.heads, spec.head_dim)
    k, v = (t.view(batch, length, spec.kv_heads, spec.head_dim) for t in (k, v))
    if not spec.post_norms and "self_attn.q_norm.weight" in weights:  # Qwen3: RMSNorm over each head
        q = rms_norm(q, weights["self_attn.q_norm.weight"], spec.eps)
        k = rms_norm(k, weights["self_attn.k_norm.weight"], spec.eps)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return attend(apply_rope(q, rope), apply_rope(k, rope), v, mask, scale=spec.head_dim ** -0.5)


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
            y = linear(F.silu(linear(part, weights, gate)) * linear(part, weights, up), weights, down)
            out = out.index_add(0, tokens, y * top[tokens, slot, None])
    out = out.reshape(x.shape)
    if layout.shared_gate is not None and layout.shared_gate in weights:
        gate, up, down = (layout.shared_tensor(t).removesuffix(".weight") for t in (GATE, UP, DOWN))
        shared = linear(F.silu(linear(x, weights, gate)) * linear(x, weights, up), weights, down)
        out = out + torch.sigmoid(linear(x, weights, layout.shared_gate.removesuffix(".weight"))) * shared
    return out
