"""Merges on the hypersphere, each in its `compute_dtype` (see `precision`): NuSLERP, Multi-SLERP and the Karcher
mean.

- NuSLERP interpolates two models (or, with a base, their task vectors) along the sphere by t = w2 / (w1 + w2):
  the whole tensor as one vector (`nuslerp_flatten`, the default), or each row (or, with `nuslerp_row_wise`,
  each column) on its own; where two vectors are parallel it interpolates linearly.
- Multi-SLERP interpolates any number of models (or task vectors) by their weights: projected onto the unit
  sphere, averaged in the tangent space at their weighted mean direction, mapped back, and scaled by the
  weighted mean of their norms.
- The Karcher mean is the point on the sphere that minimises the mean squared angle to every model (equal
  weights), found by at most `max_iter` Riemannian gradient steps, scaled by the models' mean norm.

Norms, dot products and cosines are computed in float32 at least; the per-vector norms, weights and angles that
scale a tensor are rounded to the compute dtype where they meet it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .precision import dtypes, restore

if TYPE_CHECKING:
    import torch


def _nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, flatten: bool, row_wise: bool,
             accumulate: torch.dtype) -> torch.Tensor:
    import torch

    shape, dtype = v0.shape, v0.dtype
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    # the unit vectors only feed the cosine, so they are in `accumulate` (a per-row norm widens them)
    u0 = v0 / v0.norm(dim=-1, keepdim=True, dtype=accumulate).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True, dtype=accumulate).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    del u0, u1
    parallel = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(parallel, 0, cos))
    spherical = (torch.sin((1 - t) * theta).to(dtype) * v0 + torch.sin(t * theta).to(dtype) * v1) \
        / torch.sin(theta).to(dtype)
    result = torch.where(parallel, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(*tensors: torch.Tensor, weights: tuple[float, float], nuslerp_flatten: bool, nuslerp_row_wise: bool,
            base: bool, compute_dtype: str = "F32", keep: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
    """Two models (after the base, when `base`): t = w2 / (w1 + w2), 0.5 when the weights sum to zero."""
    dtype, accumulate = dtypes(compute_dtype)
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    xs = [x.to(dtype) for x in tensors]
    options = {"flatten": nuslerp_flatten, "row_wise": nuslerp_row_wise, "accumulate": accumulate}
    if base:
        origin, a, b = xs
        result = origin + _nuslerp(t, a - origin, b - origin, **options)
    else:
        result = _nuslerp(t, xs[0], xs[1], **options)
    return restore(result, tensors, keep)


def multislerp(*tensors: torch.Tensor, weights: tuple[float, ...], normalize_weights: bool, eps: float, base: bool,
               compute_dtype: str = "F32", keep: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
    import torch

    dtype, accumulate = dtypes(compute_dtype)
    origin = tensors[0].to(dtype) if base else None
    points = [x.to(dtype) for x in (tensors[1:] if base else tensors)]
    if len(points) == 1:
        return restore(points[0].clone(), tensors, keep)
    stacked = torch.stack(points)
    if origin is not None:
        stacked -= origin
    flat = stacked.view(len(points), -1)
    w = torch.tensor(weights, dtype=accumulate, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    column = w.view(-1, 1).to(dtype)  # the weights where they scale the points
    norms = flat.norm(dim=-1, keepdim=True, dtype=accumulate)
    units = flat / (norms + eps).to(dtype)
    mean = (units * column).sum(0)
    mean_norm = mean.norm(dtype=accumulate)
    if mean_norm < eps:
        if len(points) != 2:
            raise ValueError("multislerp: the weighted directions cancel out (antipodal models with balancing "
                             "weights); change the weights")
        result = (flat[0] * w[0] + flat[1] * w[1]).view(stacked.shape[1:])
    else:
        mean = mean / mean_norm
        along = (units * mean).sum(-1, keepdim=True, dtype=accumulate).to(dtype)
        tangent = ((units - along * mean) * column).sum(0)
        length = tangent.norm(dtype=accumulate) + eps
        result = (mean * torch.cos(length) + tangent * (torch.sin(length) / length)) * (norms.squeeze(-1) * w).sum()
        result = result.view(stacked.shape[1:])
    if origin is not None:
        result = result + origin
    return restore(result, tensors, keep)


def karcher(*tensors: torch.Tensor, max_iter: int, tol: float, compute_dtype: str = "F32",
            keep: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
    import torch

    dtype, accumulate = dtypes(compute_dtype)
    xs = [x.to(dtype) for x in tensors]
    alpha = 1.0 / len(xs)
    norms = [x.norm(dtype=accumulate) for x in xs]
    units = [x / n if float(n) != 0 else torch.zeros_like(x) for x, n in zip(xs, norms)]
    valid = [k for k, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return restore(torch.zeros_like(xs[0]), tensors, keep)
    share = 1.0 / len(valid)  # the valid models' weights, renormalised
    mean = torch.zeros_like(xs[0])
    for k in valid:
        mean += share * units[k]
    mean_norm = mean.norm(dtype=accumulate)
    mean = units[valid[0]].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(int(max_iter)):
        tangent = torch.zeros_like(mean)
        flat_mean = mean.flatten().to(accumulate)  # torch.dot sums in its inputs' dtype
        for k in valid:
            dot = torch.clamp(torch.dot(flat_mean, units[k].flatten().to(accumulate)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += share * (theta / torch.sin(theta)) * (units[k] - dot * mean)
        length = tangent.norm(dtype=accumulate)
        if float(length) < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        unit_norm = mean.norm(dtype=accumulate)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    return restore(sum(alpha * n for n in norms) * mean, tensors, keep)


KERNELS = {"nuslerp": nuslerp, "multislerp": multislerp, "karcher": karcher}
# working copies each kernel holds at its peak besides its inputs, in float32 copies of the tensor, as
# (per input, fixed): measured by benchmarks/kernel_memory.py; the plan and the writer's admission count them
SCRATCH = {"nuslerp": (3.0, 0.5), "multislerp": (5.0, -2.5), "karcher": (2.0, 5.5)}
