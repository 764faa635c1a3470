"""Turn a validated recipe into the LazyModel it describes, reading only headers and configs (and what the steps
that measure the model read, through the probe)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from recipekit.engine.core.architectures import config_problems, layer_config
from recipekit.engine.core.graph import UNSET_ROUTER, LazyModel, applies, lost_weights, unset_routers
from recipekit.engine.core.layers import decoder_of, incomplete
from recipekit.engine.core.probe import NotMeasured
from recipekit.engine.core.schema import StepBase
from recipekit.engine.errors import PlanError, Problem, RecipekitError, SourceError
from recipekit.engine.io import hub
from recipekit.engine.io.source import ModelSource, open_model
from recipekit.engine.measure.probe import EngineProbe
from recipekit.engine.recipe.document import Recipe
from recipekit.engine.recipe.yamlsource import Locator
from recipekit.engine.vocab.align import Aligned, align, check_combined
from recipekit.engine.vocab.chat import chat_files
from recipekit.ops.registry import KERNELS, function_for


def open_inputs(recipe: Recipe, locator: Locator, base_dir: Path, hub_only: bool = False) -> dict[str, LazyModel]:
    """Open every input model; report all that fail at once, located at their `models` entry."""
    models: dict[str, LazyModel] = {}
    opened: dict[str, ModelSource] = {}  # a model named twice is read once
    problems: list[Problem] = []
    for name, ref in recipe.models.items():
        path = ("models", name)
        where = locator.where(path)
        try:
            if ref not in opened:
                opened[ref] = open_model(ref, base_dir=base_dir, where=where, hub_only=hub_only)
            model = LazyModel.from_source(name, opened[ref])
            wrong = config_problems(layer_config(model.config))
            if wrong:
                raise SourceError([Problem(f"config.json of model {ref!r}: {w}") for w in wrong])
            decoder = decoder_of(model, name)
            gaps = incomplete(model, decoder)
            if gaps:
                raise SourceError([Problem(f"the weights of model {ref!r} are incomplete: {gap}") for gap in gaps[:3]])
            count = len(decoder.layers)
            models[name] = model.evolve(layer_origins=tuple(f"{name}:{i}" for i in range(count)))
        except RecipekitError as e:
            # a problem found in a model file names that file; the recipe location comes first
            problems.extend(Problem(p.message if p.where in (None, where) else f"{p.where}: {p.message}", where, path)
                            for p in e.problems)
    if problems:
        raise SourceError(problems)
    fallback = hub.cache_fallback() if any(s.hub_id for s in opened.values()) else None
    if fallback is not None:  # said once, on every input: whichever the output keeps carries it
        note = f"{fallback}; the Hub inputs come from the local cache, as last downloaded"
        models = {name: model.evolve(messages=(*model.messages, note)) for name, model in models.items()}
    return models


@dataclass(frozen=True)
class Built:
    """What running the steps gave: the output (None when a step it needs was not measured), what the steps want
    the user to read, and (checking without measuring) one line per step that did not run."""

    model: LazyModel | None
    messages: tuple[str, ...]
    skipped: tuple[str, ...] = ()


def build(recipe: Recipe, locator: Locator, base_dir: Path, hub_only: bool = False, *, device: str = "cpu",
          progress: bool = False, announce: Callable[[str], None] | None = None, measure: bool = True) -> Built:
    """Run every step's model-level function; the last step's result is the output.

    Steps that measure the model run on `device`, each announced first (`announce` gets one line) and with
    progress bars when `progress`. With `measure=False`, such a step has its inputs checked but does not run,
    nor does any step that reads its result; the rest are built as usual.
    """
    inputs = open_inputs(recipe, locator, base_dir, hub_only)
    try:
        aligned = align(recipe, inputs)
    except RecipekitError as e:
        raise type(e)([_locate(p, (), locator) for p in e.problems]) from None
    results: dict[str, LazyModel] = dict(aligned.models)
    probe = EngineProbe(base_dir, device, progress=progress, announce=announce, measure=measure)
    model = None
    unset_since = None  # the step that left routers unset
    unmeasured: set[str] = set()  # results that are missing because their step was not measured
    skipped: list[str] = []
    messages: dict[str, None] = {}
    order: dict[str, int] = {}  # each step's card notes, by the step that wrote them
    for k, step in enumerate(recipe.steps):
        label = f"steps[{k}] {step.op}"
        blocked = [ref for _, ref in step.references() if ref in unmeasured]
        model = None
        if blocked:
            skipped.append(f"{label}: not checked: it reads {blocked[0]!r}, which was not measured")
        else:
            probe.step = label
            try:
                model = function_for(step)(step, results, probe)
            except NotMeasured as e:
                skipped.append(f"{label}: not measured: {e}")
            except RecipekitError as e:
                raise type(e)([_locate(p, ("steps", k), locator) for p in e.problems]) from None
        if model is None:
            if step.id is not None:
                unmeasured.add(step.id)
            continue
        _check_kernels(model, k, locator)
        model = _numbered_notes(_guard_super_weights(model, step, k, locator), step, k, order)
        messages.update(dict.fromkeys(model.messages))
        if step.id is not None:
            results[step.id] = model
        if unset_since is None and unset_routers(model):
            unset_since = k
    if model is None:
        return Built(None, tuple(messages), tuple(skipped))
    if unset_routers(model):
        path = ("steps", unset_since)
        raise PlanError(Problem("the routers of this Mixture of Experts are not set: add an init_gates step after it "
                                "(mode: random, uniform, cheap_embed or hidden)", locator.where(path), path))
    if aligned.groups:
        try:
            check_combined(model, inputs, aligned.groups)
        except RecipekitError as e:
            raise type(e)([_locate(p, (), locator) for p in e.problems]) from None
    model = _with_tokenizer(model, recipe, inputs, aligned, locator)
    cards = [source.card for _, source in model.sources if source.card is not None]  # the card carries a license
    notes = tuple(sorted(model.notes, key=order.__getitem__))
    if aligned.report is not None:
        notes += (aligned.report.line(),)
    model = model.evolve(notes=notes, measure_memory=probe.held,
                         read_files=tuple(dict.fromkeys([*probe.read, *cards, *model.read_files])))
    return Built(model, tuple(messages), tuple(skipped))


def _with_tokenizer(model: LazyModel, recipe: Recipe, inputs: dict[str, LazyModel], aligned: Aligned,
                    locator: Locator) -> LazyModel:
    """The output with the tokenizer files it gets: the named model's, the vocabulary's, and its chat template."""
    tokenizer = recipe.output.tokenizer
    origin = aligned.tokenizer_from or (tokenizer if isinstance(tokenizer, str) else None)
    if origin is not None:
        model = model.evolve(side_files=inputs[origin].side_files)
    files, read = dict(aligned.files), list(aligned.read)
    if recipe.output.chat_template is not None:
        try:
            files, seen, message = chat_files(recipe.output.chat_template, {n: m.side_files for n, m in inputs.items()},
                                              model.side_files, files)
        except RecipekitError as e:
            raise type(e)([_locate(p, (), locator) for p in e.problems]) from None
        read += seen
        if message is not None:
            model = model.evolve(messages=(*model.messages, message))
    return model.evolve(side_overrides=tuple(files.items()), vocabulary=aligned.report,
                        read_files=(*model.read_files, *read))


def _numbered_notes(model: LazyModel, step: StepBase, k: int, order: dict[str, int]) -> LazyModel:
    """The step's own card notes, numbered with the step (a step that wrote none gets one naming its op), so the
    card lists every step that ran, in order, even two that did the same thing (notes of several inputs are
    merged without repeats, so two equal notes would otherwise become one)."""
    name = f"step {k + 1}" + (f" (`{step.id}`)" if step.id is not None else "")
    own = [note for note in model.notes if note not in order] or [f"`{step.op}`"]
    numbered = {note: f"{name}: {note}" for note in own}
    order.update(dict.fromkeys(numbered.values(), k))
    return model.evolve(notes=tuple(n for n in model.notes if n in order) + tuple(numbered.values()))


def _check_kernels(model: LazyModel, k: int, locator: Locator) -> None:
    """Refuse a graph naming a kernel no op registered now, at the step that built it, not when it executes."""
    unknown = sorted({node.kernel for node in applies(model.tensors.values())} - set(KERNELS) - {UNSET_ROUTER})
    if unknown:
        path = ("steps", k)
        raise PlanError(Problem(f"this step computes tensors with kernel(s) {', '.join(map(repr, unknown))}, which no "
                                "op registers (a bug in the op: list its kernels in ops/registry.py)",
                                locator.where(path), path))


def _guard_super_weights(model: LazyModel, step, k: int, locator: Locator) -> LazyModel:
    """Refuse a step that removes or changes a protected super weight, unless it allows the loss.

    Every op passes here, so ops added later (merges, quantisation) are guarded without knowing about it.
    """
    lost = lost_weights(model)
    if not lost:
        return model
    if not step.allow_super_weight_loss:
        path = ("steps", k)
        raise PlanError([Problem(f"this step removes or changes super weight {w.label}, which the model depends on "
                                 "(protected by protect_super_weights); set allow_super_weight_loss: true to do it "
                                 "anyway", locator.where(path), path) for w in lost])
    notes = tuple(f"super weight {w.label} given up (allow_super_weight_loss)" for w in lost)
    return model.evolve(protected=tuple(w for w in model.protected if w not in lost), notes=model.notes + notes)


def _locate(problem: Problem, prefix: tuple, locator: Locator) -> Problem:
    """Give a problem raised deep inside an op the recipe location of the field it concerns."""
    if problem.where is not None and problem.path:
        return problem
    path = prefix + problem.path
    return Problem(problem.message, problem.where or locator.where(path), path)
