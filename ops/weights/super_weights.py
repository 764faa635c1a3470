"""protect_super_weights: mark the super weights of a model so that no later step loses them unnoticed.

The weights are found by the engine's probe (one streamed forward per round,
see `engine/measure/superweights.py`) or given as coordinates. A found spike
is only a candidate: most spikes of real models can be zeroed at almost no
cost, and protecting them refuses harmless drops. So by default each found
candidate is zeroed on its own on a calibration text (through the probe) and
protected only when that raises perplexity by at least `min_effect`; every
candidate and its measured effect go on the card. `verify: false` protects
every spike found, the rule of Yu et al. (2024). The guard that refuses a
step losing a protected weight lives in the engine's build loop, which every
op passes.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from recipekit.engine.core.graph import LazyModel, ProtectedWeight
from recipekit.engine.core.layers import decoder_of, out_of_range
from recipekit.engine.core.modules import module_weights
from recipekit.engine.core.probe import SUPER_WEIGHT_MIN_EFFECT, VERIFY_TOKENS, Probe
from recipekit.engine.core.schema import Ref, StepBase, Strict
from recipekit.engine.core.words import counted
from recipekit.engine.errors import Path_, PlanError, Problem

if TYPE_CHECKING:
    from recipekit.engine.measure.superweights import SuperWeight

_VERIFY_FIELDS = ("min_effect", "verify_text", "verify_tokens")


class Coordinate(Strict):
    """One weight entry: `<module>.weight[row, column]` in decoder layer `layer`."""

    layer: int = Field(ge=0, description="Decoder layer index.")
    row: int = Field(ge=0, description="Row (output channel) of the weight matrix.")
    column: int = Field(ge=0, description="Column (input channel) of the weight matrix.")
    module: str = Field("mlp.down_proj", description=(
        "Module whose weight holds the entry, named as in Llama; in a fused layout (Phi-3's gate_up_proj) the row "
        "counts within the module's rows."))


class ProtectSuperWeights(StepBase):
    """Find (or name) the model's super weights; every later step must keep them exactly."""

    op: Literal["protect_super_weights"] = Field(description="Protect the model's super weights.")
    model: Ref = Field(description="The model or step whose super weights are protected.")
    text: str | None = Field(None, description="UTF-8 text file (relative to the recipe) whose paragraphs, after a "
                                               "default prompt, the model runs on to find super weights.")
    coordinates: list[Coordinate] | None = Field(None, min_length=1, description=(
        "Known super weights, protected as given (not verified); when given without text, nothing is searched."))
    threshold: float = Field(50.0, gt=1, description="A layer's largest down_proj input and output must both exceed "
                                                     "this many times the layer's median.")
    rounds: int = Field(10, ge=1, description="Zero what was found and search again, at most this often.")
    seq_len: int = Field(256, ge=1, description="Tokens per text at most (search), and per window (verification).")
    max_texts: int = Field(64, ge=1, description="Texts used at most.")
    verify: bool = Field(True, description=(
        "Zero each found candidate on its own and protect only those whose removal raises the perplexity of a "
        "calibration text by at least min_effect. false: protect every spike found (Yu et al.'s rule)."))
    min_effect: float = Field(SUPER_WEIGHT_MIN_EFFECT, ge=0, description=(
        "Smallest relative perplexity increase that makes a found candidate protected: 0.1 is +10%."))
    verify_text: str | None = Field(None, description=(
        "UTF-8 text file (relative to the recipe) that verification scores; default: `text`, else a built-in "
        "calibration text of a few paragraphs."))
    verify_tokens: int = Field(VERIFY_TOKENS, ge=2, description=(
        "Calibration tokens scored at most; verification runs one forward over them per candidate, plus one."))

    @model_validator(mode="after")
    def _verification_used(self) -> ProtectSuperWeights:
        given = [name for name in _VERIFY_FIELDS if name in self.model_fields_set]
        if given and not self.verify:
            raise ValueError(f"{', '.join(given)} only apply with verify: true (verify: false protects every "
                             "spike found, unmeasured)")
        if (given or "verify" in self.model_fields_set) and self.coordinates is not None and self.text is None:
            raise ValueError("verification applies to found candidates, and with coordinates but no text nothing "
                             "is searched: give text to search as well, or remove the verify fields")
        return self

    def references(self) -> list[tuple[Path_, str]]:
        return [(("model",), self.model)]

    def local_paths(self) -> list[tuple[Path_, str]]:
        return [((name,), path) for name, path in (("text", self.text), ("verify_text", self.verify_text))
                if path is not None]

    def title(self, names: Mapping[str, str]) -> str:
        return names[self.model]  # protecting changes no weight: the model is what it was


def protect_super_weights(step: ProtectSuperWeights, models: Mapping[str, LazyModel], probe: Probe) -> LazyModel:
    model = models[step.model]
    entries = _given(step, model)  # (tensor, layer, row, column, how it was known)
    verification: list[str] = []  # its note comes before the protected weights', `rejected` after them
    rejected, messages = [], []
    if step.text is not None or step.coordinates is None:
        found = probe.super_weights(model, step.model, step.text, threshold=step.threshold, rounds=step.rounds,
                                    seq_len=step.seq_len, max_texts=step.max_texts)
        if not found:
            messages.append(f"warning: protect_super_weights: no super weight found in {step.model!r} (threshold "
                            f"{step.threshold:g}x the layer's median); nothing is protected")
        elif not step.verify:
            entries += [(w.tensor, w.layer, w.row, w.column, _found(w)) for w in found]
        else:
            kept, note, rejected, messages = _verified(step, model, found, probe)
            entries += kept
            verification = [note]
    protected = list(model.protected)
    notes = list(verification)
    for name, layer, row, column, how in entries:
        weight = ProtectedWeight(model.tensors[name], row, column, _label(step, model, name, layer, row, column))
        if weight not in protected:
            protected.append(weight)
            notes.append(f"protect_super_weights: {weight.label} ({how})")
    return model.evolve(protected=tuple(protected), notes=model.notes + tuple(notes + rejected),
                        messages=model.messages + tuple(messages))


def _given(step: ProtectSuperWeights, model: LazyModel) -> list[tuple[str, int, int, int, str]]:
    """The named coordinates, checked against the model's layers and matrices."""
    decoder = decoder_of(model, step.model)
    entries = []
    for k, c in enumerate(step.coordinates or []):
        path = ("coordinates", k)
        problems = out_of_range([(path + ("layer",), (c.layer, c.layer + 1))], len(decoder.layers), step.model)
        if problems:
            raise PlanError(problems)
        weight = module_weights(model, step.model, c.module, path + ("module",))[c.layer]
        name, shape = weight.tensor, weight.shape
        if len(shape) != 2:
            raise PlanError(Problem(f"{name} has shape {list(shape)}: a super weight is an entry of a matrix; "
                                    "name a module with a 2-D weight (mlp.down_proj)", path=path + ("module",)))
        rows, columns = shape
        if c.row >= rows or c.column >= columns:
            what = name if weight.rows is None else \
                f"{c.module} (rows {weight.rows[0]}..{weight.rows[1] - 1} of {name})"
            raise PlanError(Problem(f"[{c.row}, {c.column}] is outside {what}, of shape [{rows}, {columns}]",
                                    path=path))
        offset = weight.rows[0] if weight.rows else 0  # a row of a fused module is a row of the fused matrix
        entries.append((name, c.layer, offset + c.row, c.column, "given"))
    return entries


def _verified(step: ProtectSuperWeights, model: LazyModel, found: list[SuperWeight], probe: Probe):
    """The found candidates whose removal costs at least `min_effect` (as entries), the card's note on the
    verification, a note for each candidate left unprotected with its measured effect, and messages."""
    text = step.verify_text or step.text
    check = probe.verify_super_weights(model, step.model, found, text, seq_len=step.seq_len,
                                       max_tokens=step.verify_tokens)
    kept, rejected = [], []
    for w in check.weights:  # the largest effect first
        change = f"zeroed: perplexity {check.perplexity:.4g} -> {w.perplexity_zeroed:.4g}, {_percent(w.effect)}"
        if w.effect >= step.min_effect:
            kept.append((w.tensor, w.layer, w.row, w.column, f"{_found(w)}; {change}"))
        else:
            label = _label(step, model, w.tensor, w.layer, w.row, w.column)
            rejected.append(f"protect_super_weights: {label} not protected ({_found(w)}; {change}, under "
                            f"min_effect {_percent(step.min_effect, signed=False)})")
    source = text if text is not None else "the built-in calibration text"
    note = (f"protect_super_weights: {counted(len(found), 'spike')} found, each zeroed on its own on {source} "
            f"({counted(check.tokens, 'token')}, perplexity {check.perplexity:.4g}); protected when perplexity "
            f"rises by at least {_percent(step.min_effect, signed=False)}")
    messages = []
    if not kept:
        messages.append(f"warning: protect_super_weights: zeroing any of the {counted(len(found), 'spike')} found "
                        f"in {step.model!r} raises perplexity by less than {_percent(step.min_effect, signed=False)} "
                        f"(at most {_percent(check.weights[0].effect)}); nothing is protected (verify: false "
                        "protects every spike)")
    return kept, note, rejected, messages


def _found(w: SuperWeight) -> str:
    return f"found, value {w.value:.5g}, output {w.out_ratio:.0f}x the layer's median"


def _label(step: ProtectSuperWeights, model: LazyModel, name: str, layer: int, row: int, column: int) -> str:
    origin = model.layer_origins[layer] if layer < len(model.layer_origins) else f"{step.model}:{layer}"
    return f"{name.split('.layers.')[-1].split('.', 1)[1]}[{row}, {column}] of layer {origin}"


def _percent(fraction: float, *, signed: bool = True) -> str:
    """0.1 -> '+10%' ('10%' unsigned), 0.000603 -> '+0.0603%', -0.02 -> '-2%'."""
    return f"{fraction * 100:{'+' if signed else ''}.3g}%"
