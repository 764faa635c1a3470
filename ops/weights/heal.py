"""heal: train the named modules of a (pruned) model so that it recovers what was removed.

`blockwise` distils layer by layer from a teacher (the model before pruning), one layer of each in memory;
`end_to_end` trains through the whole model (next-token loss, or KL to the teacher). The op checks the names,
the layers and the teacher against the graph, asks the probe to train, and puts the trained tensors in place of
the old ones; every other tensor stays what it was (a byte copy).
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, StrictInt, model_validator

from recipekit.engine.core.graph import LazyModel
from recipekit.engine.core.layers import decoder_of, out_of_range
from recipekit.engine.core.names import MLP
from recipekit.engine.core.probe import Probe
from recipekit.engine.core.schema import LayerSpan, Ref, StepBase
from recipekit.engine.core.tags import HEALED
from recipekit.engine.core.words import counted, listed
from recipekit.engine.errors import Path_, PlanError, Problem

_PARTS = (".weight", ".bias")


def _number(value: object) -> object:
    """YAML 1.1 reads `1e-4` (no dot) as text; a learning rate is always meant as a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    return value


Rate = Annotated[float, BeforeValidator(_number, json_schema_input_type=float)]


class Heal(StepBase):
    """Train only the named modules of a model's layers so it recovers what pruning cost."""

    op: Literal["heal"] = Field(description="Train named modules of a model (e.g. the MLPs of a pruned one).")
    model: Ref = Field(description="The model or step to train (the student).")
    teacher: Ref | None = Field(None, description=(
        "The model before pruning: blockwise needs it; end_to_end then matches its next-token distribution."))
    text: str | list[str] = Field(description="UTF-8 text file(s) to train on, relative to the recipe's folder.")
    held_out: str | None = Field(None, description=(
        "A text file whose perplexity is measured before and after, for the model card (keep it disjoint from "
        "`text`)."))
    train: list[str] = Field(list(MLP), min_length=1, description=(
        "Modules trained in every chosen layer, by their name after `layers.<i>.` (weight and bias)."))
    layers: Literal["all"] | list[LayerSpan] = Field("all", description=(
        "Layers whose modules are trained: all, or indices and [start, end) ranges."))
    mode: Literal["blockwise", "end_to_end"] = Field("blockwise", description=(
        "blockwise: each layer learns the teacher's hidden states at its depth, one layer in memory; end_to_end: "
        "the whole model's loss, the whole model in memory (meant for --device cuda)."))
    steps: StrictInt = Field(ge=1, description="Optimiser steps (blockwise: per trained layer).")
    lr: Rate = Field(1e-4, gt=0, description="Adam learning rate.")
    seq_len: StrictInt = Field(256, ge=2, description="Tokens per training window (BOS included).")
    batch_size: StrictInt = Field(8, ge=1, description="Windows per optimiser step.")
    max_windows: StrictInt = Field(256, ge=1, description=(
        "Training windows used at most (blockwise keeps two streams of max_windows x seq_len x hidden floats)."))
    seed: StrictInt = Field(0, description="Seeds the order in which windows are drawn.")
    teacher_layers: list[StrictInt] | None = Field(None, min_length=1, description=(
        "For a student pruned outside this recipe: the teacher layer each student layer came from, in order "
        "(within a recipe the layer ops record it)."))

    @model_validator(mode="after")
    def _teacher_for_blockwise(self) -> Heal:
        if self.mode == "blockwise" and self.teacher is None:
            raise ValueError("mode blockwise distils from a teacher: name it (teacher: ...) or use mode: end_to_end")
        return self

    def references(self) -> list[tuple[Path_, str]]:
        return [(("model",), self.model), *([(("teacher",), self.teacher)] if self.teacher is not None else [])]

    def local_paths(self) -> list[tuple[Path_, str]]:
        texts = [(("text",), self.text)] if isinstance(self.text, str) else \
            [(("text", k), text) for k, text in enumerate(self.text)]
        return texts + ([(("held_out",), self.held_out)] if self.held_out is not None else [])

    def title(self, names: Mapping[str, str]) -> str:
        return f"{names[self.model]} healed ({self.mode.replace('_', ' ')})"


def heal(step: Heal, models: Mapping[str, LazyModel], probe: Probe) -> LazyModel:
    student = models[step.model]
    teacher = models[step.teacher] if step.teacher is not None else None
    layers = decoder_of(student, step.model).layers
    chosen = _chosen_layers(step, len(layers))
    trained = {j: _tensors(step, layers[j]) for j in chosen}
    depths = None
    if teacher is not None:
        _check_teacher(step, student, teacher)
    settled: list[int] = []
    if step.mode == "blockwise":
        depths = _depths(step, student, teacher, len(layers))
        settled = [j for j in _settled(student, teacher, depths, step) if j in trained]
        trained = {j: names for j, names in trained.items() if j not in settled}
        if not trained:
            raise PlanError(Problem(f"in {step.model!r}, {_layers_are(settled)} the teacher's own before the first "
                                    "removed layer, with the teacher's stream as input and target: nothing to heal; "
                                    "choose layers from the one before a removed layer on", path=("layers",)))
    texts = [step.text] if isinstance(step.text, str) else step.text
    files = step.local_paths()
    result = probe.heal(student, step.model, teacher, step.teacher, texts=[f for f in files if f[0][0] == "text"],
                        held_out=next((f for f in files if f[0][0] == "held_out"), None),
                        trained=trained, depths=depths, mode=step.mode, steps=step.steps, lr=step.lr,
                        seq_len=step.seq_len, batch_size=step.batch_size, max_windows=step.max_windows,
                        seed=step.seed)
    plot = f"{step.id or 'heal'}-loss.png"
    how = f"blockwise distillation from `{step.teacher}`, {counted(step.steps, 'step')} per layer" \
        if step.mode == "blockwise" else "end to end" + (f" against `{step.teacher}`" if teacher is not None else "") \
        + f", {counted(step.steps, 'step')}"
    note = (f"`heal` trained {listed(step.train)} of {counted(len(trained), 'layer')} of `{step.model}` ({how}, lr "
            f"{step.lr:g}, {result.tokens:,} tokens from {counted(result.windows, 'window')} of {step.seq_len} "
            f"tokens of {listed(texts)}; final loss {result.losses[-1]:.4g}")
    if result.before is not None:
        note += f"; held-out perplexity on {step.held_out}: {result.before:.4f} -> {result.after:.4f}"
    if settled:
        note += (f"; {_layers_are(settled)} left unchanged: the teacher's own layers before the first removed one "
                 "already compute their targets")
    note += f"; loss curve: {plot})" if result.plot is not None else ")"
    beside = (*student.files, (plot, result.plot)) if result.plot is not None else student.files
    return student.evolve(tensors={**student.tensors, **result.tensors}, files=beside).absorb(note=note,
                                                                                             tags=(HEALED,))


def _layers_are(indices: list[int]) -> str:
    return f"layer {indices[0]} is" if len(indices) == 1 else f"layers {', '.join(map(str, indices))} are"


def _chosen_layers(step: Heal, count: int) -> list[int]:
    if step.layers == "all":
        return list(range(count))
    problems = out_of_range([(("layers", k), span) for k, span in enumerate(step.layers)], count, step.model)
    if problems:
        raise PlanError(problems)
    return sorted({i for start, end in step.layers for i in range(start, end)})


def _tensors(step: Heal, layer: dict[str, str]) -> list[str]:
    """The tensors (names after `layers.<i>.`) of the modules `train` names; an unknown module is a located error
    with the closest name the layer has."""
    modules = sorted({rest.removesuffix(part) for rest in layer for part in _PARTS if rest.endswith(part)})
    problems, out = [], []
    for k, module in enumerate(step.train):
        found = [module + part for part in _PARTS if module + part in layer]
        if not found:
            close = difflib.get_close_matches(module, modules, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; its modules: {', '.join(modules[:12])}"
            problems.append(Problem(f"the layers of {step.model!r} have no module {module!r}{hint}",
                                    path=("train", k)))
        out += found
    if problems:
        raise PlanError(problems)
    return out


def _check_teacher(step: Heal, student: LazyModel, teacher: LazyModel) -> None:
    """The teacher's hidden states and vocabulary must be the student's for its stream or logits to be a target."""
    for key, what in (("hidden_size", "hidden size"), ("vocab_size", "vocabulary")):
        ours, theirs = _config(student, key), _config(teacher, key)
        if ours != theirs:
            raise PlanError(Problem(f"the teacher {step.teacher!r} has {what} {theirs}, the student {step.model!r} "
                                    f"{ours}: a teacher must share the student's {what}", path=("teacher",)))


def _config(model: LazyModel, key: str) -> object:
    config = model.config.get("text_config", model.config) if key not in model.config else model.config
    return config.get(key)


def _settled(student: LazyModel, teacher: LazyModel, depths: list[int], step: Heal) -> list[int]:
    """The leading student layers that are the teacher's own layers, fed the teacher's stream, whose target is
    the stream they already compute (the teacher's next layer follows them): blockwise training has nothing to
    teach them, so they are left out rather than trained on a zero loss."""
    ours, theirs = decoder_of(student, step.model), decoder_of(teacher, step.teacher)
    outside = {n for n in student.tensors if n not in ours.layer_names() and n.endswith("embed_tokens.weight")}
    if not outside or any(student.tensors[n] != teacher.tensors.get(n) for n in outside):
        return []
    count, teacher_count = len(ours.layers), len(theirs.layers)
    settled = []
    for j, layer in enumerate(ours.layers):
        same = depths[j] == j and set(layer) == set(theirs.layers[j]) and all(
            student.tensors[name] == teacher.tensors[theirs.layers[j][rest]] for rest, name in layer.items())
        if not same:
            break
        if (depths[j + 1] if j + 1 < count else teacher_count) == j + 1:
            settled.append(j)
    return settled


def _depths(step: Heal, student: LazyModel, teacher: LazyModel, count: int) -> list[int]:
    """The teacher layer each student layer came from: `teacher_layers`, or the layer origins the layer ops
    recorded (the student must be the teacher with layers removed, in order)."""
    teacher_count = len(decoder_of(teacher, step.teacher).layers)
    if step.teacher_layers is not None:
        depths, path = list(step.teacher_layers), ("teacher_layers",)
        if len(depths) != count:
            raise PlanError(Problem(f"{counted(len(depths), 'entry', 'entries')} for the {count} layers of "
                                    f"{step.model!r}", path=path))
    else:
        where = {origin: t for t, origin in enumerate(teacher.layer_origins)}
        missing = [j for j, origin in enumerate(student.layer_origins) if origin not in where]
        if missing or len(student.layer_origins) != count:
            raise PlanError(Problem(f"layer {missing[0] if missing else 0} of {step.model!r} does not come from a "
                                    f"layer of the teacher {step.teacher!r} in this recipe: give teacher_layers "
                                    f"(the teacher layer each student layer came from) or use mode: end_to_end",
                                    path=("teacher",)))
        depths, path = [where[origin] for origin in student.layer_origins], ("teacher",)
    if any(not 0 <= t < teacher_count for t in depths) or any(a >= b for a, b in zip(depths, depths[1:])):
        raise PlanError(Problem(f"blockwise healing needs the student's layers to be teacher layers in increasing "
                                f"order (the teacher with layers removed); they come from teacher layers "
                                f"{depths} of {teacher_count}", path=path))
    return depths
