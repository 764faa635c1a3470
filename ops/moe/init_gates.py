"""init_gates: set the routers of a Mixture of Experts that `stack_experts` just built.

Random and uniform gates are seeded kernels computed at write time; prompt gates (`cheap_embed`, `hidden`) are
computed while the recipe is built, through the probe, and written as constants.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import Field

from recipekit.engine.core.graph import LazyModel, created
from recipekit.engine.core.probe import Probe
from recipekit.engine.core.schema import Ref, StepBase
from recipekit.engine.core.words import counted
from recipekit.engine.errors import Path_, PlanError, Problem


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

    def title(self, names: Mapping[str, str]) -> str:
        return f"{names[self.model]} with {self.mode} routers"


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
                tensors[name] = created("constant", node.dtype, node.shape, data=data)
        messages += rows.messages
        how = (f"{step.mode} ({step.hidden_state}, " if step.mode == "hidden" else f"{step.mode} (") + \
            f"{step.token} token) over {counted(rows.prompts, 'prompt')}"
    else:
        for name in info.routers + info.shared_gates:
            node = tensors[name]
            if step.mode == "random":
                tensors[name] = created("randn", node.dtype, node.shape, seed=step.seed, name=name, std=step.std)
            elif step.mode == "uniform_random":
                tensors[name] = created("uniform", node.dtype, node.shape, seed=step.seed, name=name,
                                        bound=node.shape[1] ** -0.5)
            else:
                tensors[name] = created("zeros", node.dtype, node.shape)
        if step.mode == "uniform":
            messages.append(f"init_gates: uniform: every router weight is zero, so each of the {len(info.experts)} "
                            "experts gets probability 1/n and the same k experts win the tie for every token "
                            "(which ones is up to the inference kernel): meant for training afterwards")
        how = {"random": f"random (seed {step.seed}, std {step.std:g})",
               "uniform_random": f"uniform_random (seed {step.seed})", "uniform": "uniform (all zero)"}[step.mode]
    return model.evolve(tensors=tensors).absorb(
        note=f"init_gates: routers of {counted(len(info.routers), 'layer')} set by {how}", messages=tuple(messages))
