"""Mixture of Experts: stack the MLPs of dense models as experts, then set the routers.

`stack_experts` renames tensors (experts stay byte copies unless noise or a
residual scale is asked for) and leaves every router unset; `init_gates`
sets them. The planner refuses a model whose routers are still unset, so a
zero router is never written by accident.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import Field

from recipekit.engine.architectures import layer_config, materialise
from recipekit.engine.errors import Path_, PlanError, Problem
from recipekit.engine.layers import decoder_of
from recipekit.engine.lineage import RELATED
from recipekit.engine.lazy import UNSET_ROUTER, Apply, ExpertPrompts, LazyModel, MoeInfo, Node, merge_sources
from recipekit.engine.probe import Probe
from recipekit.engine.schema import Ref, StepBase, Strict

from .moe_layouts import ATTENTION_BIASES, DOWN, LAYOUTS, MLP_TENSORS, infer_layout

LayoutName = Literal["mixtral", "qwen2_moe", "qwen3_moe"]


class ExpertSpec(Strict):
    """One expert: the model whose MLPs it takes, and the prompts that should be routed to it."""

    model: Ref = Field(description="The model (or step) whose MLP weights become this expert.")
    positive: list[str] = Field([], description="Prompts that should route to this expert (for prompt gates).")
    negative: list[str] = Field([], description="Prompts that should not route to this expert.")
    noise_scale: float | None = Field(None, ge=0, description="Add seeded normal noise of this standard deviation "
                                                              "to the expert's weights.")
    residual_scale: float | None = Field(None, description="Multiply the expert's down_proj (its contribution to "
                                                           "the residual stream) by this factor.")


class StackExperts(StepBase):
    """Build a Mixture of Experts: attention, norms and embeddings of `base`, one expert per entry of `experts`."""

    op: Literal["stack_experts"] = Field(description="Stack the MLPs of dense models as the experts of an MoE.")
    base: Ref = Field(description="The dense model giving attention, norms, embeddings and lm_head.")
    experts: list[ExpertSpec] = Field(min_length=1, description="The experts, in router order.")
    shared_expert: ExpertSpec | None = Field(None, description="An expert every token uses (qwen2_moe only), "
                                                               "scaled by its own sigmoid gate.")
    layout: LayoutName | None = Field(None, description="Output architecture; inferred from the base when absent.")
    experts_per_token: int = Field(2, ge=1, description="Experts each token is routed to (top-k).")
    norm_topk_prob: bool = Field(True, description="Renormalise the top-k routing weights to sum to 1 (Qwen "
                                                   "layouts; Mixtral always does).")
    seed: int = Field(0, ge=0, description="Seed of noise_scale noise.")

    def references(self) -> list[tuple[Path_, str]]:
        refs: list[tuple[Path_, str]] = [(("base",), self.base)]
        refs += [(("experts", k, "model"), e.model) for k, e in enumerate(self.experts)]
        if self.shared_expert is not None:
            refs.append((("shared_expert", "model"), self.shared_expert.model))
        return refs


def stack_experts(step: StackExperts, models: Mapping[str, LazyModel], probe: Probe) -> LazyModel:
    base = models[step.base]
    if layer_config(base.config) is not base.config:
        raise PlanError(Problem("stack_experts needs a text-only base model (this config has a text_config)",
                                path=("base",)))
    base_type = str(base.config.get("model_type"))
    messages: list[str] = []
    if step.layout is None:
        name, why = infer_layout(base_type, step.shared_expert is not None)
        messages.append(f"stack_experts: layout {name}, because {why} (set layout: to choose another)")
    else:
        name = step.layout
    layout = LAYOUTS[name]
    decoder = decoder_of(base, step.base)
    layers = decoder.layers
    _check_base(step, layout, base_type, layers)

    experts = [(spec, models[spec.model]) for spec in step.experts]
    if step.experts_per_token > len(experts):
        raise PlanError(Problem(f"experts_per_token is {step.experts_per_token}, but there are only "
                                f"{len(experts)} experts", path=("experts_per_token",)))
    if layout.name == "mixtral" and not step.norm_topk_prob:
        raise PlanError(Problem("mixtral always renormalises the top-k routing weights; norm_topk_prob: false "
                                "needs a qwen layout", path=("norm_topk_prob",)))
    base_mlp = [{t: base.tensors[layer[t]] for t in MLP_TENSORS} for layer in layers]
    expert_mlps = [_expert_mlp(spec.model, model, ("experts", k, "model"), base_mlp)
                   for k, (spec, model) in enumerate(experts)]
    messages += _same_weights(step, expert_mlps)
    messages += _other_bases(step, base, models, probe)

    mlp_names = {layer[t] for layer in layers for t in MLP_TENSORS}
    tensors: dict[str, Node] = {n: node for n, node in base.tensors.items() if n not in mlp_names}
    hidden = base_mlp[0]["mlp.gate_proj.weight"].shape[1]
    router_dtype = base_mlp[0]["mlp.gate_proj.weight"].dtype
    routers, shared_gates = [], []
    shared_mlp = None
    if step.shared_expert is not None:
        shared_model = models[step.shared_expert.model]
        shared_mlp = _expert_mlp(step.shared_expert.model, shared_model, ("shared_expert", "model"), base_mlp,
                                 same_intermediate=False)
    for i in range(len(layers)):
        prefix = f"{decoder.prefix}.{i}"
        for k, (spec, _) in enumerate(experts):
            for t in MLP_TENSORS:
                out = f"{prefix}.{layout.expert_tensor(k, t)}"
                tensors[out] = _adjust(expert_mlps[k][i][t], spec, t, out, step.seed)
        router = f"{prefix}.{layout.router}"
        tensors[router] = Apply(UNSET_ROUTER, (), (), router_dtype, (len(experts), hidden))
        routers.append(router)
        if layout.shared_prefix is not None:
            shared_gate = f"{prefix}.{layout.shared_gate}"
            shared_gates.append(shared_gate)
            if shared_mlp is None:
                # transformers always builds a shared expert: an empty one (intermediate size 0) adds nothing
                for t in MLP_TENSORS:
                    shape = (0, hidden) if t != DOWN else (hidden, 0)
                    tensors[f"{prefix}.{layout.shared_tensor(t)}"] = _zeros(router_dtype, shape)
                tensors[shared_gate] = _zeros(router_dtype, (1, hidden))
            else:
                for t in MLP_TENSORS:
                    out = f"{prefix}.{layout.shared_tensor(t)}"
                    tensors[out] = _adjust(shared_mlp[i][t], step.shared_expert, t, out, step.seed)
                tensors[shared_gate] = Apply(UNSET_ROUTER, (), (), router_dtype, (1, hidden))
        if layout.attention_bias == "always":
            for bias in ATTENTION_BIASES:
                weight = base.tensors[layers[i][bias.replace(".bias", ".weight")]]
                tensors.setdefault(f"{prefix}.{bias}", _zeros(weight.dtype, (weight.shape[0],)))

    intermediate = base_mlp[0]["mlp.gate_proj.weight"].shape[0]
    shared_intermediate = shared_mlp[0]["mlp.gate_proj.weight"].shape[0] if shared_mlp else 0
    config = layout.config(
        base.config, experts=len(experts), per_token=step.experts_per_token, intermediate=intermediate,
        shared_intermediate=shared_intermediate, norm_topk_prob=step.norm_topk_prob,
        layer_types=materialise(base.config).get("layer_types"),
        attention_bias=any(b in layers[0] for b in ATTENTION_BIASES))
    names = ", ".join(spec.model for spec in step.experts)
    info = MoeInfo(
        layout=layout.name, base_name=step.base, base=base,
        experts=tuple(ExpertPrompts(s.model, tuple(s.positive), tuple(s.negative)) for s in step.experts),
        shared=(ExpertPrompts(step.shared_expert.model, tuple(step.shared_expert.positive),
                              tuple(step.shared_expert.negative)) if step.shared_expert else None),
        routers=tuple(routers), shared_gates=tuple(shared_gates) if shared_mlp else ())
    all_models = [base] + [m for _, m in experts] + ([models[step.shared_expert.model]] if step.shared_expert else [])
    return base.evolve(
        config=config, tensors=tensors, sources=merge_sources(*all_models),
        notes=tuple(dict.fromkeys(base.notes + (
            f"stack_experts: {layout.name} with {len(experts)} experts ({names}), attention from {step.base}, "
            f"{step.experts_per_token} per token"
            + (f", shared expert {step.shared_expert.model}" if step.shared_expert else ""),))),
        tags=tuple(dict.fromkeys(base.tags + ("moe", "merge"))),
        messages=tuple(dict.fromkeys(base.messages + tuple(messages))),
        moe=info,
    )


def _check_base(step: StackExperts, layout, base_type: str, layers: tuple[dict[str, str], ...]) -> None:
    if base_type not in layout.bases:
        raise PlanError(Problem(f"layout {layout.name} cannot hold the attention of a {base_type!r} base "
                                f"(it takes {', '.join(layout.bases)})",
                                path=("layout",) if step.layout else ("base",)))
    for i, layer in enumerate(layers):
        missing = [t for t in MLP_TENSORS if t not in layer]
        if missing:
            raise PlanError(Problem(f"the base {step.base!r} has no dense MLP in layer {i} (missing {missing[0]}): "
                                    "is it already a Mixture of Experts?", path=("base",)))
        if layout.attention_bias == "none" and any(b in layer for b in ATTENTION_BIASES):
            raise PlanError(Problem(f"layout {layout.name} has no attention biases, but the base {step.base!r} "
                                    "has q/k/v biases: use layout: qwen2_moe", path=("layout",)))


def _expert_mlp(name: str, model: LazyModel, path: Path_, base_mlp: list[dict[str, Node]],
                same_intermediate: bool = True) -> list[dict[str, Node]]:
    """The MLP nodes of every layer of an expert model, checked against the base's shapes."""
    layers = decoder_of(model, name).layers
    if len(layers) != len(base_mlp):
        raise PlanError(Problem(f"expert {name!r} has {len(layers)} layers, the base has {len(base_mlp)}", path=path))
    mlp = []
    for i, layer in enumerate(layers):
        nodes = {}
        for t in MLP_TENSORS:
            if t not in layer:
                raise PlanError(Problem(f"expert {name!r} has no {t} in layer {i}: experts must be dense models",
                                        path=path))
            node, want = model.tensors[layer[t]], base_mlp[i][t]
            if same_intermediate:
                fits = node.shape == want.shape
            else:  # a shared expert may be wider or narrower; only the hidden size must match
                axis = 0 if t == DOWN else 1
                fits = len(node.shape) == 2 and node.shape[axis] == want.shape[axis]
            if not fits:
                raise PlanError(Problem(
                    f"expert {name!r} does not fit the base: layer {i} {t} has shape {list(node.shape)}, the base's "
                    f"is {list(want.shape)} (experts must share the base's hidden and intermediate sizes)", path=path))
            nodes[t] = node
        mlp.append(nodes)
    return mlp


def _same_weights(step: StackExperts, mlps: list[list[dict[str, Node]]]) -> list[str]:
    """Warnings for experts that are the same weights (allowed: training may pull them apart)."""
    groups: dict[tuple, list[int]] = {}
    for k, mlp in enumerate(mlps):
        key = tuple(node for layer in mlp for node in layer.values())
        groups.setdefault(key if step.experts[k].noise_scale is None else (k,), []).append(k)
    messages = []
    for experts in groups.values():
        if len(experts) > 1:
            names = ", ".join(dict.fromkeys(step.experts[k].model for k in experts))
            messages.append(f"warning: experts {', '.join(map(str, experts))} are the same weights ({names}): until "
                            "trained (or given noise_scale), they compute the same function, so routing between "
                            "them changes nothing")
    return messages


def _other_bases(step: StackExperts, base: LazyModel, models: Mapping[str, LazyModel], probe: Probe) -> list[str]:
    """Warnings for experts that do not look like fine-tunes of the base (their MLPs expect other hidden states)."""
    specs = [s for s in step.experts + ([step.shared_expert] if step.shared_expert else []) if s.model != step.base]
    messages = []
    for name in dict.fromkeys(s.model for s in specs):
        r = probe.norm_correlation(base, step.base, models[name], name)
        if r is not None and r < RELATED:
            messages.append(f"warning: expert model {name!r} does not look like a fine-tune of the base {step.base!r} "
                            f"(correlation of their norm weights {r:.2f}; relatives score above {RELATED}): its MLPs "
                            "were trained on other hidden states, and the MoE may well produce gibberish")
    return messages


def _adjust(node: Node, spec: ExpertSpec, tensor: str, out: str, seed: int) -> Node:
    if spec.noise_scale:
        node = Apply("noise", (node,), (("seed", seed), ("name", out), ("std", spec.noise_scale)),
                     node.dtype, node.shape)
    if spec.residual_scale is not None and tensor == DOWN:
        node = Apply("scale", (node,), (("factor", spec.residual_scale),), node.dtype, node.shape)
    return node


def _zeros(dtype: str, shape: tuple[int, ...]) -> Apply:
    return Apply("zeros", (), (("dtype", dtype), ("shape", shape)), dtype, shape)


class InitGates(StepBase):
    """Set the routers of a model that a stack_experts step just built."""

    op: Literal["init_gates"] = Field(description="Initialise the router (gate) weights of a stacked MoE.")
    model: Ref = Field(description="The stack_experts step whose routers are set.")
    mode: Literal["random", "uniform_random", "uniform", "cheap_embed", "hidden"] = Field(description=(
        "random: seeded normal values (std); uniform_random: seeded uniform values in +-1/sqrt(hidden size), as "
        "torch.nn.Linear initialises; uniform: all zero (equal routing probabilities; which k experts win the "
        "tie is up to the inference kernel, the same ones for every token); cheap_embed: from the token embeddings of each expert's prompts, the same in "
        "every layer; hidden: from the base model's hidden states over each expert's prompts, per layer."))
    seed: int = Field(0, ge=0, description="Seed of random and uniform_random gates.")
    std: float = Field(1.0, gt=0, description="Standard deviation of random gates.")
    hidden_state: Literal["router_input", "residual"] = Field("router_input", description=(
        "hidden: router_input is what the router sees (the post-attention normed state of the layer); residual "
        "is the stream entering the layer (mergekit's choice)."))
    token: Literal["last", "mean"] = Field("last", description=(
        "cheap_embed and hidden: each prompt's last token, or the mean over its tokens (BOS left out)."))

    def references(self) -> list[tuple[Path_, str]]:
        return [(("model",), self.model)]


def init_gates(step: InitGates, models: Mapping[str, LazyModel], probe: Probe) -> LazyModel:
    model = models[step.model]
    info = model.moe
    if info is None:
        raise PlanError(Problem(f"{step.model!r} is not the result of a stack_experts step (init_gates sets the "
                                "routers of a freshly stacked model; put it right after stack_experts)",
                                path=("model",)))
    tensors = dict(model.tensors)
    messages: list[str] = []
    if step.mode in ("cheap_embed", "hidden"):
        if info.shared is not None and not (info.shared.positive or info.shared.negative):
            raise PlanError(Problem(f"mode {step.mode} needs prompts for the shared expert ({info.shared.model}) to "
                                    "set its gate: give it positive (or negative) prompts, or use mode random",
                                    path=("mode",)))
        rows = probe.prompt_gates(info, step.mode, step.hidden_state, step.token)
        for names, values in ((info.routers, rows.routers), (info.shared_gates, rows.shared)):
            for name, data in zip(names, values):
                node = tensors[name]
                tensors[name] = Apply("constant", (), (("data", data), ("dtype", node.dtype), ("shape", node.shape)),
                                      node.dtype, node.shape)
        messages += rows.messages
        how = (f"{step.mode} ({step.hidden_state}, " if step.mode == "hidden" else f"{step.mode} (") + \
            f"{step.token} token) over {rows.prompts} prompts"
    else:
        for name in info.routers + info.shared_gates:
            node = tensors[name]
            if step.mode in ("random", "uniform_random"):
                spread = ("std", step.std) if step.mode == "random" else ("bound", node.shape[1] ** -0.5)
                params = (("seed", step.seed), ("name", name), spread, ("dtype", node.dtype), ("shape", node.shape))
                tensors[name] = Apply("randn" if step.mode == "random" else "uniform", (), params, node.dtype,
                                      node.shape)
            else:
                tensors[name] = Apply("zeros", (), (("dtype", node.dtype), ("shape", node.shape)),
                                      node.dtype, node.shape)
        if step.mode == "uniform":
            messages.append(f"init_gates: uniform: every router weight is zero, so each of the {len(info.experts)} "
                            "experts gets probability 1/n and the same k experts win the tie for every token "
                            "(which ones is up to the inference kernel): meant for training afterwards")
        how = {"random": f"random (seed {step.seed}, std {step.std:g})",
               "uniform_random": f"uniform_random (seed {step.seed})", "uniform": "uniform (all zero)"}[step.mode]
    return model.evolve(
        tensors=tensors,
        notes=model.notes + (f"init_gates: routers of {len(info.routers)} layers set by {how}",),
        messages=tuple(dict.fromkeys(model.messages + tuple(messages))),
    )
