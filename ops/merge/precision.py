"""The dtypes a merge kernel works in, and the protected entries it puts back exactly.

A merge step's `compute_dtype` reaches every kernel as a safetensors name (`compute_dtype="BF16"`). The kernel
converts its inputs to that dtype, and every tensor it builds from them (task vectors, masks applied, the
interpolation, the result) is in that dtype: each elementwise operation rounds to it, as torch rounds a
bfloat16 operation once, from float32. Three kinds of value are kept wider on purpose:

- Reductions over many entries (norms, dot products and cosines, L1 norms, means of squares, the KL divergence
  of arcee_fusion's softmax rows) accumulate in float32, or float64 when computing in float64: a bfloat16 sum
  keeps three significant digits, a float16 one overflows past 65504, and slerp's parallel test (|cos| >
  0.9995) asks for more than bfloat16 resolves near 1 (its spacing there is 0.004). What they give (a norm, an
  angle, an interpolation weight) stays at that precision while it is a scalar, and is rounded to the compute
  dtype where it is a tensor of per-row values that meets the weights.
- Random draws (DARE's and DELLA's masks, arcee_fusion's sample) are float32 from the seeded CPU generator, and
  DELLA's ranks and keep probabilities are float32 too, so the masks follow the seed alone.
- Entries protected by `protect_super_weights` are restored exactly (`restore`).

Thresholds compare values in the compute dtype: TIES' k-th largest magnitude is found exactly among bfloat16
magnitudes, where many entries tie (the first in memory order are kept, so exactly int(density * n) stay).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from recipekit.engine.core.kernels import torch_dtype

if TYPE_CHECKING:
    import torch


def dtypes(compute_dtype: str) -> tuple[torch.dtype, torch.dtype]:
    """(the dtype tensors are computed in, the dtype reductions accumulate in) for a safetensors dtype name."""
    import torch

    dtype = torch_dtype(compute_dtype)
    return dtype, torch.float64 if dtype == torch.float64 else torch.float32


def restore(result: torch.Tensor, inputs: tuple[torch.Tensor, ...],
            keep: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
    """`result` with each kept `(row, column, k)` entry set to input k's, exactly: a result narrower than that input
    (bfloat16 computed from float32 models) is widened first, so only the cast to the output dtype rounds it."""
    import torch

    for row, column, source in keep:
        wider = torch.promote_types(result.dtype, inputs[source].dtype)
        if wider != result.dtype:
            result = result.to(wider)
        result[row, column] = inputs[source][row, column]
    return result
