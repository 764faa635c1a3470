"""Healing a model, as the probe runs it for the `heal` op: windows of the training text, the chosen mode, the
held-out perplexity before and after, and the loss curve."""
from __future__ import annotations

import importlib.util
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from recipekit.engine.core.graph import LazyModel, Node
from recipekit.engine.core.words import counted
from recipekit.engine.errors import Problem, SourceError
from recipekit.engine.forward.tokenize import TextTokenizer
from recipekit.engine.io.safetensors_header import DTYPE_SIZES
from recipekit.engine.measure.perplexity import perplexity
from recipekit.engine.train.blockwise import blockwise
from recipekit.engine.train.end_to_end import end_to_end
from recipekit.engine.train.layer import Stack
from recipekit.engine.train.loop import Meter, Settings, one_thread
from recipekit.engine.train.spill import Spill

FLOAT32 = 4


@dataclass(frozen=True)
class Healed:
    """What `heal` trained: the new node of every trained tensor, the loss of every optimiser step (blockwise:
    layer after layer), the windows and tokens trained on, the held-out perplexity before and after (None without
    a held-out text), the loss curve as PNG bytes (None without matplotlib) and the memory held (estimate,
    bytes)."""

    tensors: dict[str, Node]
    losses: tuple[float, ...]
    windows: int
    tokens: int
    before: float | None
    after: float | None
    plot: bytes | None
    held_bytes: int


def windows_of(tokenizer: TextTokenizer, texts: list[tuple[str, str]], seq_len: int,
               max_windows: int) -> list[list[int]]:
    """Windows of `seq_len` tokens (BOS and `seq_len - 1` text tokens when the model uses BOS), back to back in
    file order, each file's tail shorter than a window left out; at most `max_windows`."""
    prefix = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    body = seq_len - len(prefix)
    out: list[list[int]] = []
    for name, text in texts:
        ids = tokenizer.encode_plain(text)
        if len(ids) < body:
            raise SourceError(Problem(f"the text has {counted(len(ids), 'token')}, fewer than one window of seq_len "
                                      f"{seq_len}: use a longer text or a smaller seq_len", name))
        out += [prefix + ids[at:at + body] for at in range(0, len(ids) - body + 1, body)]
    return out[:max_windows]


def heal(student: LazyModel, name: str, teacher: LazyModel | None, teacher_name: str | None, *,
         texts: list[tuple[str, str]], held_out: tuple[str, str] | None, trained: dict[int, list[str]],
         depths: list[int] | None, mode: str, seq_len: int, max_windows: int, settings: Settings) -> Healed:
    """Train `trained[j]` (names after `layers.<j>.`) of `student`'s layers on windows of `texts` ((name, text)
    pairs); `depths[j]` is the teacher layer student layer j came from (blockwise only). Runs on one CPU thread
    (`one_thread`), the held-out perplexities the card prints too."""
    with one_thread():
        windows = windows_of(TextTokenizer.of(student.side_files), texts, seq_len, max_windows)
        ours = Stack(student, name, settings.device)
        theirs = Stack(teacher, teacher_name, settings.device) if teacher is not None else None

        def score(model: LazyModel) -> float | None:
            if held_out is None:
                return None
            return perplexity(model, held_out[1], text_name=held_out[0], seq_len=seq_len, device=settings.device,
                              progress=settings.progress).perplexity

        before = score(student)
        meter = Meter(settings.steps * (len(trained) if mode == "blockwise" else 1), settings.progress,
                      f"heal ({mode})")
        spill = Spill()
        try:
            if mode == "blockwise":
                result = blockwise(ours, theirs, windows, trained, depths, settings, spill, meter)
            else:
                result = end_to_end(ours, theirs, windows, trained, settings, spill, meter)
        finally:
            meter.close()
        after = score(student.evolve(tensors={**student.tensors, **result.tensors}))
    return Healed(result.tensors, tuple(result.losses), len(windows), meter.tokens, before, after,
                  _curve(result.losses, mode), _held_bytes(ours, theirs, len(windows), seq_len, mode, trained))


def _curve(losses: list[float], mode: str) -> bytes | None:
    """The loss curve as PNG bytes, where matplotlib is installed."""
    if not losses or importlib.util.find_spec("matplotlib") is None:
        return None
    from recipekit.engine.measure.plot import curve

    what = "relative squared error, layer after layer" if mode == "blockwise" else "loss"
    with tempfile.TemporaryDirectory(prefix="recipekit-heal-") as folder:
        path = Path(folder) / "loss.png"
        curve(path, list(range(1, len(losses) + 1)), losses, title=f"heal ({mode})", xlabel="optimiser step",
              ylabel=what)
        return path.read_bytes()


def _held_bytes(student: Stack, teacher: Stack | None, windows: int, seq_len: int, mode: str,
                trained: dict[int, list[str]]) -> int:
    """About the most memory a heal holds: blockwise, the two streams, a student and a teacher layer and the
    trained tensors of one layer four times (float32 copy, gradient, two Adam moments); end to end, both whole
    models, the embedded windows and the trained tensors' three more copies. A batch's activations are left to
    the forward's own estimate of a pass over the windows."""
    stream = FLOAT32 * windows * seq_len * student.spec.hidden
    sizes = {j: {rest: _nbytes(student, student.layer_names(j)[rest]) for rest in student.layer_names(j)}
             for j in range(student.count)}
    layer = max(sum(s.values()) for s in sizes.values())
    trained_bytes = {j: sum(FLOAT32 * _elements(student, student.layer_names(j)[rest]) for rest in names)
                     for j, names in trained.items()}
    activations = student.forward.held_bytes([seq_len] * windows)
    if mode == "blockwise":
        teacher_layer = max(sum(_nbytes(teacher, n) for n in teacher.layer_names(t).values())
                            for t in range(teacher.count))
        return 2 * stream + layer + teacher_layer + 4 * max(trained_bytes.values(), default=0) + activations
    whole = sum(sum(s.values()) for s in sizes.values())
    if teacher is not None:
        whole += sum(_nbytes(teacher, n) for t in range(teacher.count) for n in teacher.layer_names(t).values())
    return whole + 2 * stream + 3 * sum(trained_bytes.values()) + activations


def _elements(stack: Stack, name: str) -> int:
    return math.prod(stack.model.tensors[name].shape)


def _nbytes(stack: Stack, name: str) -> int:
    return _elements(stack, name) * DTYPE_SIZES[stack.model.tensors[name].dtype]
