"""End-to-end healing: the whole student in memory, only the named tensors trainable.

The loss is next-token cross-entropy over the training windows, or, with a teacher, the KL divergence from the
teacher's next-token distribution (the teacher in memory too, its logits computed batch by batch without
gradients). Memory is the whole model's: meant for `--device cuda`, correct (and slow) on the CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from recipekit.engine.io.inputs import InputFiles
from recipekit.engine.train.layer import Geometry, Stack
from recipekit.engine.train.loop import Meter, Settings, Trained, batches, fit
from recipekit.engine.train.spill import Spill


class _Whole:
    """Every weight of a stack, read once: layers in their stored dtype, the final norm and the head."""

    def __init__(self, stack: Stack, length: int, files: InputFiles):
        self.geometry: Geometry = stack.geometry(length)
        self.layers = [stack.read_layer(i, files) for i in range(stack.count)]
        self.norm, self.head = stack.head(files)

    def logits(self, stream: torch.Tensor) -> torch.Tensor:
        for i, weights in enumerate(self.layers):
            stream = self.geometry.layer(i, weights, stream)
        return self.geometry.logits(stream, self.norm, self.head)


def end_to_end(student: Stack, teacher: Stack | None, windows: list[list[int]], trained: dict[int, list[str]],
               settings: Settings, spill: Spill, meter: Meter) -> Trained:
    """Train `trained[j]` (names after `layers.<j>.`) of the student's layers on the whole model's loss."""
    ids = torch.tensor(windows, device=student.device)
    length = ids.shape[1]
    with InputFiles() as files:
        with torch.no_grad():
            embedded = student.embed(ids, files)
            teacher_embedded = teacher.embed(ids, files) if teacher is not None else None
        model = _Whole(student, length, files)
        reference = _Whole(teacher, length, files) if teacher is not None else None
    params = {}
    for j, names in trained.items():
        for rest in names:
            value = model.layers[j][rest].detach().float().clone().requires_grad_(True)
            model.layers[j][rest] = params[(j, rest)] = value

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(ids.device)
        logits = model.logits(embedded[rows])[:, :-1]
        if reference is None:
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[rows, 1:].reshape(-1))
        with torch.no_grad():
            wanted = F.log_softmax(reference.logits(teacher_embedded[rows])[:, :-1], dim=-1)
        got = F.log_softmax(logits, dim=-1)
        return F.kl_div(got.reshape(-1, got.shape[-1]), wanted.reshape(-1, wanted.shape[-1]), log_target=True,
                        reduction="batchmean")

    losses = fit({f"{j}.{rest}": p for (j, rest), p in params.items()}, loss_of,
                 batches(len(windows), settings, "heal end_to_end"), settings, meter, length)
    tensors = {}
    for (j, rest), value in params.items():
        name = student.layer_names(j)[rest]
        tensors[name] = spill.put(name, value, student.model.tensors[name].dtype)
    return Trained(tensors, losses)
