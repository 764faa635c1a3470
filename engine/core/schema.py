"""Pydantic building blocks shared by the recipe and every op's parameters.

Strict by construction: unknown keys are errors, models are frozen, and
validators raise `ValueError` only, so pydantic keeps their locations.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from recipekit.engine.core.words import listed
from recipekit.engine.errors import Path_

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.\-]*$"

Name = Annotated[str, Field(pattern=NAME_PATTERN, description="A name: letters, digits, '_', '-', '.'.")]
Ref = Annotated[str, Field(description="The name of an input model (under `models`) or the `id` of an earlier step.")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True, allow_inf_nan=False)


class StepBase(Strict):
    """Fields every step has.

    Subclasses add `op: Literal[...]`, their parameters, and
    `references(self) -> list[tuple[Path_, str]]`: every model or step they
    read, with the path of the field naming it (the registry checks it is there).
    """

    id: Name | None = Field(None, description="Name of this step's result, for later steps to refer to it.")
    allow_super_weight_loss: bool = Field(False, description=(
        "Let this step remove or change a protected super weight (see protect_super_weights); without it, "
        "such a step is refused."))

    def embeddings_from(self) -> str:
        """The model or step whose embeddings the result keeps (the output vocabulary's base): by default the first
        one the step reads."""
        return self.references()[0][1]

    def local_paths(self) -> list[tuple[Path_, str]]:
        """Files this step reads besides models (e.g. a text), with their field paths; a shared recipe may
        name none unless the user allows local paths."""
        return []

    def title(self, names: Mapping[str, str]) -> str:
        """What this step builds, in a few words: the model card's heading when the recipe has no description.
        `names` gives the words for every model and earlier step it reads (a step's own title, so titles
        compose: "a merge of a and b with layers 6-9 dropped")."""
        read = list(dict.fromkeys(names[ref] for _, ref in self.references()))
        return f"a {self.op.replace('_', ' ')} of {listed(read)}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_range(value: object) -> tuple[int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value)):
        raise ValueError(f"expected a layer range [start, end] (two integers, end exclusive), got {value!r}")
    start, end = value
    if start < 0 or end < 0:
        raise ValueError(f"layer indices count from 0; got [{start}, {end}]")
    if start >= end:
        raise ValueError(f"a range [start, end] needs start < end (end is exclusive); got [{start}, {end}]")
    return (start, end)


def _layer_span(value: object) -> tuple[int, int]:
    if _is_int(value):
        if value < 0:
            raise ValueError(f"layer indices count from 0; got {value}")
        return (value, value + 1)
    if isinstance(value, (list, tuple)):
        return _layer_range(value)
    raise ValueError(f"expected a layer index or a [start, end] range (end exclusive), got {value!r}")


LayerRange = Annotated[
    tuple[int, int],
    BeforeValidator(_layer_range, json_schema_input_type=tuple[int, int]),
    Field(description="Layers [start, end), end exclusive."),
]
LayerSpan = Annotated[
    tuple[int, int],
    BeforeValidator(_layer_span, json_schema_input_type=int | tuple[int, int]),
    Field(description="A layer index, or a [start, end] range with end exclusive."),
]
