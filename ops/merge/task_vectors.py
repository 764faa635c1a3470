"""Task-vector merges: task arithmetic, TIES, DARE, Model Breadcrumbs and DELLA, one kernel each.

Every one computes in its `compute_dtype` (see `precision`): task vectors d_k = x_k - base, each sparsified
(TIES: keep the largest `density` of |d_k|; DARE: keep each entry with probability `density`; breadcrumbs: drop
the largest `gamma` and the smallest, keeping `density`; DELLA: keep with a probability that grows with the
entry's magnitude rank within its row, density +- epsilon), then weighted, optionally sign-elected (the `_ties`
forms and TIES and DELLA: an entry counts only where its sign agrees with the sign of the weighted sum), summed,
divided by the weights that took part (`normalize`), scaled by `lambda` and added to the base.

Differences from mergekit, on purpose:
- breadcrumbs: when `gamma` cuts no top entry (small tensors, or gamma 0), mergekit before 0.1.5 kept nothing,
  losing the whole task vector; here, as in 0.1.5, the largest `density` stay.
- `rescale`: mergekit scales the kept entries so the L1 norm of the task vector is unchanged (the
  default here too, `rescale_by: l1`); the papers divide by the keep probability (`rescale_by: density`).
- random masks come from a generator seeded by the recipe's seed, the tensor's name and the model's position,
  drawn on the CPU: the same bytes on every run and on every device.
- TIES: of the entries exactly at the magnitude threshold, those first in memory order are kept (mergekit: its
  full sort's order), so that no sort and no eight-byte index per entry is needed.
Entries in `keep` (protected super weights) are restored exactly from the input that holds them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from recipekit.engine.core.kernels import generator

from .precision import dtypes, restore

if TYPE_CHECKING:
    import torch


def _magnitude(delta: torch.Tensor, density: float, **_) -> torch.Tensor:
    """Keep the int(density * n) entries of largest magnitude (at least one, for a density above 0); among
    entries exactly at the threshold, the first in memory order. In place."""

    import torch

    if density >= 1:
        return delta
    flat = delta.view(-1)
    n = flat.numel()
    k = max(1, int(density * n)) if density > 0 and n else 0
    if k == 0:
        return delta.zero_()
    magnitude = flat.abs()
    threshold = kth_largest(magnitude, k)
    keep = magnitude > threshold
    _keep_first_ties(keep, magnitude, threshold, k - int(torch.count_nonzero(keep)))
    del magnitude
    flat.masked_fill_(~keep, 0)
    return delta


def _keep_first_ties(keep: torch.Tensor, magnitude: torch.Tensor, threshold: torch.Tensor, missing: int) -> None:
    """Mark the first `missing` entries equal to the threshold, block by block: a low-precision tensor can tie
    millions of entries there, and their indices at once would cost eight bytes each."""
    import torch

    for start in range(0, magnitude.numel(), ELECT_BLOCK):
        if missing <= 0:
            return
        tied = magnitude[start:start + ELECT_BLOCK] == threshold
        count = int(torch.count_nonzero(tied))
        if count <= missing:
            keep[start:start + ELECT_BLOCK] |= tied
        else:
            keep[start + tied.nonzero().view(-1)[:missing]] = True
        missing -= count


SAMPLE = 2**20  # entries of the strided sample that brackets the k-th largest value


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of a 1-D float tensor, exactly, in a few passes and with little memory beyond boolean
    masks (torch's kthvalue and topk hold eight bytes of indices per entry).

    A strided sample brackets the value between two of its order statistics, wide enough that the bracket holds
    it unless the data are adversarial; the entries inside the bracket (a small fraction) are then ranked
    exactly. When a bracket misses, the whole tensor is ranked with kthvalue.
    """
    import torch

    n = values.numel()
    if n <= 4 * SAMPLE:
        return torch.kthvalue(values, n - k + 1).values
    stride = n // SAMPLE
    sample = values[::stride].contiguous()
    m = sample.numel()
    rank = (n - k + 1) * m / n  # the k-th largest is about the rank-th smallest of the sample
    spread = 6 * (m * 0.25) ** 0.5 + 2  # six standard deviations of a sample quantile, with room for rounding
    low = torch.kthvalue(sample, max(1, int(rank - spread))).values
    high = torch.kthvalue(sample, min(m, int(rank + spread) + 1)).values
    del sample
    above = int(torch.count_nonzero(values > high))  # a bool sum would widen to int64
    if low == high:  # low precision: one value, tied by many entries, may fill the bracket
        if above < k <= above + int(torch.count_nonzero(values == high)):
            return high
        return torch.kthvalue(values, n - k + 1).values
    inside = torch.cat([block[(block >= low) & (block <= high)] for block in values.split(ELECT_BLOCK)])
    if above < k <= above + inside.numel():
        return torch.kthvalue(inside, inside.numel() - (k - above) + 1).values
    return torch.kthvalue(values, n - k + 1).values


def _outliers(delta: torch.Tensor, density: float, gamma: float, **_) -> torch.Tensor:
    """Drop the int(gamma * n) largest magnitudes, then the smallest, so that int(density * n) entries stay."""
    import torch

    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    n = flat.numel()
    keep, top = int(density * n), int(gamma * n)
    top = min(top, n - keep)  # never cut so many large entries that fewer than `keep` remain
    order = torch.argsort(flat.abs())
    mask = torch.zeros_like(flat)
    mask[order[n - top - keep:n - top]] = 1
    return (flat * mask).reshape(delta.shape)


def _random(delta: torch.Tensor, density: float, rng: torch.Generator, **_) -> torch.Tensor:
    """Keep each entry with probability `density` (DARE), drawn in float32 whatever the compute dtype."""
    import torch

    if density >= 1:
        return delta
    mask = torch.rand(delta.shape, generator=rng, dtype=torch.float32) < density
    return delta * mask.to(delta.device)


def _rank_sampled(delta: torch.Tensor, density: float, epsilon: float, rng: torch.Generator,
                  **_) -> torch.Tensor:
    """Keep each entry with probability density - epsilon + 2 epsilon * (its magnitude rank in its row, 0..1).
    Ranks, probabilities and draws are float32 whatever the compute dtype (bfloat16 cannot count past 256)."""
    import torch

    if density >= 1:
        return delta
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).float()
    spread = (ranks / max(rows.shape[1] - 1, 1)).clamp(0, 1)
    probability = (density - epsilon) + spread * (2 * epsilon)
    draws = torch.rand(rows.shape, generator=rng, dtype=torch.float32).to(delta.device)
    return (rows * (draws < probability)).reshape(delta.shape)


def _rescaled(kept: torch.Tensor, before: float, density: float, rescale_by: str,
              accumulate: torch.dtype) -> torch.Tensor:
    """What sparsifying kept, scaled back up: by 1 / density, or so that its L1 norm is `before` again."""
    if rescale_by == "density":
        return kept.div_(density) if 0 < density < 1 else kept
    after = float(kept.abs().sum(dtype=accumulate))
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept.mul_(before / after)


SPARSIFY = {"task_arithmetic": None, "ties": _magnitude, "dare_ties": _random, "dare_linear": _random,
            "breadcrumbs": _outliers, "breadcrumbs_ties": _outliers, "della": _rank_sampled,
            "della_linear": _rank_sampled}
CONSENSUS = ("ties", "dare_ties", "breadcrumbs_ties", "della")


def task_vector_merge(method: str, base: torch.Tensor, *others: torch.Tensor, weights: tuple[float, ...],
                      densities: tuple[float, ...], gammas: tuple[float, ...] = (), epsilons: tuple[float, ...] = (),
                      normalize: bool, lambda_: float = 1.0, rescale: bool = False, rescale_by: str = "l1",
                      int8_mask: bool = False, seed: int = 0, name: str = "", compute_dtype: str = "F32",
                      keep: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
    """[*shape] x (1 + models) -> [*shape] in `compute_dtype`. `int8_mask` only saves memory in mergekit; here the
    sign mask is boolean, so it changes nothing.

    Works in place where it can: besides the inputs it holds, in the compute dtype, one task vector per model, the
    base and, for sign election, one sum; and boolean masks.
    """
    dtype, accumulate = dtypes(compute_dtype)
    sparsify = SPARSIFY[method]
    origin = base.to(dtype, copy=True)  # the result's buffer; inputs are never changed in place
    deltas = []
    for k, x in enumerate(others):
        delta = x.to(dtype, copy=True).sub_(origin)
        if sparsify is not None:
            before = float(delta.abs().sum(dtype=accumulate)) if rescale and rescale_by == "l1" else 0.0
            delta = sparsify(delta, densities[k], gamma=gammas[k] if gammas else 0.0,
                             epsilon=epsilons[k] if epsilons else 0.0, rng=generator(seed, f"{name}\0{k}"))
            if rescale:
                delta = _rescaled(delta, before, densities[k], rescale_by, accumulate)
        deltas.append(delta.mul_(weights[k]))
    if method in CONSENSUS and len(deltas) == 1 and weights[0] != 0:
        # one model agrees with itself wherever it changed something: the same arithmetic as the election
        # (weighted change divided by the weight that counted), without its masks
        origin.add_(deltas[0].div_(weights[0]) if normalize else deltas[0], alpha=lambda_)
    elif method in CONSENSUS:
        _elect(origin, deltas, weights, normalize=normalize, lambda_=lambda_)
    else:
        mixed = deltas[0]
        for weighted in deltas[1:]:
            mixed.add_(weighted)
        total = sum(weights)
        if normalize:
            mixed.div_(total if abs(total) >= 1e-8 else 1.0)
        origin.add_(mixed, alpha=lambda_)
    del deltas
    return restore(origin, (base, *others), keep)


ELECT_BLOCK = 2**22  # entries per block of the sign election: its temporaries stay a few tens of MB


def _elect(origin: torch.Tensor, deltas: list[torch.Tensor], weights: tuple[float, ...], *, normalize: bool,
           lambda_: float) -> None:
    """TIES sign election, added to `origin` in place: an entry of a weighted task vector counts where its sign is
    that of their sum (zeros count for neither); with `normalize`, divided by the weights that counted. Block by
    block, so besides the task vectors it needs only small temporaries."""
    import torch

    out = origin.view(-1)
    flats = [d.view(-1) for d in deltas]
    for start in range(0, out.numel(), ELECT_BLOCK):
        end = min(start + ELECT_BLOCK, out.numel())
        parts = [f[start:end] for f in flats]
        total = torch.zeros_like(parts[0])
        for part in parts:
            total.add_(part)
        positive = total >= 0
        total.zero_()
        divisor = torch.zeros_like(total)
        for part, weight in zip(parts, weights):
            agrees = torch.where(positive, part > 0, part < 0)
            total.add_(part.masked_fill(~agrees, 0))
            divisor.add_(agrees, alpha=weight)
        if normalize:
            total.div_(divisor.masked_fill_(divisor == 0, 1))
        out[start:end].add_(total, alpha=lambda_)


def _kernel(method: str):
    def kernel(base: torch.Tensor, *others: torch.Tensor, **params) -> torch.Tensor:
        return task_vector_merge(method, base, *others, **params)
    kernel.__name__ = method
    kernel.__doc__ = f"The {method} merge: see `task_vector_merge`."
    return kernel


KERNELS = {method: _kernel(method) for method in SPARSIFY}
# working copies each kernel holds at its peak besides its inputs, in float32 copies of the tensor, as
# (per input, fixed): measured by benchmarks/kernel_memory.py; the plan and the writer's admission count them
SCRATCH = {"task_arithmetic": (1.0, 0.5), "ties": (1.25, 1.0), "dare_ties": (1.25, 1.75), "dare_linear": (1.25, 1.75),
           "breadcrumbs": (1.0, 6.5), "breadcrumbs_ties": (1.0, 6.5), "della": (1.0, 6.5), "della_linear": (1.0, 6.5)}
ROWWISE = frozenset({"task_arithmetic"})  # the others sparsify by whole-tensor ranks or draw masks
