"""The one list of operations: each op's parameters, its graph rewrite, and the kernels its nodes name.

A recipe's `op` picks its parameters class here; the executor finds every kernel here. The engine reaches ops
only through this module.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Union, get_args

from pydantic import Field

from recipekit.engine.core.graph import LazyModel
from recipekit.engine.core.kernels import SHARED_KERNELS
from recipekit.engine.core.probe import Probe
from recipekit.engine.core.schema import StepBase

from .layers import add_modules, drop_layers, expand_layers, slice_layers
from .merge import interpolate, merge, selection, sphere, task_vectors
from .moe import init_gates, stack_experts
from .weights import heal, low_rank, super_weights

# (parameters, models and earlier results by name, the engine's measurements) -> the step's result
OpFunction = Callable[[StepBase, Mapping[str, LazyModel], Probe], LazyModel]
Kernel = Callable[..., object]  # torch tensors and keyword parameters -> a torch tensor


@dataclass(frozen=True)
class Op:
    params: type[StepBase]
    rewrite: OpFunction
    kernels: Mapping[str, Kernel] = field(default_factory=dict)  # the kernels this op's nodes name
    # kernels whose output rows depend only on the same rows of their inputs: the writer streams them a block
    # of rows at a time, straight from the input files to the output file
    rowwise: frozenset[str] = frozenset()
    # kernels' working copies besides their inputs, in copies of the tensor in its compute dtype, as (per input,
    # fixed); a kernel not named holds a copy of each input and of its result, (1, 1)
    scratch: Mapping[str, tuple[float, float]] = field(default_factory=dict)


def op_name(params: type[StepBase]) -> str:
    """The `op` literal of a parameters class."""
    (name,) = get_args(params.model_fields["op"].annotation)
    return name


def _register(ops: list[Op]) -> tuple[dict[str, Op], dict[str, Kernel]]:
    table: dict[str, Op] = {}
    kernels: dict[str, Kernel] = dict(SHARED_KERNELS)
    for op in ops:
        for kind, named in (("rowwise", set(op.rowwise)), ("scratch", set(op.scratch))):
            if not named <= set(op.kernels):
                raise TypeError(f"op {op_name(op.params)!r}: {kind} kernels {sorted(named - set(op.kernels))} "
                                "are not among its kernels")
    for op in ops:
        name = op_name(op.params)
        if name in table:
            raise TypeError(f"op {name!r} is registered twice")
        if not callable(getattr(op.params, "references", None)):
            raise TypeError(f"op {name!r}: {op.params.__name__} must define references()")
        for kernel, function in op.kernels.items():
            if kernel in kernels:
                raise TypeError(f"op {name!r}: kernel {kernel!r} is registered twice")
            kernels[kernel] = function
        table[name] = op
    return table, kernels


OPS, KERNELS = _register([
    Op(drop_layers.DropLayers, drop_layers.drop_layers),
    Op(slice_layers.SliceLayers, slice_layers.slice_layers),
    Op(expand_layers.ExpandLayers, expand_layers.expand_layers),
    Op(add_modules.AddModules, add_modules.add_modules, add_modules.KERNELS),
    Op(stack_experts.StackExperts, stack_experts.stack_experts, stack_experts.KERNELS),
    Op(init_gates.InitGates, init_gates.init_gates),
    Op(super_weights.ProtectSuperWeights, super_weights.protect_super_weights),
    Op(low_rank.LowRank, low_rank.low_rank, low_rank.KERNELS),
    Op(heal.Heal, heal.heal),
    Op(merge.Merge, merge.merge, {**interpolate.KERNELS, **sphere.KERNELS, **selection.KERNELS, **task_vectors.KERNELS},
       interpolate.ROWWISE | task_vectors.ROWWISE,
       {**interpolate.SCRATCH, **sphere.SCRATCH, **selection.SCRATCH, **task_vectors.SCRATCH}),
])
ROWWISE = frozenset(k for op in OPS.values() for k in op.rowwise)
SCRATCH = {k: copies for op in OPS.values() for k, copies in op.scratch.items()}

Step = Annotated[Union[tuple(op.params for op in OPS.values())], Field(discriminator="op")]


def function_for(step: StepBase) -> OpFunction:
    return OPS[step.op].rewrite
