"""Merge parameters that may vary across layers and by tensor name, as mergekit configs write them.

A value is a number, a `Gradient` (anchor values spread over the layers, interpolated piecewise linearly), or
`Filtered` (rules `{filter: mlp, value: ...}` tried in order; the first whose filter is part of the tensor
name, or that has no filter, gives the value). In YAML:

    weight: 0.5
    weight: [0, 0.5, 1]                                   # a gradient
    weight: [{filter: self_attn, value: 0.8}, {value: 0.2}]
    weight: {self_attn: 0.8, mlp: [0, 1], default: 0.2}   # the same rules as a mapping

Where a tensor sits along the layers: decoder layer i of L is at i / (L - 1) (1 for a single layer), tensors
before the layers (embeddings) at 0, tensors after them (final norm, lm_head) at 1, as mergekit places them.
"""
from __future__ import annotations

import math
from typing import Annotated, Union

from pydantic import BeforeValidator, Field, RootModel, ValidationError

from recipekit.engine.core.schema import Strict


def _finite(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return float(value)


Number = Annotated[float, BeforeValidator(_finite, json_schema_input_type=float)]


class Gradient(RootModel[list[Number]]):
    """Anchor values spread evenly over the layers: [0, 1] rises from 0 at the first layer to 1 at the last."""

    root: list[Number] = Field(min_length=1)

    def at(self, position: float) -> float:
        values = self.root
        scaled = position * (len(values) - 1)
        low = min(int(scaled), len(values) - 1)
        high = min(low + 1, len(values) - 1)
        fraction = scaled - low
        return (1 - fraction) * values[low] + fraction * values[high]


Scalar = Union[Number, Gradient]


def _rules(value: object) -> object:
    """The mapping form `{self_attn: 0.8, default: 0.2}` as the list of rules it means."""
    if isinstance(value, dict) and "value" not in value:
        return [{"value": v} if k in ("default", "*") else {"filter": k, "value": v} for k, v in value.items()]
    if isinstance(value, dict):
        return [value]
    return value


class FilterRule(Strict):
    filter: str | None = Field(None, min_length=1, description="Applies to tensors whose name contains this text; "
                                                                "no filter (or '*'): to every tensor.")
    value: Scalar = Field(description="A number, or a gradient over the layers.")

    def matches(self, tensor: str) -> bool:
        return self.filter is None or self.filter == "*" or self.filter in tensor


class Filtered(RootModel[list[FilterRule]]):
    """Rules tried in order; the first that matches the tensor name gives the value."""

    root: Annotated[list[FilterRule], BeforeValidator(_rules)] = Field(min_length=1)


def _classify(value: object) -> object:
    """Numbers stay numbers, a list of numbers is a gradient, rules (a list of mappings, or one mapping) filter;
    anything else is one clear error, not one per union member."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(value)
    try:
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
            return Filtered.model_validate(value)
        if isinstance(value, list):
            return Gradient.model_validate(value)
    except ValidationError as e:
        first = e.errors()[0]
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"])
        raise ValueError(f"{where.lstrip('.')}: {first['msg'].removeprefix('Value error, ')}" if where
                         else first["msg"]) from None
    raise ValueError(f"expected a number, a list of numbers (a gradient over the layers) or filter rules, "
                     f"got {value!r}")


Value = Annotated[Union[Number, Gradient, Filtered], BeforeValidator(_classify),
                  Field(description="A number; a list of numbers (a gradient over the layers); or rules "
                                    "[{filter: mlp, value: ...}, {value: ...}] by tensor name.")]


def resolve(value: float | Gradient | Filtered | None, tensor: str, position: float) -> float | None:
    """The number `value` gives `tensor` at `position` along the layers; None when no rule matches."""
    if value is None or isinstance(value, float):
        return value
    if isinstance(value, Gradient):
        return value.at(position)
    for rule in value.root:
        if rule.matches(tensor):
            return resolve(rule.value, tensor, position)
    return None

