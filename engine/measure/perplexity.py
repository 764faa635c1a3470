"""Perplexity of a text under a model, with the streamed forward.

The text is tokenised once and cut into windows of `seq_len` tokens. When
the tokenizer adds BOS, a window is BOS and `seq_len - 1` text tokens, and
every text token is scored (the first one predicted from BOS). Without BOS a
window is `seq_len` text tokens, and the text's first token is never scored:
nothing before it predicts it. Windows start every `stride` text tokens, at
most and by default `seq_len - 1` either way: back to back after BOS, and
overlapping by one token without it, the token that predicts the next
window's first scored one. A window scores only the tokens no earlier window
scored; the last window is aligned to the end of the text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from recipekit.engine.core.graph import LazyModel
from recipekit.engine.core.words import counted
from recipekit.engine.errors import Problem, SourceError
from recipekit.engine.forward.streamed import FLOAT32, StreamedForward
from recipekit.engine.forward.tokenize import TextTokenizer
from recipekit.engine.io.safetensors_header import DTYPE_SIZES

LOGIT_CHUNK = 256  # tokens per logits block: [256, vocab] floats at a time


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    mean_nll: float
    tokens: int  # tokens scored
    windows: int
    seq_len: int
    stride: int
    text_tokens: int  # tokens in the whole text, before `max_tokens` cut it
    held_bytes: int = 0  # what scoring held at its peak (estimated), for the plan of a step that verifies

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "mean_nll": self.mean_nll, "tokens": self.tokens,
                "windows": self.windows, "seq_len": self.seq_len, "stride": self.stride,
                "text_tokens": self.text_tokens}


def windows(ids: list[int], bos: int | None, seq_len: int, stride: int) -> list[tuple[list[int], int]]:
    """(window tokens, index in the window of the first scored prediction target) for each window."""
    prefix = [bos] if bos is not None else []
    body = seq_len - len(prefix)
    starts = list(range(0, len(ids) - body + 1, stride))
    if starts[-1] + body < len(ids):
        starts.append(len(ids) - body)
    out, scored_until = [], 0
    for start in starts:
        tokens = prefix + ids[start:start + body]
        first = max(1, len(prefix) + scored_until - start)  # position of the first target not scored before
        out.append((tokens, first))
        scored_until = start + body
    return out


def perplexity(model: LazyModel, text: str, *, text_name: str, seq_len: int = 512, stride: int | None = None,
               max_tokens: int | None = None, device: str = "cpu", progress: bool = False) -> Perplexity:
    """exp(mean negative log-likelihood) of the text's tokens under `model`."""
    tokenizer = TextTokenizer.of(model.side_files, model.token_rows)
    ids = tokenizer.encode_plain(text)
    text_tokens = len(ids)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    body = seq_len - (tokenizer.bos_id is not None)
    # without BOS a window's first token has no context, so windows must overlap by one to score it
    longest = body if tokenizer.bos_id is not None else body - 1
    if stride is not None and stride > longest:
        raise SourceError(Problem(f"--stride {stride} would leave tokens unscored: at most {longest} with "
                                  f"--seq-len {seq_len} for this tokenizer"))
    stride = stride or longest
    if len(ids) < body or longest < 1:
        raise SourceError(Problem(f"the text has {counted(len(ids), 'token')}, fewer than one window of --seq-len "
                                  f"{seq_len}: use a longer text or a smaller --seq-len", text_name))
    parts = windows(ids, tokenizer.first, seq_len, stride)
    forward = StreamedForward(model, device=device)
    final, _ = forward.run([tokens for tokens, _ in parts], progress=progress)
    head = forward.lm_head()
    total, count = 0.0, 0
    for row, (tokens, first) in enumerate(parts):
        targets = torch.tensor(tokens[first:], device=final.device)
        states = final[row, first - 1:len(tokens) - 1]
        for at in range(0, len(targets), LOGIT_CHUNK):
            logits = forward.logits(states[at:at + LOGIT_CHUNK], head)
            total += float(F.cross_entropy(logits, targets[at:at + LOGIT_CHUNK], reduction="sum"))
        count += len(targets)
    mean = total / count
    return Perplexity(math.exp(mean), mean, count, len(parts), seq_len, stride, text_tokens,
                      _held_bytes(forward, [len(tokens) for tokens, _ in parts], final, head))


def _held_bytes(forward: StreamedForward, lengths: list[int], final: torch.Tensor, head: torch.Tensor) -> int:
    """The forward's peak, or after it the final states, the head in float32 beside its stored copy, and one
    block of logits with cross-entropy's two temporaries of its size, whichever is more."""
    stored = head.numel() * DTYPE_SIZES[forward.model.tensors[forward.head_name].dtype]
    scoring = (final.numel() + head.numel() + 3 * LOGIT_CHUNK * head.shape[0]) * FLOAT32 + stored
    return max(forward.held_bytes(lengths), scoring)
