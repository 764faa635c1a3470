"""Tensor names inside a dense decoder layer of the Llama family, written once.

The Mixture-of-Experts layouts (expert, router and shared-expert names) are in `moe_layouts`.
"""
from __future__ import annotations

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PROJECTIONS = ATTENTION + MLP  # every weight matrix of a dense layer

ATTENTION_WEIGHTS = tuple(f"{m}.weight" for m in ATTENTION)
ATTENTION_BIASES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
MLP_TENSORS = tuple(f"{m}.weight" for m in MLP)  # the dense MLP: what becomes one expert
GATE, UP, DOWN = MLP_TENSORS
