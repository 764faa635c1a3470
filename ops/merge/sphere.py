"""Merges on the hypersphere, in float32: NuSLERP, Multi-SLERP and the Karcher mean.

- NuSLERP interpolates two models (or, with a base, their task vectors) along the sphere by t = w2 / (w1 + w2):
  the whole tensor as one vector (`nuslerp_flatten`, the default), or each row (or, with `nuslerp_row_wise`,
  each column) on its own; where two vectors are parallel it interpolates linearly.
- Multi-SLERP interpolates any number of models (or task vectors) by their weights: projected onto the unit
  sphere, averaged in the tangent space at their weighted mean direction, mapped back, and scaled by the
  weighted mean of their norms.
- The Karcher mean is the point on the sphere that minimises the mean squared angle to every model (equal
  weights), found by at most `max_iter` Riemannian gradient steps, scaled by the models' mean norm.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .interpolate import restore

if TYPE_CHECKING:
    import torch


def _nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, flatten: bool, row_wise: bool) -> torch.Tensor:
    import torch

    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    parallel = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(parallel, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(parallel, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(*tensors: torch.Tensor, weights: tuple[float, float], nuslerp_flatten: bool, nuslerp_row_wise: bool,
            base: bool, keep: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
    """Two models (after the base, when `base`): t = w2 / (w1 + w2), 0.5 when the weights sum to zero."""
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    xs = [x.float() for x in tensors]
    if base:
        origin, a, b = xs
        result = origin + _nuslerp(t, a - origin, b - origin, flatten=nuslerp_flatten, row_wise=nuslerp_row_wise)
    else:
        result = _nuslerp(t, xs[0], xs[1], flatten=nuslerp_flatten, row_wise=nuslerp_row_wise)
    return restore(result, tensors, keep)


def multislerp(*tensors: torch.Tensor, weights: tuple[float, ...], normalize_weights: bool, eps: float, base: bool,
               keep: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
    import torch

    origin = tensors[0].float() if base else None
    points = [x.float() for x in (tensors[1:] if base else tensors)]
    if len(points) == 1:
        return restore(points[0].clone(), tensors, keep)
    stacked = torch.stack(points)
    if origin is not None:
        stacked -= origin
    flat = stacked.view(len(points), -1)
    w = torch.tensor(weights, dtype=torch.float32, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        if len(points) != 2:
            raise ValueError("multislerp: the weighted directions cancel out (antipodal models with balancing "
                             "weights); change the weights")
        result = (flat[0] * w[0] + flat[1] * w[1]).view(stacked.shape[1:])
    else:
        mean = mean / mean_norm
        tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * w.view(-1, 1)).sum(0)
        length = tangent.norm() + eps
        result = (mean * torch.cos(length) + tangent * (torch.sin(length) / length)) * (norms.squeeze(-1) * w).sum()
        result = result.view(stacked.shape[1:])
    if origin is not None:
        result = result + origin
    return restore(result, tensors, keep)


def karcher(*tensors: torch.Tensor, max_iter: int, tol: float,
            keep: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
    import torch

    xs = [x.float() for x in tensors]
    alpha = 1.0 / len(xs)
    norms = [x.norm() for x in xs]
    units = [x / n if float(n) != 0 else torch.zeros_like(x) for x, n in zip(xs, norms)]
    valid = [k for k, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return restore(torch.zeros_like(xs[0]), tensors, keep)
    share = 1.0 / len(valid)  # the valid models' weights, renormalised
    mean = torch.zeros_like(xs[0])
    for k in valid:
        mean += share * units[k]
    mean_norm = mean.norm()
    mean = units[valid[0]].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(int(max_iter)):
        tangent = torch.zeros_like(mean)
        for k in valid:
            dot = torch.clamp(torch.dot(mean.flatten(), units[k].flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += share * (theta / torch.sin(theta)) * (units[k] - dot * mean)
        length = tangent.norm()
        if float(length) < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        unit_norm = mean.norm()
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    return restore(sum(alpha * n for n in norms) * mean, tensors, keep)


KERNELS = {"nuslerp": nuslerp, "multislerp": multislerp, "karcher": karcher}
