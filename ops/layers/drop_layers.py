"""drop_layers: remove decoder layers by index or range, or those a metric (SNR, angular distance, block
influence) selects.

The op computes which layers stay; `core.layers.compose_layers` does the renaming and the config.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from recipekit.engine.core.graph import LazyModel
from recipekit.engine.core.layers import Pick, compose_layers, decoder_of, out_of_range
from recipekit.engine.core.modules import module_weights
from recipekit.engine.core.probe import Probe
from recipekit.engine.core.schema import LayerSpan, Ref, StepBase, Strict
from recipekit.engine.core.words import counted
from recipekit.engine.errors import Path_, PlanError, Problem


class SnrSelect(Strict):
    """Choose layers by the random-matrix SNR of one module's weight (see `recipe analyze --metric snr`)."""

    metric: Literal["snr"] = Field(description="Random-matrix signal-to-noise ratio (data-free).")
    module: str = Field("self_attn.v_proj", description=(
        "Module whose weight is measured in every layer, named as in Llama (self_attn.v_proj, mlp.down_proj); in a "
        "fused layout (Phi-3's qkv_proj, gate_up_proj) its rows of the fused matrix."))
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
        shape = module_weights(model, name, self.module, path=("select", "module"))[0].shape
        if len(shape) != 2:
            raise PlanError(Problem(f"{self.module}.weight has shape {list(shape)}: SNR is measured on a matrix "
                                    "(e.g. self_attn.v_proj)", path=("select", "module")))
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

    def title(self, names: Mapping[str, str]) -> str:
        if self.select is not None:
            return f"{names[self.model]} with layers dropped by {self.select.describe()}"
        dropped = sorted({i for start, end in self.layers for i in range(start, end)})
        return f"{names[self.model]} with {'layer' if len(dropped) == 1 else 'layers'} {_compact(dropped)} dropped"


def drop_layers(step: DropLayers, models: Mapping[str, LazyModel], probe: Probe) -> LazyModel:
    model = models[step.model]
    count = len(decoder_of(model, step.model).layers)
    if step.select is not None:
        dropped, why = _selected(step, model, count, probe)
    else:
        problems = out_of_range([(("layers", k), span) for k, span in enumerate(step.layers)], count, step.model)
        if problems:
            raise PlanError(problems)
        dropped, why = {i for start, end in step.layers for i in range(start, end)}, ""
    keep = [i for i in range(count) if i not in dropped]
    if not keep:
        raise PlanError(Problem(f"dropping these layers leaves no layer of {step.model!r} (it has "
                                f"{counted(count, 'layer')})",
                                path=("layers",)))
    note = (f"`drop_layers` removed layers {_compact(sorted(dropped))} of `{step.model}` "
            f"({count} -> {counted(len(keep), 'layer')}){why}")
    return compose_layers([Pick(step.model, model, i) for i in keep], step.model, model, note)


def _selected(step: DropLayers, model: LazyModel, count: int, probe: Probe) -> tuple[set[int], str]:
    """The layers a metric selects, and the card's words for why (with every measured value)."""
    values = step.select.measure(step.model, model, probe)
    chosen = set(step.select.choose(values)) if values else set()
    if not chosen or len(chosen) >= count:
        what = "no layer" if not chosen else "its only layer" if count == 1 else f"all {count} layers"
        raise PlanError(Problem(f"{step.select.describe()} selects {what} of {step.model!r} "
                                f"(values: {_values(values)})", path=("select",)))
    return chosen, f", selected by {step.select.describe()} (values: {_values(values)})"


def _values(values: list[float]) -> str:
    return ", ".join(f"{i}: {v:.4g}" for i, v in enumerate(values))


def _compact(indices: list[int]) -> str:
    """[1, 2, 3, 7] -> `1-3, 7`."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
