"""Task-vector merges: task arithmetic, TIES, DARE, Model Breadcrumbs and DELLA, one kernel each.

Every one computes in float32: task vectors d_k = x_k - base, each sparsified (TIES: keep the largest
`density` of |d_k|; DARE: keep each entry with probability `density`; breadcrumbs: drop the largest `gamma` and
the smallest, keeping `density`; DELLA: keep with a probability that grows with the entry's magnitude rank within
its row, density +- epsilon), then weighted, optionally sign-elected (the `_ties` forms and TIES and DELLA: an
entry counts only where its sign agrees with the sign of the weighted sum), summed, divided by the weights that
took part (`normalize`), scaled by `lambda` and added to the base.

Differences from mergekit, on purpose:
- breadcrumbs: when `gamma` cuts no top entry (small tensors, or gamma 0), mergekit before 0.1.5 kept nothing,
  losing the whole task vector; here, as in 0.1.5, the largest `density` stay.
- `rescale`: mergekit scales the kept entries so the L1 norm of the task vector is unchanged (the
  default here too, `rescale_by: l1`); the papers divide by the keep probability (`rescale_by: density`).
- random masks come from a generator seeded by the recipe's seed, the tensor's name and the model's position,
  drawn on the CPU: the same bytes on every run and on every device.
Entries in `keep` (protected super weights) are restored exactly from the input that holds them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from recipekit.engine.core.kernels import generator

if TYPE_CHECKING:
    import torch


def _magnitude(delta: torch.Tensor, density: float, **_) -> torch.Tensor:
    """Keep the int(density * n) entries of largest magnitude (at least one, for a density above 0)."""
    import torch

    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    mask = torch.zeros_like(flat)
    if density > 0 and flat.numel():
        mask[torch.topk(flat.abs(), max(1, int(density * flat.numel())), sorted=False).indices] = 1
    return (flat * mask).reshape(delta.shape)


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
    """Keep each entry with probability `density` (DARE)."""
    import torch

    if density >= 1:
        return delta
    mask = torch.rand(delta.shape, generator=rng, dtype=torch.float32) < density
    return delta * mask.to(delta.device)


def _rank_sampled(delta: torch.Tensor, density: float, epsilon: float, rng: torch.Generator,
                  **_) -> torch.Tensor:
    """Keep each entry with probability density - epsilon + 2 epsilon * (its magnitude rank in its row, 0..1)."""
    import torch

    if density >= 1:
        return delta
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).float()
    spread = (ranks / max(rows.shape[1] - 1, 1)).clamp(0, 1)
    probability = (density - epsilon) + spread * (2 * epsilon)
    draws = torch.rand(rows.shape, generator=rng, dtype=torch.float32).to(delta.device)
    return (rows * (draws < probability)).reshape(delta.shape)


def _rescaled(kept: torch.Tensor, delta: torch.Tensor, density: float, rescale_by: str) -> torch.Tensor:
    if rescale_by == "density":
        return kept / density if 0 < density < 1 else kept
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


SPARSIFY = {"task_arithmetic": None, "ties": _magnitude, "dare_ties": _random, "dare_linear": _random,
            "breadcrumbs": _outliers, "breadcrumbs_ties": _outliers, "della": _rank_sampled,
            "della_linear": _rank_sampled}
CONSENSUS = ("ties", "dare_ties", "breadcrumbs_ties", "della")


def task_vector_merge(method: str, base: torch.Tensor, *others: torch.Tensor, weights: tuple[float, ...],
                      densities: tuple[float, ...], gammas: tuple[float, ...] = (), epsilons: tuple[float, ...] = (),
                      normalize: bool, lambda_: float = 1.0, rescale: bool = False, rescale_by: str = "l1",
                      int8_mask: bool = False, seed: int = 0, name: str = "",
                      keep: tuple[tuple[int, int, int], ...] = ()) -> torch.Tensor:
    """[*shape] x (1 + models) -> [*shape] float32. `int8_mask` only saves memory in mergekit; here the sign mask
    is boolean, so it changes nothing."""
    import torch

    origin = base.float()
    sparsify = SPARSIFY[method]
    mixed = torch.zeros_like(origin)
    deltas = []
    for k, x in enumerate(others):
        delta = x.float() - origin
        if sparsify is not None:
            kept = sparsify(delta, densities[k], gamma=gammas[k] if gammas else 0.0,
                            epsilon=epsilons[k] if epsilons else 0.0, rng=generator(seed, f"{name}\0{k}"))
            delta = _rescaled(kept, delta, densities[k], rescale_by) if rescale else kept
        deltas.append(delta * weights[k])
    if method in CONSENSUS:
        total = torch.stack(deltas).sum(dim=0)
        majority = torch.where(total >= 0, 1.0, -1.0)
        divisor = torch.zeros_like(origin)
        for k, weighted in enumerate(deltas):
            agrees = weighted.sign() == majority
            mixed += torch.where(agrees, weighted, 0.0)
            divisor += agrees * weights[k]
        divisor[divisor == 0] = 1
    else:
        for weighted in deltas:
            mixed += weighted
        divisor = torch.tensor(sum(weights))
        if divisor.abs() < 1e-8:
            divisor = torch.tensor(1.0)
    if normalize:
        mixed = mixed / divisor
    result = origin + mixed * lambda_
    inputs = (base, *others)
    for row, column, source in keep:
        result[row, column] = inputs[source][row, column].float()
    return result


def _kernel(method: str):
    def kernel(base: torch.Tensor, *others: torch.Tensor, **params) -> torch.Tensor:
        return task_vector_merge(method, base, *others, **params)
    kernel.__name__ = method
    kernel.__doc__ = f"The {method} merge: see `task_vector_merge`."
    return kernel


KERNELS = {method: _kernel(method) for method in SPARSIFY}
ROWWISE = frozenset({"task_arithmetic"})  # the others sparsify by whole-tensor ranks or draw masks
