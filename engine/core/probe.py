"""The measurements an op may ask for: a protocol, so ops stay pure functions and `core` never imports `measure`.

The engine hands every op an implementation (`recipekit.engine.measure.probe.EngineProbe`) that reads weights
through the node evaluator and runs the streamed forward. A recipe that selects nothing by a metric never calls
it, so its plan reads headers only and imports no torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from recipekit.engine.core.graph import LazyModel, MoeInfo
    from recipekit.engine.errors import Path_
    from recipekit.engine.measure.gates import GateRows
    from recipekit.engine.measure.similarity import Similarity
    from recipekit.engine.measure.superweights import SuperWeight, Verification
    from recipekit.engine.train.heal import Healed

RELATED = 0.5  # norm_correlation: fine-tunes of one base score well above this (0.99 for usual ones); unrelated near 0
# verify_super_weights, as protect_super_weights and `recipe analyze --verify` use it by default. A single scalar
# whose removal costs 10% perplexity costs about what dropping a whole middle layer does, which is worth refusing a
# step for; of the spikes found in SmolLM2-135M, two measured +33% or more and the rest +6.5% or less, on either
# calibration text tried (docs/recipes.md has the figures).
SUPER_WEIGHT_MIN_EFFECT = 0.10  # relative perplexity increase: 0.10 is +10%
VERIFY_TOKENS = 4096  # calibration tokens scored at most: (candidates + 1) forwards over them


class NotMeasured(Exception):
    """A probe that checks a recipe without measuring (`recipe validate --no-measure`) raises this where a
    measurement would start, once the measurement's inputs are checked; the build loop reports the step as not
    measured. The text says what would have been measured. Ops let it pass: it is not a user's mistake."""


class Probe(Protocol):
    """What data-driven ops may measure. Text files are named as the recipe names them (relative to its folder)."""

    def snr(self, model: LazyModel, name: str, module: str) -> list[float]:
        """Random-matrix SNR of `<module>.weight` in every decoder layer of `model`, in layer order."""
        ...

    def similarity(self, model: LazyModel, name: str, text: str, seq_len: int, max_texts: int,
                   mean_n: int | None = None) -> Similarity:
        """Angular distances and block influences of `model` over the paragraphs of a text file (with `mean_n`,
        also the token-averaged angular distance over that many layers)."""
        ...

    def prompt_gates(self, info: MoeInfo, mode: str, hidden_state: str, token: str) -> GateRows:
        """Router rows of a stacked MoE from its experts' prompts, through the base model."""
        ...

    def super_weights(self, model: LazyModel, name: str, text: str | None, *, threshold: float, rounds: int,
                      seq_len: int, max_texts: int) -> list[SuperWeight]:
        """Super weights of `model`, over a default prompt and the paragraphs of an optional text file."""
        ...

    def verify_super_weights(self, model: LazyModel, name: str, weights: list[SuperWeight], text: str | None, *,
                             seq_len: int, max_tokens: int) -> Verification:
        """Perplexity of a text file (or, without one, a built-in calibration text) with each weight zeroed on its
        own, the weights ranked by the increase."""
        ...

    def norm_correlation(self, a: LazyModel, a_name: str, b: LazyModel, b_name: str) -> float | None:
        """How alike two models' norm weights are (Pearson); None when they cannot be compared."""
        ...

    def heal(self, student: LazyModel, name: str, teacher: LazyModel | None, teacher_name: str | None, *,
             texts: list[tuple[Path_, str]], held_out: tuple[Path_, str] | None, trained: dict[int, list[str]],
             depths: list[int] | None,
             mode: str, steps: int, lr: float, seq_len: int, batch_size: int, max_windows: int,
             seed: int) -> Healed:
        """Train `trained[j]` (tensor names after `layers.<j>.`) of the student's layers on windows of the text
        files, each given with the path of the step field that names it, so a file that cannot be read is a
        located error (`blockwise`: student layer j against the teacher's stream entering teacher layer `depths[j + 1]`;
        `end_to_end`: the whole model's loss); the trained tensors as new nodes, with what was measured."""
        ...
