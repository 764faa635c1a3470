"""The engine's answers to what ops may measure (`core.probe.Probe`): ops never open files themselves."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from recipekit.engine.core.graph import LazyModel, MoeInfo, loads_of
from recipekit.engine.forward.tokenize import TOKENIZER_FILES
from recipekit.engine.io.source import ModelSource

if TYPE_CHECKING:
    from recipekit.engine.measure.gates import GateRows
    from recipekit.engine.measure.similarity import Similarity
    from recipekit.engine.measure.superweights import SuperWeight, Verification


class EngineProbe:
    """Measures LazyModels for data-driven ops (see `core.probe.Probe`).

    Text files named by a recipe are relative to `base_dir`, the recipe's folder; forwards run on `device`.
    `read` collects every file a measurement read (weights, tokenizer, text), first read first, for the lock.
    """

    def __init__(self, base_dir: Path, device: str = "cpu"):
        self.base_dir = base_dir
        self.device = device
        self.read: dict[Path, None] = {}  # an ordered set

    def _reads(self, *models: LazyModel, tokenizer: ModelSource | None = None, text: Path | None = None) -> None:
        for model in models:
            self.read.update(dict.fromkeys(sorted({load.tensor.file for node in model.tensors.values()
                                                   for load in loads_of(node)})))
        if tokenizer is not None:
            self.read.update(dict.fromkeys(p for p in map(tokenizer.side_file, TOKENIZER_FILES) if p is not None))
        if text is not None:
            self.read[text] = None

    def _text(self, text: str) -> Path:
        return self.base_dir / Path(text).expanduser()

    def snr(self, model: LazyModel, name: str, module: str) -> list[float]:
        """Random-matrix SNR of `<module>.weight` in every decoder layer of `model`, in layer order."""
        # imports torch: only recipes that select by a metric pay for it
        from recipekit.engine.measure.snr import snr_table

        self._reads(model)
        return [row.snr for row in snr_table(model, name, (module,))]

    def similarity(self, model: LazyModel, name: str, text: str, seq_len: int, max_texts: int,
                   mean_n: int | None = None) -> Similarity:
        """Angular distances and block influences of `model` over the paragraphs of a text file (with `mean_n`,
        also the token-averaged angular distance over that many layers)."""
        from recipekit.engine.measure.similarity import similarity
        from recipekit.engine.measure.texts import paragraphs, read_text

        path = self._text(text)
        self._reads(model, tokenizer=model.side_files, text=path)
        texts = paragraphs(read_text(path))
        return similarity(model, name, texts, seq_len=seq_len, max_texts=max_texts, mean_n=mean_n,
                          device=self.device)

    def prompt_gates(self, info: MoeInfo, mode: str, hidden_state: str, token: str) -> GateRows:
        """Router rows of a stacked MoE from its experts' prompts, through the base model."""
        from recipekit.engine.measure.gates import prompt_gates

        self._reads(info.base, tokenizer=info.base.side_files)
        return prompt_gates(info, mode, hidden_state=hidden_state, token=token, device=self.device)

    def super_weights(self, model: LazyModel, name: str, text: str | None, *, threshold: float, rounds: int,
                      seq_len: int, max_texts: int) -> list[SuperWeight]:
        """Super weights of `model`, over a default prompt and the paragraphs of an optional text file."""
        from recipekit.engine.measure.superweights import find_super_weights
        from recipekit.engine.measure.texts import paragraphs, read_text

        path = None if text is None else self._text(text)
        self._reads(model, tokenizer=model.side_files, text=path)
        texts = paragraphs(read_text(path)) if path is not None else []
        return find_super_weights(model, name, texts, threshold=threshold, rounds=rounds, seq_len=seq_len,
                                  max_texts=max_texts, device=self.device).weights

    def verify_super_weights(self, model: LazyModel, name: str, weights: list[SuperWeight], text: str | None, *,
                             seq_len: int, max_tokens: int) -> Verification:
        """Perplexity of a text file (or, without one, a built-in calibration text) with each weight zeroed on its
        own, the weights ranked by the increase."""
        from recipekit.engine.measure.superweights import CALIBRATION_TEXT, verify
        from recipekit.engine.measure.texts import read_text

        path = None if text is None else self._text(text)
        self._reads(model, tokenizer=model.side_files, text=path)
        calibration = read_text(path) if path is not None else CALIBRATION_TEXT
        return verify(model, name, weights, calibration, seq_len=seq_len, max_tokens=max_tokens, device=self.device)

    def norm_correlation(self, a: LazyModel, a_name: str, b: LazyModel, b_name: str) -> float | None:
        """How alike two models' norm weights are (Pearson); None when they cannot be compared."""
        from recipekit.engine.measure.lineage import norm_correlation

        self._reads(a, b)
        return norm_correlation(a, a_name, b, b_name)
