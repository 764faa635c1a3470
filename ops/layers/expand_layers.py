"""expand_layers: grow a model by inserting identity copies of decoder layers (LLaMA-Pro block expansion).

Each new layer is a copy of the layer before it whose output projections (attention `o_proj`, MLP `down_proj`,
every expert's down projection, their biases) are zero. A decoder layer adds what its attention and MLP produce
to the residual stream; with those projections zero it adds exactly zero (a post-norm of zero, as Gemma and
OLMo 2 apply, is zero too), so the grown model computes exactly what the original did, and training the new
layers starts from the original model. The output is a plain checkpoint of the same family.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

from pydantic import Field, StrictInt, model_validator

from recipekit.engine.core.graph import LazyModel, created
from recipekit.engine.core.layers import Pick, compose_layers, decoder_of, out_of_range
from recipekit.engine.core.probe import Probe
from recipekit.engine.core.schema import Ref, StepBase
from recipekit.engine.core.tags import EXPANDED
from recipekit.engine.core.words import counted
from recipekit.engine.errors import Path_, PlanError, Problem

# the modules whose output a decoder layer adds to the residual stream, by the names transformers gives them
_ATTENTION_OUT = re.compile(r"^(self_attn|attn|attention|self_attention)\.(o_proj|out_proj|dense|c_proj)\.(weight|bias)$")
_MLP_OUT = re.compile(r"^(mlp|block_sparse_moe|feed_forward)\.(.+\.)?(down_proj|w2|fc2|c_proj|dense_4h_to_h)"
                      r"\.(weight|bias)$")


class ExpandLayers(StepBase):
    """Insert identity copies of decoder layers: after the layers `after` names, or after every `every`-th."""

    op: Literal["expand_layers"] = Field(description="Insert zero-output copies of layers (LLaMA-Pro block "
                                                     "expansion): the model computes exactly what it did.")
    model: Ref = Field(description="The model or step to grow.")
    after: list[StrictInt] | None = Field(None, min_length=1, description=(
        "Insert a copy of each of these layers right after it (indices of the input model)."))
    every: StrictInt | None = Field(None, ge=1, description=(
        "Insert a copy after every `every`-th layer (layers every-1, 2*every-1, ...)."))

    @model_validator(mode="after")
    def _one_rule(self) -> ExpandLayers:
        if (self.after is None) == (self.every is None):
            raise ValueError("give exactly one of after: [layer, ...] or every: k")
        if self.after is not None:
            if any(i < 0 for i in self.after):
                raise ValueError(f"layer indices count from 0; got {self.after}")
            if len(set(self.after)) != len(self.after):
                raise ValueError(f"each layer may be named once in after; got {self.after}")
        return self

    def references(self) -> list[tuple[Path_, str]]:
        return [(("model",), self.model)]

    def title(self, names: Mapping[str, str]) -> str:
        where = f"after every {self.every}th layer" if self.every is not None else \
            f"after {'layer' if len(self.after) == 1 else 'layers'} {', '.join(map(str, sorted(self.after)))}"
        return f"{names[self.model]} grown by identity layers {where}"


def expand_layers(step: ExpandLayers, models: Mapping[str, LazyModel], probe: Probe) -> LazyModel:
    model = models[step.model]
    decoder = decoder_of(model, step.model)
    count = len(decoder.layers)
    if step.after is not None:
        problems = out_of_range([(("after",), (i, i + 1)) for i in step.after], count, step.model)
        if problems:
            raise PlanError(problems)
        after = sorted(step.after)
    else:
        after = [i for i in range(count) if (i + 1) % step.every == 0]
        if not after:
            raise PlanError(Problem(f"every: {step.every} inserts nothing: {step.model!r} has "
                                    f"{counted(count, 'layer')}", path=("every",)))
    zeroed = {i: _output_projections(decoder.layers[i], step.model, i) for i in after}
    picks, new = [], {}  # output layer -> the input layer it copies
    for i in range(count):
        picks.append(Pick(step.model, model, i))
        if i in zeroed:
            new[len(picks)] = i
            picks.append(Pick(step.model, model, i))
    copies = ", ".join(f"{j} (of {i})" for j, i in new.items())
    names = sorted({rest for rests in zeroed.values() for rest in rests})
    note = (f"`expand_layers` inserted {counted(len(new), 'identity layer')} into `{step.model}` "
            f"({count} -> {len(picks)} layers): output layers {copies} are copies with {', '.join(names)} set to "
            "zero, so the model computes what it did")
    grown = compose_layers(picks, step.model, model, note, tags=(EXPANDED,))
    prefix = decoder_of(grown, step.model).prefix
    tensors = dict(grown.tensors)
    for j, i in new.items():
        for rest in zeroed[i]:
            name = f"{prefix}.{j}.{rest}"
            tensors[name] = created("zeros", tensors[name].dtype, tensors[name].shape)
    return grown.evolve(tensors=tensors)


def _output_projections(layer: Mapping[str, str], name: str, index: int) -> list[str]:
    """The tensors (names inside the layer) of the modules that write to the residual stream; a layer where the
    attention's or the MLP's cannot be found is refused, since zeroing less would not give an identity."""
    attention = [rest for rest in layer if _ATTENTION_OUT.match(rest)]
    mlp = [rest for rest in layer if _MLP_OUT.match(rest)]
    missing = [what for what, found in (("attention", attention), ("MLP", mlp)) if not found]
    if missing:
        raise PlanError(Problem(
            f"cannot find the {' and '.join(missing)} output projection(s) of layer {index} of {name!r} (looked for "
            "self_attn.o_proj and mlp.down_proj, or the names other families give them), so an identity copy of it "
            f"cannot be made; its tensors are {', '.join(sorted(layer)[:8])}{', ...' if len(layer) > 8 else ''}"))
    return attention + mlp
