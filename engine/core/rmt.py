"""Random-matrix signal-to-noise ratio of a weight matrix, as laserRMT computes it.

Singular values S (float64); sigma = (q75(S) - q25(S)) / 1.349 estimates the
noise scale; the Marchenko-Pastur edge for aspect ratio beta = min/max is
sigma * (1 + sqrt(beta)). SNR = sum of S above the edge / sum of S at or
below it: infinite when no singular value is at or below the edge. That is
not "all signal": a well-conditioned rectangular matrix (even pure Gaussian
noise of shape 1024 x 4096) has every singular value above this edge.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SNR:
    snr: float  # math.inf when no singular value is at or below the threshold
    snr_over_max: float  # snr / max(S)
    threshold: float
    signal_values: int  # how many singular values are above the threshold


def snr(weight: torch.Tensor) -> SNR:
    """[out, in] matrix -> its random-matrix SNR (computed in float64)."""
    values = singular_values(weight)
    threshold = noise_edge(values, tuple(weight.shape))
    above = values > threshold
    signal, noise = float(values[above].sum()), float(values[~above].sum())
    ratio = math.inf if not (~above).any() else signal / noise
    return SNR(ratio, ratio / float(values.max()), threshold, int(above.sum()))


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Singular values in float64, largest first, from the eigenvalues of the smaller Gram matrix.

    The same values as an SVD (to about 1e-10 relative for the values that matter here), about ten times
    faster: a 1024 x 4096 matrix takes a fraction of a second on two cores instead of seconds.
    """
    import torch

    w = weight.to(torch.float64)
    if w.shape[0] > w.shape[1]:
        w = w.T
    return torch.linalg.eigvalsh(w @ w.T).clamp_min(0).sqrt().flip(0)


def noise_edge(values: torch.Tensor, shape: tuple[int, int]) -> float:
    """The Marchenko-Pastur edge estimated from a matrix's singular values: sigma * (1 + sqrt(beta))."""
    import torch

    quartiles = torch.tensor([0.25, 0.75], dtype=torch.float64, device=values.device)
    q25, q75 = torch.quantile(values.to(torch.float64), quartiles).tolist()
    sigma = (q75 - q25) / 1.349
    rows, cols = shape
    return sigma * (1 + math.sqrt(min(rows, cols) / max(rows, cols)))
