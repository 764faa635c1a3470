"""Merges that interpolate between whole models: linear (a weighted mean), SLERP, NearSwap, and Model Stock (the
mean of the fine-tunes, pulled towards the base), each in its `compute_dtype` (see `precision`).

SLERP follows the sphere between the base and the other model by `t` (0: the base, 1: the other), treating each
tensor as one vector; when the two are nearly parallel (|cos| > 0.9995) it interpolates linearly, as mergekit
does. NearSwap moves each entry towards the other model in proportion to how close the two already are:
weight = clamp(t / |base - other|, 0, 1) (1 where they are equal).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .precision import dtypes, restore

if TYPE_CHECKING:
    import torch


def linear(*tensors: torch.Tensor, weights: tuple[float, ...], normalize: bool, compute_dtype: str = "F32",
           keep: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
    """sum_k w_k x_k (divided by sum_k w_k when `normalize`); with one model, passthrough's `scale`."""
    import torch

    dtype, _ = dtypes(compute_dtype)
    result = tensors[0].to(dtype, copy=True).mul_(weights[0])
    for w, x in zip(weights[1:], tensors[1:]):
        # an input that widens exactly into the compute dtype (bf16 into float32) is converted on the fly, one pass
        # per model and no temporary; a wider one is rounded to it first, like every input
        result.add_(x if torch.promote_types(x.dtype, dtype) == dtype else x.to(dtype), alpha=w)
    if normalize:
        result.div_(sum(weights))
    return restore(result, tensors, keep)


def slerp(base: torch.Tensor, other: torch.Tensor, *, t: float, compute_dtype: str = "F32",
          keep: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
    """The norms and the dot product accumulate in float32 at least, so the parallel test sees the cosine."""
    import torch

    dtype, accumulate = dtypes(compute_dtype)
    a, b = base.to(dtype), other.to(dtype)
    a_norm, b_norm = a.norm(dtype=accumulate), b.norm(dtype=accumulate)
    unit_a = a / a_norm if a_norm > 1e-8 else a
    unit_b = b / b_norm if b_norm > 1e-8 else b
    dot = float((unit_a * unit_b).sum(dtype=accumulate))
    if abs(dot) > 0.9995:
        result = (1 - t) * a + t * b
    else:
        theta = torch.arccos(torch.tensor(dot, dtype=torch.float64))
        sin_theta = torch.sin(theta)
        s_a = float(torch.sin((1 - t) * theta) / sin_theta)
        s_b = float(torch.sin(t * theta) / sin_theta)
        result = s_a * a + s_b * b
    return restore(result, (base, other), keep)


def nearswap(base: torch.Tensor, other: torch.Tensor, *, t: float, compute_dtype: str = "F32",
             keep: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
    import torch

    dtype, _ = dtypes(compute_dtype)
    a, b = base.to(dtype), other.to(dtype)
    weight = torch.nan_to_num(t / (a - b).abs(), nan=1.0, posinf=1.0, neginf=1.0).clamp(0, 1)
    return restore(weight * b + (1 - weight) * a, (base, other), keep)


def model_stock(base: torch.Tensor, *others: torch.Tensor, filter_wise: bool, compute_dtype: str = "F32",
                keep: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
    """Model Stock: the average of the fine-tunes, pulled towards the base by how much their task vectors agree.

    t = N cos / (1 + (N - 1) cos), with cos the mean pairwise cosine of the task vectors (per row when
    `filter_wise`, else of the whole tensor); result = t * mean(others) + (1 - t) * base.
    """
    import torch

    dtype, accumulate = dtypes(compute_dtype)
    shape = base.shape
    origin = base.to(dtype)
    if filter_wise:
        origin = origin.reshape(1, -1) if origin.dim() < 2 else origin
        xs = [x.to(dtype).reshape(origin.shape) for x in others]
    else:
        origin = origin.reshape(-1)
        xs = [x.to(dtype).reshape(-1) for x in others]
    offsets = [x - origin for x in xs]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            a, b = offsets[i], offsets[j]
            norms = (a.norm(dim=-1, dtype=accumulate) * b.norm(dim=-1, dtype=accumulate)).clamp(min=1e-6)
            cosines.append(((a * b).sum(dim=-1, dtype=accumulate) / norms).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(xs)
    t = (n * cos / (1 + (n - 1) * cos)).to(dtype)  # per row (or one for the tensor), as the weights are
    result = (t * (sum(xs) / n) + (1 - t) * origin).reshape(shape)
    return restore(result, (base, *others), keep)


KERNELS = {"linear": linear, "slerp": slerp, "nearswap": nearswap, "model_stock": model_stock}
# working copies each kernel holds at its peak besides its inputs, in float32 copies of the tensor, as
# (per input, fixed): measured by benchmarks/kernel_memory.py; the plan and the writer's admission count them
SCRATCH = {"linear": (0.0, 2.5), "slerp": (0.0, 7.5), "nearswap": (0.0, 6.5), "model_stock": (2.0, 2.5)}
ROWWISE = frozenset({"linear", "nearswap"})  # slerp and model_stock need whole-tensor norms
