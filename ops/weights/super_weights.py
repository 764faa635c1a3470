"""protect_super_weights: mark the super weights of a model so that no later step loses them unnoticed.

The weights are found by the engine's probe (one streamed forward per round,
see `engine/superweights.py`) or given as coordinates. The guard that refuses
a step losing one lives in the engine's build loop, which every op passes.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import Field

from recipekit.engine.core.graph import LazyModel, ProtectedWeight
from recipekit.engine.core.layers import decoder_of, out_of_range
from recipekit.engine.core.probe import Probe
from recipekit.engine.core.schema import Ref, StepBase, Strict
from recipekit.engine.errors import Path_, PlanError, Problem


class Coordinate(Strict):
    """One weight entry: `<module>.weight[row, column]` in decoder layer `layer`."""

    layer: int = Field(ge=0, description="Decoder layer index.")
    row: int = Field(ge=0, description="Row (output channel) of the weight matrix.")
    column: int = Field(ge=0, description="Column (input channel) of the weight matrix.")
    module: str = Field("mlp.down_proj", description="Module whose weight holds the entry.")


class ProtectSuperWeights(StepBase):
    """Find (or name) the model's super weights; every later step must keep them exactly."""

    op: Literal["protect_super_weights"] = Field(description="Protect the model's super weights.")
    model: Ref = Field(description="The model or step whose super weights are protected.")
    text: str | None = Field(None, description="UTF-8 text file (relative to the recipe) whose paragraphs, after a "
                                               "default prompt, the model runs on to find super weights.")
    coordinates: list[Coordinate] | None = Field(None, min_length=1, description=(
        "Known super weights; when given without text, nothing is searched."))
    threshold: float = Field(50.0, gt=1, description="A layer's largest down_proj input and output must both exceed "
                                                     "this many times the layer's median.")
    rounds: int = Field(10, ge=1, description="Zero what was found and search again, at most this often.")
    seq_len: int = Field(256, ge=1, description="Tokens per text at most.")
    max_texts: int = Field(64, ge=1, description="Texts used at most.")

    def references(self) -> list[tuple[Path_, str]]:
        return [(("model",), self.model)]

    def local_paths(self) -> list[tuple[Path_, str]]:
        return [(("text",), self.text)] if self.text is not None else []

    def title(self, names: Mapping[str, str]) -> str:
        return names[self.model]  # protecting changes no weight: the model is what it was


def protect_super_weights(step: ProtectSuperWeights, models: Mapping[str, LazyModel], probe: Probe) -> LazyModel:
    model = models[step.model]
    decoder = decoder_of(model, step.model)
    entries: list[tuple[str, int, int, int, str]] = []  # (tensor, layer, row, column, how it was known)
    for k, c in enumerate(step.coordinates or []):
        path = ("coordinates", k)
        problems = out_of_range([(path + ("layer",), (c.layer, c.layer + 1))], len(decoder.layers), step.model)
        if problems:
            raise PlanError(problems)
        name = decoder.layers[c.layer].get(f"{c.module}.weight")
        if name is None:
            raise PlanError(Problem(f"layer {c.layer} has no {c.module}.weight", path=path + ("module",)))
        shape = model.tensors[name].shape
        if len(shape) != 2:
            raise PlanError(Problem(f"{name} has shape {list(shape)}: a super weight is an entry of a matrix; "
                                    "name a module with a 2-D weight (mlp.down_proj)", path=path + ("module",)))
        rows, columns = shape
        if c.row >= rows or c.column >= columns:
            raise PlanError(Problem(f"[{c.row}, {c.column}] is outside {name}, of shape [{rows}, {columns}]",
                                    path=path))
        entries.append((name, c.layer, c.row, c.column, "given"))
    messages = []
    if step.text is not None or step.coordinates is None:
        found = probe.super_weights(model, step.model, step.text, threshold=step.threshold, rounds=step.rounds,
                                    seq_len=step.seq_len, max_texts=step.max_texts)
        entries += [(w.tensor, w.layer, w.row, w.column, f"found, value {w.value:.5g}, output {w.out_ratio:.0f}x "
                     "the layer's median") for w in found]
        if not found:
            messages.append(f"warning: protect_super_weights: no super weight found in {step.model!r} (threshold "
                            f"{step.threshold:g}x the layer's median); nothing is protected")
    protected = list(model.protected)
    notes = []
    for name, layer, row, column, how in entries:
        origin = model.layer_origins[layer] if layer < len(model.layer_origins) else f"{step.model}:{layer}"
        label = f"{name.split('.layers.')[-1].split('.', 1)[1]}[{row}, {column}] of layer {origin}"
        weight = ProtectedWeight(model.tensors[name], row, column, label)
        if weight not in protected:
            protected.append(weight)
            notes.append(f"protect_super_weights: {label} ({how})")
    return model.evolve(protected=tuple(protected), notes=model.notes + tuple(notes),
                        messages=model.messages + tuple(messages))
