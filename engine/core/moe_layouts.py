"""Mixture-of-Experts output layouts: tensor names and config keys of Mixtral, Qwen2-MoE and Qwen3-MoE.

Names are the per-expert on-disk layout that transformers 4 and 5 both load
(`...experts.3.w1.weight`, `...mlp.experts.3.gate_proj.weight`).
"""
from __future__ import annotations

from dataclasses import dataclass

from recipekit.engine.core.names import MLP_TENSORS


@dataclass(frozen=True)
class Layout:
    """One MoE architecture as transformers names it."""

    name: str
    architecture: str
    experts_prefix: str  # the experts of layer i are `<prefix>.layers.i.<experts_prefix>.<k>.<...>`
    expert_names: dict[str, str]  # dense MLP tensor -> name inside one expert
    router: str
    shared_prefix: str | None  # where a shared expert's MLP goes, when the layout has one
    shared_gate: str | None
    bases: tuple[str, ...]  # model types whose attention this layout can hold
    attention_bias: str  # "none": the layout has no q/k/v bias; "always": it needs one; "optional"

    def expert_tensor(self, k: int, mlp_tensor: str) -> str:
        return f"{self.experts_prefix}.{k}.{self.expert_names[mlp_tensor]}"

    def shared_tensor(self, mlp_tensor: str) -> str:
        return f"{self.shared_prefix}.{mlp_tensor.removeprefix('mlp.')}"

    def config(self, base: dict, *, experts: int, per_token: int, intermediate: int, shared_intermediate: int,
               norm_topk_prob: bool, layer_types: list[str] | None, attention_bias: bool) -> dict:
        """The output config: the base's, retyped, with this layout's MoE keys."""
        config = {k: v for k, v in base.items() if k not in _DENSE_ONLY_KEYS}
        rope = config.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config:
            # transformers 4 reads `rope_theta`, and the MoE families default it differently (Mixtral: 1e6)
            config["rope_theta"] = rope["rope_theta"]
        config["model_type"] = self.name
        config["architectures"] = [self.architecture]
        config["num_experts_per_tok"] = per_token
        config["intermediate_size"] = intermediate
        if self.name == "mixtral":
            config["num_local_experts"] = experts
            config.setdefault("sliding_window", None)
            return config
        config.update(num_experts=experts, moe_intermediate_size=intermediate, decoder_sparse_step=1,
                      mlp_only_layers=[], norm_topk_prob=norm_topk_prob, use_sliding_window=False)
        if layer_types is not None:
            config["layer_types"] = layer_types
        if self.name == "qwen2_moe":
            config.update(shared_expert_intermediate_size=shared_intermediate, qkv_bias=True)
        else:
            config["attention_bias"] = attention_bias
        return config


# keys of dense configs that mean something else, or nothing, in the MoE families
_DENSE_ONLY_KEYS = ("mlp_bias", "pretraining_tp", "max_window_layers", "use_sliding_window", "num_local_experts",
                    "num_experts")

_QWEN_EXPERT = {t: t.removeprefix("mlp.") for t in MLP_TENSORS}

LAYOUTS = {
    "mixtral": Layout(
        name="mixtral", architecture="MixtralForCausalLM", experts_prefix="block_sparse_moe.experts",
        expert_names={"mlp.gate_proj.weight": "w1.weight", "mlp.down_proj.weight": "w2.weight",
                      "mlp.up_proj.weight": "w3.weight"},
        router="block_sparse_moe.gate.weight", shared_prefix=None, shared_gate=None,
        bases=("llama", "mistral"), attention_bias="none"),
    "qwen2_moe": Layout(
        name="qwen2_moe", architecture="Qwen2MoeForCausalLM", experts_prefix="mlp.experts",
        expert_names=_QWEN_EXPERT, router="mlp.gate.weight", shared_prefix="mlp.shared_expert",
        shared_gate="mlp.shared_expert_gate.weight", bases=("llama", "mistral", "qwen2"), attention_bias="always"),
    "qwen3_moe": Layout(
        name="qwen3_moe", architecture="Qwen3MoeForCausalLM", experts_prefix="mlp.experts",
        expert_names=_QWEN_EXPERT, router="mlp.gate.weight", shared_prefix=None, shared_gate=None,
        bases=("qwen3",), attention_bias="optional"),
}


def infer_layout(model_type: str, shared_expert: bool) -> tuple[str, str]:
    """The layout for a base of `model_type`, and why."""
    if model_type == "qwen3":
        return "qwen3_moe", "the base is a Qwen3 model (q/k norms)"
    if shared_expert:
        return "qwen2_moe", "a shared expert is given, and only qwen2_moe has one"
    if model_type == "qwen2":
        return "qwen2_moe", "the base is a Qwen2 model (attention biases)"
    return "mixtral", f"the base is a {model_type!r} model"
