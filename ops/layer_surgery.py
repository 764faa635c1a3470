"""Layer surgery: drop decoder layers, or concatenate layer ranges of models (frankenmerge).

Both ops only compute which layer of which model becomes each output layer;
`engine.layers.compose_layers` does the renaming and the config.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import Field

from recipekit.engine.errors import Path_, PlanError, Problem
from recipekit.engine.layers import Pick, compose_layers, decoder_of
from recipekit.engine.lazy import LazyModel
from recipekit.engine.schema import LayerRange, LayerSpan, Ref, StepBase, Strict


class DropLayers(StepBase):
    """Remove decoder layers by index or range; the rest keep their order."""

    op: Literal["drop_layers"] = Field(description="Remove decoder layers.")
    model: Ref = Field(description="The model or step whose layers are dropped.")
    layers: list[LayerSpan] = Field(min_length=1, description="Layers to remove: indices and [start, end) ranges.")

    def references(self) -> list[tuple[Path_, str]]:
        return [(("model",), self.model)]


class Slice(Strict):
    model: Ref = Field(description="The model or step the layers come from.")
    range: LayerRange = Field(description="Layers [start, end) of that model, end exclusive.")


class SliceLayers(StepBase):
    """Concatenate layer ranges of one or more models, in order; a layer may appear more than once."""

    op: Literal["slice_layers"] = Field(description="Concatenate layer ranges (frankenmerge, mergekit passthrough).")
    slices: list[Slice] = Field(min_length=1, description="Layer ranges, stacked in this order.")
    base: Ref | None = Field(None, description="Model giving embeddings, final norm, lm_head and config; "
                                               "default: the first slice's model.")

    def references(self) -> list[tuple[Path_, str]]:
        refs: list[tuple[Path_, str]] = [(("slices", k, "model"), s.model) for k, s in enumerate(self.slices)]
        if self.base is not None:
            refs.append((("base",), self.base))
        return refs


def drop_layers(step: DropLayers, models: Mapping[str, LazyModel]) -> LazyModel:
    model = models[step.model]
    count = len(decoder_of(model, step.model).layers)
    problems = [Problem(f"layer {_span(span)} is out of range: {step.model!r} has {count} layers (0..{count - 1})",
                        path=("layers", k))
                for k, span in enumerate(step.layers) if span[1] > count]
    if problems:
        raise PlanError(problems)
    dropped = {i for start, end in step.layers for i in range(start, end)}
    keep = [i for i in range(count) if i not in dropped]
    if not keep:
        raise PlanError(Problem(f"dropping these layers leaves none of the {count} layers of {step.model!r}",
                                path=("layers",)))
    note = (f"`drop_layers` removed layers {_compact(sorted(dropped))} of `{step.model}` "
            f"({count} -> {len(keep)} layers)")
    return compose_layers([Pick(step.model, model, i) for i in keep], step.model, model, note, "pruned")


def slice_layers(step: SliceLayers, models: Mapping[str, LazyModel]) -> LazyModel:
    problems, picks = [], []
    for k, piece in enumerate(step.slices):
        model = models[piece.model]
        count = len(decoder_of(model, piece.model).layers)
        start, end = piece.range
        if end > count:
            problems.append(Problem(f"range [{start}, {end}] is out of range: {piece.model!r} has {count} layers "
                                    f"(end may be at most {count})", path=("slices", k, "range")))
        picks.extend(Pick(piece.model, model, i, ("slices", k, "model")) for i in range(start, min(end, count)))
    if problems:
        raise PlanError(problems)
    base_name = step.base or step.slices[0].model
    parts = ", ".join(f"`{s.model}` [{s.range[0]}, {s.range[1]})" for s in step.slices)
    note = f"`slice_layers` stacked {parts} ({len(picks)} layers; other tensors from `{base_name}`)"
    if len({s.model for s in step.slices}) > 1:
        tag = "merge"
    else:
        tag = "pruned" if len(picks) < len(decoder_of(models[base_name], base_name).layers) else "frankenmerge"
    return compose_layers(picks, base_name, models[base_name], note, tag)


def _span(span: tuple[int, int]) -> str:
    return str(span[0]) if span[1] == span[0] + 1 else f"[{span[0]}, {span[1]}]"


def _compact(indices: list[int]) -> str:
    """[1, 2, 3, 7] -> `1-3, 7`."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
