"""The one list of operations. A recipe's `op` picks its parameters class here."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Union, get_args

from pydantic import Field

from recipekit.engine.lazy import LazyModel
from recipekit.engine.probe import Probe
from recipekit.engine.schema import StepBase

from . import layer_surgery, low_rank, moe, super_weights

# (parameters, models and earlier results by name, the engine's measurements) -> the step's result
OpFunction = Callable[[StepBase, Mapping[str, LazyModel], Probe], LazyModel]


def op_name(params: type[StepBase]) -> str:
    """The `op` literal of a parameters class."""
    (name,) = get_args(params.model_fields["op"].annotation)
    return name


def _register(entries: list[tuple[type[StepBase], OpFunction]]) -> dict[str, tuple[type[StepBase], OpFunction]]:
    table: dict[str, tuple[type[StepBase], OpFunction]] = {}
    for params, function in entries:
        name = op_name(params)
        if name in table:
            raise TypeError(f"op {name!r} is registered twice")
        if not callable(getattr(params, "references", None)):
            raise TypeError(f"op {name!r}: {params.__name__} must define references()")
        table[name] = (params, function)
    return table


OPS = _register([
    (layer_surgery.DropLayers, layer_surgery.drop_layers),
    (layer_surgery.SliceLayers, layer_surgery.slice_layers),
    (moe.StackExperts, moe.stack_experts),
    (moe.InitGates, moe.init_gates),
    (super_weights.ProtectSuperWeights, super_weights.protect_super_weights),
    (low_rank.LowRank, low_rank.low_rank),
])

Step = Annotated[Union[tuple(params for params, _ in OPS.values())], Field(discriminator="op")]


def function_for(step: StepBase) -> OpFunction:
    return OPS[step.op][1]
