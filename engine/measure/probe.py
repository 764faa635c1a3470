"""The engine's answers to what ops may measure (`core.probe.Probe`): ops never open files themselves.

Every measurement first says what it will compute (`announce`), then runs with progress bars when `progress`;
a probe made with `measure=False` checks a measurement's inputs and raises `NotMeasured` instead of running it.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from recipekit.engine.core.graph import LazyModel, MoeInfo, loads_of
from recipekit.engine.core.layers import decoder_of
from recipekit.engine.core.probe import NotMeasured
from recipekit.engine.core.sizes import human
from recipekit.engine.core.words import counted
from recipekit.engine.errors import Path_, PlanError, Problem, SourceError
from recipekit.engine.forward.support import check_config
from recipekit.engine.forward.tokenize import TOKENIZER_FILES, TextTokenizer
from recipekit.engine.io.source import ModelSource

if TYPE_CHECKING:
    from recipekit.engine.measure.gates import GateRows
    from recipekit.engine.measure.similarity import Similarity
    from recipekit.engine.measure.superweights import SuperWeight, Verification
    from recipekit.engine.train.heal import Healed


class EngineProbe:
    """Measures LazyModels for data-driven ops (see `core.probe.Probe`).

    Text files named by a recipe are relative to `base_dir`, the recipe's folder; forwards run on `device`.
    `announce` is called with one line before each measurement starts; `step` names who measures in that line
    (the build loop sets it before each step). `read` collects every file a measurement read (weights,
    tokenizer, text), first read first, for the lock; `held` is the most memory one measurement held
    (estimated bytes), for the plan.
    """

    def __init__(self, base_dir: Path, device: str = "cpu", *, progress: bool = False,
                 announce: Callable[[str], None] | None = None, measure: bool = True):
        self.base_dir = base_dir
        self.device = device
        self.progress = progress
        self.announce = announce
        self.measure = measure
        self.step = "a step"
        self.read: dict[Path, None] = {}  # an ordered set
        self.held = 0

    def _start(self, what: str) -> None:
        """Say what is about to be measured; or, checking without measuring, stop here."""
        if not self.measure:
            raise NotMeasured(what)
        if self.announce is not None:
            self.announce(f"{self.step}: measuring {what}")

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

    def _located_text(self, field: Path_, text: str) -> str:
        """The text file a step field names; a file that cannot be used is a problem located at that field."""
        from recipekit.engine.measure.texts import read_text

        try:
            return read_text(self._text(text))
        except SourceError as e:
            raise PlanError([Problem(f"{text}: {p.message}", path=field) for p in e.problems]) from None

    def _forward_inputs(self, model: LazyModel) -> None:
        """What a streamed forward over text needs besides the weights. The family is checked first, always (from
        config.json alone, RoPE and activation too), so a forward that cannot run is never announced; the tokenizer
        only when not measuring (measuring checks it, with the weights, on the way)."""
        check_config(model.config)
        if not self.measure:
            TextTokenizer.of(model.side_files, model.token_rows)

    def snr(self, model: LazyModel, name: str, module: str) -> list[float]:
        """Random-matrix SNR of `<module>.weight` in every decoder layer of `model`, in layer order."""
        from recipekit.engine.measure.snr import chosen_modules, held_bytes

        chosen_modules(model, name, (module,))
        layers = len(decoder_of(model, name).layers)
        self._start(f"the SNR of {module} in {counted(layers, 'layer')} of {name!r} (one matrix at a time, no "
                    "forward pass)")
        # imports torch: only recipes that select by a metric pay for it
        from recipekit.engine.measure.snr import snr_table

        self._reads(model)
        self.held = max(self.held, held_bytes(model, name, (module,)))
        return [row.snr for row in snr_table(model, name, (module,), device=self.device, progress=self.progress)]

    def similarity(self, model: LazyModel, name: str, text: str, seq_len: int, max_texts: int,
                   mean_n: int | None = None) -> Similarity:
        """Angular distances and block influences of `model` over the paragraphs of a text file (with `mean_n`,
        also the token-averaged angular distance over that many layers)."""
        from recipekit.engine.measure.texts import paragraphs, read_text

        path = self._text(text)
        texts = paragraphs(read_text(path))[:max_texts]
        self._forward_inputs(model)
        layers = len(decoder_of(model, name).layers)
        self._start(f"angular distance and block influence of {name!r}: a streamed forward of "
                    f"{counted(layers, 'layer')} over {counted(len(texts), 'text')} of {text} "
                    f"({human(sum(len(t.encode()) for t in texts))}), at most {seq_len} tokens each")
        from recipekit.engine.measure.similarity import similarity

        self._reads(model, tokenizer=model.side_files, text=path)
        result = similarity(model, name, texts, seq_len=seq_len, max_texts=max_texts, mean_n=mean_n,
                            device=self.device, progress=self.progress)
        self.held = max(self.held, result.held_bytes)
        return result

    def prompt_gates(self, info: MoeInfo, mode: str, hidden_state: str, token: str) -> GateRows:
        """Router rows of a stacked MoE from its experts' prompts, through the base model."""
        prompts = counted(len(info.prompts()), "prompt")
        if mode == "hidden":
            self._forward_inputs(info.base)
            layers = counted(len(decoder_of(info.base, info.base_name).layers), "layer")
            self._start(f"router rows from the hidden states of {info.base_name!r}: a streamed forward of {layers} "
                        f"over {prompts}")
        else:
            if not self.measure:
                TextTokenizer.of(info.base.side_files, info.base.token_rows)
            self._start(f"router rows from the token embeddings of {prompts} in {info.base_name!r} (no forward "
                        "pass)")
        from recipekit.engine.measure.gates import prompt_gates

        self._reads(info.base, tokenizer=info.base.side_files)
        rows = prompt_gates(info, mode, hidden_state=hidden_state, token=token, device=self.device,
                            progress=self.progress)
        self.held = max(self.held, rows.held_bytes)
        return rows

    def super_weights(self, model: LazyModel, name: str, text: str | None, *, threshold: float, rounds: int,
                      seq_len: int, max_texts: int) -> list[SuperWeight]:
        """Super weights of `model`, over a default prompt and the paragraphs of an optional text file."""
        from recipekit.engine.measure.texts import paragraphs, read_text

        path = None if text is None else self._text(text)
        texts = paragraphs(read_text(path)) if path is not None else []
        self._forward_inputs(model)
        over = f"a default prompt and {counted(min(len(texts), max_texts), 'text')} of {text}" if texts else \
            "a default prompt"
        self._start(f"super weights of {name!r}: streamed forwards of "
                    f"{counted(len(decoder_of(model, name).layers), 'layer')} over {over}, at most {rounds} rounds")
        from recipekit.engine.measure.superweights import find_super_weights

        self._reads(model, tokenizer=model.side_files, text=path)
        search = find_super_weights(model, name, texts, threshold=threshold, rounds=rounds, seq_len=seq_len,
                                    max_texts=max_texts, device=self.device, progress=self.progress)
        self.held = max(self.held, search.held_bytes)
        return search.weights

    def verify_super_weights(self, model: LazyModel, name: str, weights: list[SuperWeight], text: str | None, *,
                             seq_len: int, max_tokens: int) -> Verification:
        """Perplexity of a text file (or, without one, a built-in calibration text) with each weight zeroed on its
        own, the weights ranked by the increase."""
        from recipekit.engine.measure.superweights import CALIBRATION_TEXT, verify
        from recipekit.engine.measure.texts import read_text

        path = None if text is None else self._text(text)
        self._start(f"the effect of each of {counted(len(weights), 'super-weight candidate')} of {name!r}: the "
                    f"perplexity of {text or 'a built-in calibration text'} (at most {max_tokens} tokens) with each "
                    f"zeroed, {counted(len(weights) + 1, 'streamed forward')}")
        self._reads(model, tokenizer=model.side_files, text=path)
        calibration = read_text(path) if path is not None else CALIBRATION_TEXT
        verification = verify(model, name, weights, calibration, seq_len=seq_len, max_tokens=max_tokens,
                              device=self.device, progress=self.progress)
        self.held = max(self.held, verification.held_bytes)
        return verification

    def norm_correlation(self, a: LazyModel, a_name: str, b: LazyModel, b_name: str) -> float | None:
        """How alike two models' norm weights are (Pearson); None when they cannot be compared. A few norm
        vectors, read without torch: checked even when not measuring."""
        from recipekit.engine.measure.lineage import norm_correlation

        self._reads(a, b)
        return norm_correlation(a, a_name, b, b_name)

    def heal(self, student: LazyModel, name: str, teacher: LazyModel | None, teacher_name: str | None, *,
             texts: list[tuple[Path_, str]], held_out: tuple[Path_, str] | None, trained: dict[int, list[str]],
             depths: list[int] | None,
             mode: str, steps: int, lr: float, seq_len: int, batch_size: int, max_windows: int,
             seed: int) -> Healed:
        """Train the named tensors of the student (see `core.probe.Probe.heal`)."""
        contents = [(text, self._located_text(field, text)) for field, text in texts]
        held = None if held_out is None else (held_out[1], self._located_text(*held_out))
        paths = [self._text(text) for _, text in texts]
        held_path = None if held_out is None else self._text(held_out[1])
        for model in (student, teacher):
            if model is not None:
                self._forward_inputs(model)
        count = sum(1 for names in trained.values() if names)
        what = (f"{counted(count, 'layer')} of {name!r} by distillation from {teacher_name!r}, layer by layer, "
                f"{counted(steps, 'step')} each" if mode == "blockwise" else
                f"{counted(count, 'layer')} of {name!r} end to end"
                + (f" against {teacher_name!r}" if teacher is not None else "") + f", {counted(steps, 'step')}")
        self._start(f"healing: training {what} on {', '.join(text for _, text in texts)} "
                    f"({human(sum(len(c.encode()) for _, c in contents))}), windows of {seq_len} tokens")
        from recipekit.engine.train.heal import heal
        from recipekit.engine.train.loop import Settings

        self._reads(student, *([teacher] if teacher is not None else []), tokenizer=student.side_files)
        self.read.update(dict.fromkeys([*paths, *([held_path] if held_path else [])]))
        settings = Settings(steps=steps, lr=lr, batch_size=batch_size, seed=seed, device=self.device,
                            progress=self.progress)
        result = heal(student, name, teacher, teacher_name, texts=contents, held_out=held, trained=trained,
                      depths=depths, mode=mode, seq_len=seq_len, max_windows=max_windows, settings=settings)
        self.held = max(self.held, result.held_bytes)
        return result
