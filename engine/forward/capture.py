"""Observers for the streamed forward: keep what an analysis needs, not whole activations.

Pass one as `observer=` to `StreamedForward.run`; each sees every
`Activation` (point, layer, tensor [b, T, C], valid [b, T], rows).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from recipekit.engine.forward.streamed import Activation


@dataclass
class MaxAbs:
    """Per-channel max |activation| over all real tokens, for the chosen points: `values[(point, layer)]` is [C]."""

    points: tuple[str, ...]
    values: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    def __call__(self, a: Activation) -> None:
        if a.point not in self.points:
            return
        peak = a.tensor.abs().masked_fill(~a.valid[..., None], 0).amax(dim=(0, 1))
        key = (a.point, a.layer)
        self.values[key] = peak if key not in self.values else torch.maximum(self.values[key], peak)

    def held_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.values.values())


def _append(values: dict[tuple[str, int], torch.Tensor], a: Activation, rows: torch.Tensor) -> None:
    """Add one micro-batch's per-sequence rows [b, C] under (point, layer), in sequence order."""
    key = (a.point, a.layer)
    values[key] = rows if key not in values else torch.cat([values[key], rows])


@dataclass
class LastToken:
    """The activation at each sequence's last real token: `values[(point, layer)]` is [B, C]."""

    points: tuple[str, ...]
    values: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    def __call__(self, a: Activation) -> None:
        if a.point in self.points:
            last = a.valid.sum(dim=1) - 1
            _append(self.values, a, a.tensor[torch.arange(a.tensor.shape[0], device=a.tensor.device), last])


@dataclass
class MeanToken:
    """The mean activation over each sequence's real tokens: `values[(point, layer)]` is [B, C].

    With `skip_first`, position 0 (a BOS token, the same in every sequence) is left out of sequences longer than one.
    """

    points: tuple[str, ...]
    skip_first: bool = False
    values: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    def __call__(self, a: Activation) -> None:
        if a.point in self.points:
            used = a.valid.clone()
            if self.skip_first:
                used[:, 0] &= a.valid.sum(dim=1) == 1
            weights = used.to(a.tensor.dtype)[..., None]
            _append(self.values, a, (a.tensor * weights).sum(dim=1) / weights.sum(dim=1))
