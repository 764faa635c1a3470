"""The SNR kernel against a direct numpy computation of laserRMT's formula, on hand-made matrices."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recipekit.engine.core.rmt import snr


def numpy_snr(w: np.ndarray) -> float:
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    sigma = (np.quantile(s, 0.75) - np.quantile(s, 0.25)) / 1.349
    beta = min(w.shape) / max(w.shape)
    threshold = sigma * (1 + math.sqrt(beta))
    noise = s[s <= threshold].sum()
    return math.inf if not (s <= threshold).any() else s[s > threshold].sum() / noise


def test_square_noise_is_finite_and_low():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    result = snr(w)
    assert math.isfinite(result.snr) and result.snr < 1
    assert result.snr == pytest.approx(numpy_snr(w.numpy()), rel=1e-9)


def test_rank_four_signal_is_detected():
    """A hand-made spectrum: four large values over a noise floor whose spread the IQR estimate captures."""
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    noise = torch.cat([1e-3 * torch.rand(98, generator=g, dtype=torch.float64),
                       0.9 + 0.1 * torch.rand(98, generator=g, dtype=torch.float64)])
    spectrum = torch.cat([torch.tensor([40.0, 30.0, 20.0, 10.0], dtype=torch.float64), noise])
    w = u @ torch.diag(spectrum) @ v.T
    result = snr(w)
    assert result.signal_values == 4
    assert result.snr == pytest.approx(numpy_snr(w.numpy()), rel=1e-9)
    assert result.snr_over_max == pytest.approx(result.snr / np.linalg.svd(w.double().numpy(),
                                                                          compute_uv=False).max(), rel=1e-9)


def test_rectangular_gaussian_noise_is_infinite():
    """The documented caveat: 'infinite' flags well-conditioned rectangular matrices, not signal."""
    w = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(2))
    result = snr(w)
    assert result.snr == math.inf == numpy_snr(w.numpy())
