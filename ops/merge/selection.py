"""Merges that choose, entry by entry, which task vectors count: SCE, RAM, RAM+ (tensor-local), Arcee Fusion.

All compute in their `compute_dtype` (see `precision`), task vectors d_k = x_k - base:
- SCE keeps the `select_topk` fraction of entries where the models disagree most (variance across models),
  erases the entries whose sign disagrees with the sum's, and weights each model by its task vector's mean
  square (normalised over the models).
- RAM averages an entry only over the models that changed it (|d_k| > epsilon): where one model alone did, its
  change is kept whole. RAM+ scales such unique changes of model k by 1 + r * min(shared_k / unique_k, alpha),
  where shared_k and unique_k count the entries model k shares with others or changes alone.
- Arcee Fusion keeps the other model's change where its importance, |d| times the KL divergence of the two
  rows' softmax, is at least median + 1.5 IQR of all importances (quartiles from a seeded sample of a million
  entries on large tensors, as mergekit samples, but reproducibly).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from recipekit.engine.core.kernels import generator

from .precision import dtypes, restore

if TYPE_CHECKING:
    import torch

QUANTILE_SAMPLE = 1_000_000


def _task_vectors(base: torch.Tensor, others: tuple[torch.Tensor, ...],
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    origin = base.to(dtype)
    return origin, torch.stack([x.to(dtype) - origin for x in others])


def sce(base: torch.Tensor, *others: torch.Tensor, select_topk: float, int8_mask: bool = False,
        compute_dtype: str = "F32", keep: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
    import torch

    dtype, accumulate = dtypes(compute_dtype)
    origin, tvs = _task_vectors(base, others, dtype)
    if select_topk < 1:
        variance = tvs.var(dim=0, unbiased=False).reshape(-1)
        k = int(int(torch.count_nonzero(variance)) * select_topk) if select_topk > 0 else 0
        chosen = torch.zeros_like(variance, dtype=torch.bool)
        if k > 0:
            chosen[torch.topk(variance.abs(), k).indices] = True
        tvs = tvs * chosen.view(tvs.shape[1:])
    positive = tvs.sum(dim=0) >= 0
    agrees = torch.where(positive, tvs > 0, tvs < 0)
    energy = tvs.square().reshape(len(others), -1).mean(dim=1, dtype=accumulate)
    total = float(energy.sum())
    weights = torch.full_like(energy, 1 / len(others)) if abs(total) < 1e-6 else energy / total
    erased = weights.to(dtype).view(-1, *[1] * (tvs.dim() - 1)) * agrees
    merged = (tvs * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)
    return restore(origin + merged, (base, *others), keep)


def _ram_masks(tvs: torch.Tensor, epsilon: float):
    flat = tvs.view(tvs.shape[0], -1)
    changed = flat.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return flat, changed, counts, counts > 1, counts == 1


def ram(base: torch.Tensor, *others: torch.Tensor, epsilon: float, compute_dtype: str = "F32",
        keep: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
    origin, tvs = _task_vectors(base, others, dtypes(compute_dtype)[0])
    flat, changed, counts, shared, unique = _ram_masks(tvs, epsilon)
    kept = flat * changed
    merged = (kept * unique + kept * shared / counts.clamp(min=1)).sum(dim=0)
    return restore(origin + merged.view(origin.shape), (base, *others), keep)


def ramplus_tl(base: torch.Tensor, *others: torch.Tensor, r: float, alpha: float, epsilon: float,
               compute_dtype: str = "F32", keep: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
    dtype, _ = dtypes(compute_dtype)
    origin, tvs = _task_vectors(base, others, dtype)
    flat, changed, counts, shared, unique = _ram_masks(tvs, epsilon)
    rho = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=epsilon)  # a ratio of counts
    boost = (1 + r * rho.clamp(min=0, max=alpha)).to(dtype)
    kept = flat * changed
    merged = (kept * unique * boost.unsqueeze(-1) + kept * shared / counts.clamp(min=1)).sum(dim=0)
    return restore(origin + merged.view(origin.shape), (base, *others), keep)


def arcee_fusion(base: torch.Tensor, other: torch.Tensor, *, seed: int, name: str, compute_dtype: str = "F32",
                 keep: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
    """The KL divergence of the rows is a reduction: computed in float32 at least (in float16 the softmax of a
    wide row underflows, and 0 * log 0 is nan)."""
    import torch
    import torch.nn.functional as F

    dtype, accumulate = dtypes(compute_dtype)
    origin, x = base.to(dtype), other.to(dtype)
    p = F.softmax(x, dim=-1, dtype=accumulate) + 1e-8
    q = F.softmax(origin, dim=-1, dtype=accumulate) + 1e-8
    divergence = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    del p, q
    importance = (x - origin).abs() * divergence.to(dtype)
    flat = importance.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        picks = torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator(seed, name))
        flat = flat[picks.to(flat.device)]
    ordered = torch.sort(flat).values
    q1, median, q3 = (ordered[int(q * (ordered.numel() - 1))] for q in (0.25, 0.5, 0.75))
    chosen = importance >= median + 1.5 * (q3 - q1)
    return restore(origin + (x - origin) * chosen, (base, other), keep)


KERNELS = {"sce": sce, "ram": ram, "ramplus_tl": ramplus_tl, "arcee_fusion": arcee_fusion}
# working copies each kernel holds at its peak besides its inputs, in float32 copies of the tensor, as
# (per input, fixed): measured by benchmarks/kernel_memory.py; the plan and the writer's admission count them
SCRATCH = {"sce": (3.0, 2.5), "ram": (5.25, 1.75), "ramplus_tl": (5.25, 1.75), "arcee_fusion": (0.0, 7.0)}
