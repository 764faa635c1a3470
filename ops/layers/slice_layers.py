"""slice_layers: concatenate layer ranges of one or more models (a frankenmerge, mergekit's passthrough).

The op computes which layer of which model becomes each output layer; `core.layers.compose_layers` does the
renaming and the config.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import Field

from recipekit.engine.core.graph import LazyModel
from recipekit.engine.core.layers import Pick, compose_layers, decoder_of, head_tensors, out_of_range
from recipekit.engine.core.probe import Probe
from recipekit.engine.core.schema import LayerRange, Ref, StepBase, Strict
from recipekit.engine.core.tags import FRANKENMERGE
from recipekit.engine.core.words import counted, listed
from recipekit.engine.errors import Path_, PlanError, Problem


class Slice(Strict):
    model: Ref = Field(description="The model or step the layers come from.")
    range: LayerRange = Field(description="Layers [start, end) of that model, end exclusive.")


class SliceLayers(StepBase):
    """Concatenate layer ranges of one or more models, in order; a layer may appear more than once."""

    op: Literal["slice_layers"] = Field(description="Concatenate layer ranges (frankenmerge, mergekit passthrough).")
    slices: list[Slice] = Field(min_length=1, description="Layer ranges, stacked in this order.")
    base: Ref | None = Field(None, description="Model giving embeddings, final norm, lm_head and config; "
                                               "default: the first slice's model.")
    head: Ref | None = Field(None, description="Model giving the final norm and lm_head instead of `base` (mergekit "
                                               "takes them from the last slice's model); default: `base`.")

    def references(self) -> list[tuple[Path_, str]]:
        refs: list[tuple[Path_, str]] = [(("slices", k, "model"), s.model) for k, s in enumerate(self.slices)]
        refs += [((field,), ref) for field, ref in (("base", self.base), ("head", self.head)) if ref is not None]
        return refs

    def embeddings_from(self) -> str:
        return self.base or self.slices[0].model

    def title(self, names: Mapping[str, str]) -> str:
        models = list(dict.fromkeys(names[ref] for _, ref in self.references()))
        if len(models) > 1:
            return f"a frankenmerge of {listed(models)}"
        ranges = " + ".join(f"{start}-{end - 1}" if end - start > 1 else str(start) for start, end in
                            (s.range for s in self.slices))
        return f"{models[0]} restacked as layers {ranges}"


def slice_layers(step: SliceLayers, models: Mapping[str, LazyModel], probe: Probe) -> LazyModel:
    problems, picks = [], []
    for k, piece in enumerate(step.slices):
        model = models[piece.model]
        count = len(decoder_of(model, piece.model).layers)
        start, end = piece.range
        problems += out_of_range([(("slices", k, "range"), piece.range)], count, piece.model)
        picks.extend(Pick(piece.model, model, i, ("slices", k, "model")) for i in range(start, min(end, count)))
    if problems:
        raise PlanError(problems)
    base_name = step.base or step.slices[0].model
    head_name = step.head if step.head not in (None, base_name) else None
    parts = ", ".join(f"`{s.model}` [{s.range[0]}, {s.range[1]})" for s in step.slices)
    others = f"final norm and lm_head from `{head_name}`, other tensors" if head_name else "other tensors"
    note = f"`slice_layers` stacked {parts} ({counted(len(picks), 'layer')}; {others} from `{base_name}`)"
    model = compose_layers(picks, base_name, models[base_name], note)
    return model if head_name is None else _with_head(model, base_name, models[head_name], head_name)


def _with_head(model: LazyModel, base_name: str, head: LazyModel, head_name: str) -> LazyModel:
    """`model` with its final norm and lm_head taken from `head`, shape for shape. A head that ties its
    embeddings gives them as lm_head (that is its lm_head); a base that ties them cannot take another's."""
    ours = head_tensors(model, decoder_of(model, base_name))
    theirs = head_tensors(head, decoder_of(head, head_name))
    taken = {name: head.tensors[name] for name in theirs if name in ours}
    embedding = next((name for name in head.tensors if name.endswith("embed_tokens.weight")), None)
    for name in ours:
        if name not in taken and name.rsplit(".", 2)[-2] == "lm_head" and embedding is not None:
            taken[name] = head.tensors[embedding]
    if set(taken) != set(ours) or set(theirs) - set(ours):
        why = ("the base ties lm_head to its embeddings, so it cannot come from another model"
               if set(theirs) - set(ours) else f"{head_name!r} has none of {', '.join(sorted(set(ours) - set(taken)))}")
        raise PlanError(Problem(f"the final norm and lm_head cannot come from {head_name!r}: {why}", path=("head",)))
    for name, node in taken.items():
        if node.shape != model.tensors[name].shape:
            vocabulary = ("; the models have different vocabularies: set output.tokenizer (source: union, or a "
                          "model name) so that rows are matched by token" if "lm_head" in name else "")
            raise PlanError(Problem(f"{name} from {head_name!r} has shape {list(node.shape)}, the base "
                                    f"{base_name!r} has {list(model.tensors[name].shape)}{vocabulary}",
                                    path=("head",)))
    return model.evolve(tensors={**model.tensors, **taken}).absorb(head, tags=(FRANKENMERGE,))


