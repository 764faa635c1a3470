"""What both healing modes share: the seeded order of training windows, the optimiser, the progress line."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from recipekit.engine.core.graph import Load
from recipekit.engine.core.kernels import generator
from recipekit.engine.progress import progress_bar


@dataclass(frozen=True)
class Settings:
    steps: int
    lr: float
    batch_size: int
    seed: int
    device: str = "cpu"
    progress: bool = False


@dataclass(frozen=True)
class Trained:
    """What a mode trained: the full name of every trained tensor -> its spilled values, and the loss of every
    optimiser step."""

    tensors: dict[str, Load]
    losses: list[float]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU kernels on one thread meanwhile. Their float32 reductions are split by thread (a layer's
    gradients differ in the last bits between 1 and 2 threads), and training compounds such bits into other
    weights, so a fixed count is what makes a heal byte-identical on every machine; one is also the fastest on a
    shared CPU, where spinning threads wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def batches(count: int, settings: Settings, label: str) -> Iterator[torch.Tensor]:
    """Row indices of `settings.batch_size` windows per step, forever: epochs of a permutation drawn from a
    generator seeded by the step's seed and `label`, so every run draws the same windows in the same order."""
    rng = generator(settings.seed, label)
    order: list[int] = []
    while True:
        while len(order) < settings.batch_size:
            order += torch.randperm(count, generator=rng).tolist()
        rows, order = order[:settings.batch_size], order[settings.batch_size:]
        yield torch.tensor(rows)


class Meter:
    """One progress bar over every optimiser step of a heal, with the last loss and tokens per second."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = progress_bar(total, enabled, unit="step", desc=desc)
        self.start = time.perf_counter()
        self.tokens = 0

    def step(self, loss: float, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"loss {loss:.4g}, {rate:,.0f} tok/s")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def fit(params: dict[str, torch.Tensor], loss_of: Callable[[torch.Tensor], torch.Tensor], rows: Iterator[torch.Tensor],
        settings: Settings, meter: Meter, tokens_per_row: int) -> list[float]:
    """`settings.steps` Adam steps on `params` (float32 leaves with requires_grad) of `loss_of(rows)`; the
    losses, one per step."""
    optimiser = torch.optim.Adam(params.values(), lr=settings.lr)
    losses = []
    for _ in range(settings.steps):
        batch = next(rows)
        loss = loss_of(batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        meter.step(losses[-1], len(batch) * tokens_per_row)
    return losses
