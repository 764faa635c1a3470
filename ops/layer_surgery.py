"""Layer surgery: drop decoder layers, or concatenate layer ranges of models (frankenmerge).

Both ops only compute which layer of which model becomes each output layer;
`engine.layers.compose_layers` does the renaming and the config.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from recipekit.engine.errors import Path_, PlanError, Problem
from recipekit.engine.layers import Pick, compose_layers, decoder_of, head_tensors
from recipekit.engine.lazy import LazyModel, merge_sources
from recipekit.engine.probe import Probe
from recipekit.engine.schema import LayerRange, LayerSpan, Ref, StepBase, Strict


class SnrSelect(Strict):
    """Choose layers by the random-matrix SNR of one module's weight (see `recipe analyze --metric snr`)."""

    metric: Literal["snr"] = Field(description="Random-matrix signal-to-noise ratio (data-free).")
    module: str = Field("self_attn.v_proj", description="Module whose weight is measured in every layer.")
    where: Literal["infinite"] | None = Field(None, description="Choose the layers whose SNR is infinite.")
    below: float | None = Field(None, description="Choose the layers whose SNR is below this value.")
    lowest: int | None = Field(None, ge=1, description="Choose this many layers with the lowest SNR.")

    @model_validator(mode="after")
    def _one_rule(self) -> SnrSelect:
        if sum(rule is not None for rule in (self.where, self.below, self.lowest)) != 1:
            raise ValueError("give exactly one of where: infinite, below: X, lowest: k")
        return self

    def measure(self, name: str, model: LazyModel, probe: Probe) -> list[float]:
        """One value per layer."""
        return probe.snr(model, name, self.module)

    def choose(self, values: list[float]) -> list[int]:
        if self.where == "infinite":
            return [i for i, v in enumerate(values) if math.isinf(v)]
        if self.below is not None:
            return [i for i, v in enumerate(values) if v < self.below]
        return sorted(sorted(range(len(values)), key=lambda i: (values[i], i))[: self.lowest])

    def describe(self) -> str:
        rule = "infinite" if self.where else f"below {self.below}" if self.below is not None else f"lowest {self.lowest}"
        return f"snr of {self.module} {rule}"


class _TextSelect(Strict):
    text: str = Field(description="UTF-8 text file, relative to the recipe's folder; its blank-line separated "
                                  "paragraphs are the texts the model runs on.")
    seq_len: int = Field(256, ge=1, description="Tokens per text at most.")
    max_texts: int = Field(64, ge=1, description="Texts used at most.")


class AngularSelect(_TextSelect):
    """Choose the block of `n` consecutive layers whose input and output residual streams are closest."""

    metric: Literal["angular"] = Field(description="Angular distance between the residual streams entering "
                                                   "layers l and l+n, at each text's last token.")
    n: int = Field(ge=1, description="How many consecutive layers to drop.")
    token: Literal["last", "mean"] = Field("last", description=(
        "Compare the residual streams at each text's last token, or average the distance over every token."))

    def measure(self, name: str, model: LazyModel, probe: Probe) -> list[float]:
        """One value per possible block start."""
        mean_n = self.n if self.token == "mean" else None
        return probe.similarity(model, name, self.text, self.seq_len, self.max_texts, mean_n).angular(self.n,
                                                                                                     self.token)

    def choose(self, values: list[float]) -> list[int]:
        start = min(range(len(values)), key=lambda i: (values[i], i))
        return list(range(start, start + self.n))

    def describe(self) -> str:
        return f"the smallest angular distance over {self.n} layer(s) ({self.token} token) on {self.text}"


class BiSelect(_TextSelect):
    """Choose the `count` layers with the lowest block influence."""

    metric: Literal["bi"] = Field(description="Block influence: 1 - mean cos(layer input, layer output).")
    count: int = Field(ge=1, description="How many layers to drop.")

    def measure(self, name: str, model: LazyModel, probe: Probe) -> list[float]:
        """One value per layer."""
        return probe.similarity(model, name, self.text, self.seq_len, self.max_texts).bi

    def choose(self, values: list[float]) -> list[int]:
        return sorted(sorted(range(len(values)), key=lambda i: (values[i], i))[: self.count])

    def describe(self) -> str:
        return f"the lowest block influence ({self.count} layer(s)) on {self.text}"


Select = Annotated[Union[SnrSelect, AngularSelect, BiSelect], Field(discriminator="metric")]


class DropLayers(StepBase):
    """Remove decoder layers by index or range, or those a metric selects; the rest keep their order."""

    op: Literal["drop_layers"] = Field(description="Remove decoder layers.")
    model: Ref = Field(description="The model or step whose layers are dropped.")
    layers: list[LayerSpan] | None = Field(None, min_length=1,
                                           description="Layers to remove: indices and [start, end) ranges.")
    select: Select | None = Field(None, description="Instead of `layers`: choose the layers by a metric.")

    @model_validator(mode="after")
    def _layers_or_select(self) -> DropLayers:
        if (self.layers is None) == (self.select is None):
            raise ValueError("give either layers (indices and ranges) or select (a metric), not both or neither")
        return self

    def references(self) -> list[tuple[Path_, str]]:
        return [(("model",), self.model)]

    def local_paths(self) -> list[tuple[Path_, str]]:
        if isinstance(self.select, _TextSelect):
            return [(("select", "text"), self.select.text)]
        return []


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


def drop_layers(step: DropLayers, models: Mapping[str, LazyModel], probe: Probe) -> LazyModel:
    model = models[step.model]
    count = len(decoder_of(model, step.model).layers)
    if step.select is not None:
        dropped, why = _selected(step, model, count, probe)
    else:
        problems = [Problem(f"layer {_span(span)} is out of range: {step.model!r} has {count} layers "
                            f"(0..{count - 1})", path=("layers", k))
                    for k, span in enumerate(step.layers) if span[1] > count]
        if problems:
            raise PlanError(problems)
        dropped, why = {i for start, end in step.layers for i in range(start, end)}, ""
    keep = [i for i in range(count) if i not in dropped]
    if not keep:
        raise PlanError(Problem(f"dropping these layers leaves none of the {count} layers of {step.model!r}",
                                path=("layers",)))
    note = (f"`drop_layers` removed layers {_compact(sorted(dropped))} of `{step.model}` "
            f"({count} -> {len(keep)} layers){why}")
    return compose_layers([Pick(step.model, model, i) for i in keep], step.model, model, note, "pruned")


def _selected(step: DropLayers, model: LazyModel, count: int, probe: Probe) -> tuple[set[int], str]:
    """The layers a metric selects, and the card's words for why (with every measured value)."""
    values = step.select.measure(step.model, model, probe)
    chosen = set(step.select.choose(values)) if values else set()
    if not chosen or len(chosen) >= count:
        what = "no layer" if not chosen else f"all {count} layers"
        raise PlanError(Problem(f"{step.select.describe()} selects {what} of {step.model!r} "
                                f"(values: {_values(values)})", path=("select",)))
    return chosen, f", selected by {step.select.describe()} (values: {_values(values)})"


def _values(values: list[float]) -> str:
    return ", ".join(f"{i}: {v:.4g}" for i, v in enumerate(values))


def slice_layers(step: SliceLayers, models: Mapping[str, LazyModel], probe: Probe) -> LazyModel:
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
    head_name = step.head if step.head not in (None, base_name) else None
    parts = ", ".join(f"`{s.model}` [{s.range[0]}, {s.range[1]})" for s in step.slices)
    others = f"final norm and lm_head from `{head_name}`, other tensors" if head_name else "other tensors"
    note = f"`slice_layers` stacked {parts} ({len(picks)} layers; {others} from `{base_name}`)"
    if len({s.model for s in step.slices} | {head_name} - {None}) > 1:
        tag = "merge"
    else:
        tag = "pruned" if len(picks) < len(decoder_of(models[base_name], base_name).layers) else "frankenmerge"
    model = compose_layers(picks, base_name, models[base_name], note, tag)
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
            raise PlanError(Problem(f"{name} from {head_name!r} has shape {list(node.shape)}, the base "
                                    f"{base_name!r} has {list(model.tensors[name].shape)}", path=("head",)))
    return model.evolve(tensors={**model.tensors, **taken}, sources=merge_sources(model, head),
                        notes=tuple(dict.fromkeys(head.notes + model.notes)),
                        messages=tuple(dict.fromkeys(model.messages + head.messages)))


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
