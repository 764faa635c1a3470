"""add_modules: give every decoder layer new modules initialised so that the model computes exactly what it did.

`adaptive_norm` (a scale network on each RMSNorm's output, ending in zero weights and a bias of one),
`token_mixing` (a residual causal depthwise convolution over the sequence with zero weights) and `se_block`
(squeeze-and-excitation of the MLP's output, `y * (1 + tanh(W2 ...))` with `W2 = 0`): where each sits and its
math are in docs/architecture.md, "Added modules", and the tensors in `core/added_modules.py`. Every existing
tensor stays a byte copy; the new ones are made here. The output's model type is `recipekit_<family>`, whose
classes recipekit registers with transformers.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from pydantic import Field, StrictInt, model_validator

from recipekit.engine.core.added_modules import (
    FAMILIES,
    MODULES,
    NORMAL,
    ONES,
    PREFIX,
    ZEROS,
    AddedModules,
    bottleneck,
    output_architecture,
    output_model_type,
)
from recipekit.engine.core.architectures import layer_config
from recipekit.engine.core.graph import LazyModel, created
from recipekit.engine.core.layers import decoder_of
from recipekit.engine.core.probe import Probe
from recipekit.engine.core.schema import Ref, StepBase, Strict
from recipekit.engine.core.words import counted, listed
from recipekit.engine.errors import Path_, PlanError, Problem

if TYPE_CHECKING:
    import torch

ModuleName = Literal["adaptive_norm", "token_mixing", "se_block"]


class AdaptiveNormOptions(Strict):
    reduction: StrictInt = Field(16, ge=1, description="Bottleneck width of the scale network: hidden // reduction "
                                                       "(at least 1).")


class TokenMixingOptions(Strict):
    kernel_size: StrictInt = Field(3, ge=1, description="Tokens the causal convolution reads: this one and the "
                                                        "kernel_size - 1 before it.")


class SEBlockOptions(Strict):
    reduction: StrictInt = Field(16, ge=1, description="Bottleneck width of the squeeze: hidden // reduction "
                                                       "(at least 1).")


class AddModules(StepBase):
    """Add identity-initialised modules to every decoder layer of a Llama, Mistral, Qwen2 or Qwen3 model."""

    op: Literal["add_modules"] = Field(description="Add adaptive norms, causal token mixing or squeeze-and-"
                                                   "excitation to every layer, initialised so the model computes "
                                                   "exactly what it did.")
    model: Ref = Field(description="The model or step to extend.")
    modules: list[ModuleName] = Field(min_length=1, description="The modules to add (each once).")
    adaptive_norm: AdaptiveNormOptions | None = Field(None, description="Options of adaptive_norm.")
    token_mixing: TokenMixingOptions | None = Field(None, description="Options of token_mixing.")
    se_block: SEBlockOptions | None = Field(None, description="Options of se_block.")
    seed: StrictInt = Field(0, description="Seed of the random first layers of the scale and squeeze networks.")

    @model_validator(mode="after")
    def _options_of_added_modules(self) -> AddModules:
        if len(set(self.modules)) != len(self.modules):
            raise ValueError(f"each module may be named once in modules; got {self.modules}")
        stray = [name for name in MODULES if getattr(self, name) is not None and name not in self.modules]
        if stray:
            raise ValueError(f"options for {listed(stray)} given, but modules does not name "
                             f"{'it' if len(stray) == 1 else 'them'}")
        return self

    def references(self) -> list[tuple[Path_, str]]:
        return [(("model",), self.model)]

    def title(self, names: Mapping[str, str]) -> str:
        return f"{names[self.model]} with {listed([m.replace('_', ' ') for m in self.ordered()])} added"

    def ordered(self) -> list[str]:
        return [name for name in MODULES if name in self.modules]

    def added(self, hidden: int) -> AddedModules:
        def options(name: str, kind: type[Strict]) -> Strict | None:
            return (getattr(self, name) or kind()) if name in self.modules else None

        norm, mixing, se = (options("adaptive_norm", AdaptiveNormOptions), options("token_mixing", TokenMixingOptions),
                            options("se_block", SEBlockOptions))
        return AddedModules(norm_width=bottleneck(hidden, norm.reduction) if norm else None,
                            kernel_size=mixing.kernel_size if mixing else None,
                            se_width=bottleneck(hidden, se.reduction) if se else None)


def add_modules(step: AddModules, models: Mapping[str, LazyModel], probe: Probe) -> LazyModel:
    model = models[step.model]
    config = layer_config(model.config)
    family = str(config.get("model_type"))
    if family not in FAMILIES:
        already = family.startswith(PREFIX)
        raise PlanError(Problem(
            f"{step.model!r} already has added modules (model type {family!r}); add every module in one "
            "add_modules step" if already else
            f"add_modules has modelling classes for model types {', '.join(FAMILIES)}; {step.model!r} is "
            f"{family!r}", path=("model",)))
    if config is not model.config:  # a multimodal wrapper: the classes are for the text model alone
        raise PlanError(Problem(f"{step.model!r} keeps its language model in text_config; add_modules needs a "
                                "plain causal language model", path=("model",)))
    decoder = decoder_of(model, step.model)
    hidden = config.get("hidden_size")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise PlanError(Problem(f"config.json of {step.model!r}: hidden_size should be a positive integer, got "
                                f"{hidden!r}", path=("model",)))
    added = step.added(hidden)
    std = float(config.get("initializer_range") or 0.02)
    tensors = dict(model.tensors)
    for i, layer in enumerate(decoder.layers):
        if "input_layernorm.weight" not in layer or "post_attention_layernorm.weight" not in layer:
            raise PlanError(Problem(f"layer {i} of {step.model!r} has no input_layernorm.weight and "
                                    "post_attention_layernorm.weight", path=("model",)))
        dtype = tensors[layer["input_layernorm.weight"]].dtype
        for rest, (shape, init) in added.tensors(hidden).items():
            name = f"{decoder.prefix}.{i}.{rest}"
            tensors[name] = _initial(init, name, dtype, shape, step.seed, std)
    new_config = {**model.config, "model_type": output_model_type(family),
                  "architectures": [output_architecture(family)], "added_modules": added.config()}
    widths = ", ".join(f"{name} {key} {value}" for name, sizes in added.config().items()
                       for key, value in sizes.items())
    count = len(added.tensors(hidden))
    note = (f"`add_modules` added {listed(added.names())} to every layer of `{step.model}` ({widths}; "
            f"{counted(count, 'new tensor')} per layer), initialised so that the model computes what it did; "
            f"model type `{new_config['model_type']}` (see Loading)")
    return model.evolve(config=new_config, tensors=tensors).absorb(note=note)


def _initial(init: str, name: str, dtype: str, shape: tuple[int, ...], seed: int, std: float):
    if init == NORMAL:
        return created("randn", dtype, shape, seed=seed, name=name, std=std)
    return created({ZEROS: "zeros", ONES: "ones"}[init], dtype, shape)


def ones(*, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    from recipekit.engine.core.kernels import torch_dtype

    return torch.ones(shape, dtype=torch_dtype(dtype))


KERNELS = {"ones": ones}
