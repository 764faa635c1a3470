"""Blockwise healing: each student layer learns to produce the teacher's stream at the matching depth.

Layer-major, like the streamed forward: both streams hold every training window ([N, T, C] float32), and for
student layer j the teacher stream is first advanced through the teacher layers up to the one before where
student layer j + 1 came from; layer j's named tensors are then trained on (student stream in, teacher stream
out), and the student stream is advanced through the trained layer. One student and one teacher layer are read
at a time, each once.
"""
from __future__ import annotations

import math

import torch

from recipekit.engine.core.graph import Load
from recipekit.engine.io.inputs import InputFiles
from recipekit.engine.train.layer import Geometry, Stack
from recipekit.engine.train.loop import Meter, Settings, Trained, batches, fit
from recipekit.engine.train.spill import Spill


def blockwise(student: Stack, teacher: Stack, windows: list[list[int]], trained: dict[int, list[str]],
              depths: list[int], settings: Settings, spill: Spill, meter: Meter) -> Trained:
    """Train `trained[j]` (names after `layers.<j>.`) of each student layer j; student layer j came from teacher
    layer `depths[j]` (strictly increasing)."""
    ids = torch.tensor(windows, device=student.device)
    length = ids.shape[1]
    student_geometry, teacher_geometry = student.geometry(length), teacher.geometry(length)
    tensors: dict[str, Load] = {}
    losses: list[float] = []
    with InputFiles() as files, torch.no_grad():
        ours, theirs = student.embed(ids, files), teacher.embed(ids, files)
        done = 0  # teacher layers the teacher stream has been through
        for j in range(student.count):
            until = depths[j + 1] if j + 1 < student.count else teacher.count
            for t in range(done, until):
                _advance(teacher_geometry, t, teacher.read_layer(t, files), theirs, teacher.pass_batch(length))
            done = until
            weights = student.read_layer(j, files)
            if trained.get(j):
                with torch.enable_grad():
                    params, curve = _train_layer(student_geometry, j, weights, trained[j], ours, theirs, settings,
                                                 meter, length)
                losses += curve
                names = student.layer_names(j)
                for rest, value in params.items():
                    tensors[names[rest]] = spill.put(names[rest], value, student.model.tensors[names[rest]].dtype)
                    # later layers see what the output will compute: the trained values as stored
                    weights[rest] = value.detach().to(weights[rest].dtype)
            _advance(student_geometry, j, weights, ours, student.pass_batch(length))
            del weights
    return Trained(tensors, losses)


def _advance(geometry: Geometry, i: int, weights: dict[str, torch.Tensor], stream: torch.Tensor, batch: int) -> None:
    """Run layer i over the whole stream, in place, `batch` windows at a time."""
    for start in range(0, stream.shape[0], batch):
        stream[start:start + batch] = geometry.layer(i, weights, stream[start:start + batch])


def _train_layer(geometry: Geometry, j: int, weights: dict[str, torch.Tensor], names: list[str],
                 inputs: torch.Tensor, targets: torch.Tensor, settings: Settings, meter: Meter,
                 length: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Adam on float32 copies of `names` so that layer j maps `inputs` to `targets`; loss: the mean squared error
    relative to the targets' mean square (the same scale at every depth)."""
    params = {rest: weights[rest].detach().float().clone().requires_grad_(True) for rest in names}
    frozen = {rest: value for rest, value in weights.items() if rest not in params}

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(inputs.device)
        target = targets[rows]
        out = geometry.layer(j, {**frozen, **params}, inputs[rows])
        return (out - target).pow(2).mean() / target.pow(2).mean().clamp_min(math.ulp(1.0))

    curve = fit(params, loss_of, batches(inputs.shape[0], settings, f"heal blockwise layer {j}"), settings, meter,
                length)
    return params, curve
