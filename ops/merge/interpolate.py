"""Merges that interpolate between whole models, in float32: linear (a weighted mean), SLERP, NearSwap, and
Model Stock (the mean of the fine-tunes, pulled towards the base).

SLERP follows the sphere between the base and the other model by `t` (0: the base, 1: the other), treating each
tensor as one vector; when the two are nearly parallel (|cos| > 0.9995) it interpolates linearly, as mergekit
does. NearSwap moves each entry towards the other model in proportion to how close the two already are:
weight = clamp(t / |base - other|, 0, 1) (1 where they are equal).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def restore(result: torch.Tensor, inputs: tuple[torch.Tensor, ...], keep: tuple[tuple[int, int, int], ...]):
    for row, column, source in keep:
        result[row, column] = inputs[source][row, column].float()
    return result


def linear(*tensors: torch.Tensor, weights: tuple[float, ...], normalize: bool,
           keep: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
    """sum_k w_k x_k (divided by sum_k w_k when `normalize`)."""
    import torch

    result = tensors[0].to(torch.float32, copy=True).mul_(weights[0])
    for w, x in zip(weights[1:], tensors[1:]):
        result.add_(x, alpha=w)  # upcast on the fly: one pass per model, no temporary
    if normalize:
        result.div_(sum(weights))
    return restore(result, tensors, keep)


def slerp(base: torch.Tensor, other: torch.Tensor, *, t: float,
          keep: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
    import torch

    a, b = base.float(), other.float()
    a_norm, b_norm = a.norm(), b.norm()
    unit_a = a / a_norm if a_norm > 1e-8 else a
    unit_b = b / b_norm if b_norm > 1e-8 else b
    dot = float((unit_a * unit_b).sum())
    if abs(dot) > 0.9995:
        result = (1 - t) * a + t * b
    else:
        theta = torch.arccos(torch.tensor(dot, dtype=torch.float64))
        sin_theta = torch.sin(theta)
        s_a = float(torch.sin((1 - t) * theta) / sin_theta)
        s_b = float(torch.sin(t * theta) / sin_theta)
        result = s_a * a + s_b * b
    return restore(result, (base, other), keep)


def nearswap(base: torch.Tensor, other: torch.Tensor, *, t: float,
             keep: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
    import torch

    a, b = base.float(), other.float()
    weight = torch.nan_to_num(t / (a - b).abs(), nan=1.0, posinf=1.0, neginf=1.0).clamp(0, 1)
    return restore(weight * b + (1 - weight) * a, (base, other), keep)


def model_stock(base: torch.Tensor, *others: torch.Tensor, filter_wise: bool,
                keep: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
    """Model Stock: the average of the fine-tunes, pulled towards the base by how much their task vectors agree.

    t = N cos / (1 + (N - 1) cos), with cos the mean pairwise cosine of the task vectors (per row when
    `filter_wise`, else of the whole tensor); result = t * mean(others) + (1 - t) * base.
    """
    import torch

    shape = base.shape
    origin = base.float()
    if filter_wise:
        origin = origin.reshape(1, -1) if origin.dim() < 2 else origin
        xs = [x.float().reshape(origin.shape) for x in others]
    else:
        origin = origin.reshape(-1)
        xs = [x.float().reshape(-1) for x in others]
    offsets = [x - origin for x in xs]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norms = (offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1)).clamp(min=1e-6)
            cosines.append(((offsets[i] * offsets[j]).sum(dim=-1) / norms).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(xs)
    t = n * cos / (1 + (n - 1) * cos)
    result = (t * (sum(xs) / n) + (1 - t) * origin).reshape(shape)
    return restore(result, (base, *others), keep)


KERNELS = {"linear": linear, "slerp": slerp, "nearswap": nearswap, "model_stock": model_stock}
ROWWISE = frozenset({"linear", "nearswap"})  # slerp and model_stock need whole-tensor norms
