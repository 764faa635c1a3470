"""stack_experts: the MLPs of dense models become the experts of a Mixture of Experts over a shared base.

Tensors are renamed (experts stay byte copies unless noise or a residual
scale is asked for) and every router is left unset for `init_gates`
(`ops/moe/init_gates.py`); the build refuses a model whose routers are still
unset, so a zero router is never written by accident.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from recipekit.engine.core.architectures import layer_config, materialise
from recipekit.engine.core.graph import (
    ExpertPrompts,
    LazyModel,
    MoeInfo,
    Node,
    created,
    elementwise,
    unset_router,
)
from recipekit.engine.core.kernels import generator
from recipekit.engine.core.layers import decoder_of
from recipekit.engine.core.moe_layouts import LAYOUTS, infer_layout
from recipekit.engine.core.names import ATTENTION_BIASES, DOWN, GATE, MLP_TENSORS
from recipekit.engine.core.probe import RELATED, Probe
from recipekit.engine.core.schema import Ref, StepBase, Strict
from recipekit.engine.core.tags import MOE, UPCYCLED
from recipekit.engine.core.words import counted, listed
from recipekit.engine.errors import Path_, PlanError, Problem

if TYPE_CHECKING:
    import torch

# a prompt is a phrase or a few sentences; one of a hundred thousand tokens would need GBs of attention scores
Prompt = Annotated[str, Field(min_length=1, max_length=4000)]
LayoutName = Literal["mixtral", "qwen2_moe", "qwen3_moe"]


class ExpertSpec(Strict):
    """One expert: the model whose MLPs it takes, and the prompts that should be routed to it."""

    model: Ref = Field(description="The model (or step) whose MLP weights become this expert.")
    positive: list[Prompt] = Field([], max_length=256, description="Prompts that should route to this expert (for "
                                                                   "prompt gates).")
    negative: list[Prompt] = Field([], max_length=256, description="Prompts that should not route to this expert.")
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

    def title(self, names: Mapping[str, str]) -> str:
        experts = list(dict.fromkeys(names[e.model] for e in self.experts))
        return f"a Mixture of Experts of {listed(experts)} over {names[self.base]}"


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
    if step.shared_expert is not None and layout.shared_prefix is None:
        raise PlanError(Problem(f"layout {layout.name} has no shared expert; use layout qwen2_moe, or drop "
                                "shared_expert", path=("shared_expert",)))

    experts = [(spec, models[spec.model]) for spec in step.experts]
    if step.experts_per_token > len(experts):
        raise PlanError(Problem(f"experts_per_token is {step.experts_per_token}, but the step lists only "
                                f"{counted(len(experts), 'expert')}", path=("experts_per_token",)))
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
    hidden = base_mlp[0][GATE].shape[1]
    router_dtype = base_mlp[0][GATE].dtype
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
        tensors[router] = unset_router(router_dtype, (len(experts), hidden))
        routers.append(router)
        if layout.shared_prefix is not None:
            shared_gate = f"{prefix}.{layout.shared_gate}"
            shared_gates.append(shared_gate)
            if shared_mlp is None:
                # transformers always builds a shared expert: an empty one (intermediate size 0) adds nothing
                for t in MLP_TENSORS:
                    shape = (0, hidden) if t != DOWN else (hidden, 0)
                    tensors[f"{prefix}.{layout.shared_tensor(t)}"] = created("zeros", router_dtype, shape)
                tensors[shared_gate] = created("zeros", router_dtype, (1, hidden))
            else:
                for t in MLP_TENSORS:
                    out = f"{prefix}.{layout.shared_tensor(t)}"
                    tensors[out] = _adjust(shared_mlp[i][t], step.shared_expert, t, out, step.seed)
                tensors[shared_gate] = unset_router(router_dtype, (1, hidden))
        if layout.attention_bias == "always":
            for bias in ATTENTION_BIASES:
                weight = base.tensors[layers[i][bias.replace(".bias", ".weight")]]
                tensors.setdefault(f"{prefix}.{bias}", created("zeros", weight.dtype, (weight.shape[0],)))

    intermediate = base_mlp[0][GATE].shape[0]
    shared_intermediate = shared_mlp[0][GATE].shape[0] if shared_mlp else 0
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
    others = [m for _, m in experts] + ([models[step.shared_expert.model]] if step.shared_expert else [])
    note = (f"stack_experts: {layout.name} with {counted(len(experts), 'expert')} ({names}), "
            f"attention from {step.base}, "
            f"{step.experts_per_token} per token"
            + (f", shared expert {step.shared_expert.model}" if step.shared_expert else ""))
    one_model = len({source.root for m in (base, *others) for _, source in m.sources}) == 1
    stacked = base.evolve(config=config, tensors=tensors, moe=info)
    return stacked.absorb(*others, note=note, tags=(MOE, UPCYCLED) if one_model else (MOE,),
                          messages=tuple(messages))


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
        raise PlanError(Problem(f"expert {name!r} has {counted(len(layers), 'layer')}, the base has {len(base_mlp)}",
                                path=path))
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
        node = elementwise("noise", node, seed=seed, name=out, std=spec.noise_scale)
    if spec.residual_scale is not None and tensor == DOWN:
        node = elementwise("scale", node, factor=spec.residual_scale)
    return node


# kernels: pure functions of torch tensors, run by the executor when the output is written


def noise(x: torch.Tensor, *, seed: int, name: str, std: float) -> torch.Tensor:
    """x plus seeded normal noise (computed on the CPU, so the result does not depend on --device)."""
    import torch

    added = torch.randn(x.shape, generator=generator(seed, name), dtype=torch.float32) * std
    return (x.float() + added.to(x.device)).to(x.dtype)


def scale(x: torch.Tensor, *, factor: float) -> torch.Tensor:
    """x times `factor`, computed in float32."""
    return (x.float() * factor).to(x.dtype)


KERNELS = {"noise": noise, "scale": scale}
