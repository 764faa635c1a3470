"""How much each layer (or block of layers) changes the residual stream: angular distance and block influence.

One streamed forward over some texts; what `recipe analyze --metric angular|bi` prints and
`select: {metric: angular|bi}` chooses by.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from recipekit.engine.core.graph import LazyModel
from recipekit.engine.forward.capture import LastToken


@dataclass(frozen=True)
class Similarity:
    """Layer-to-layer similarity of the residual stream over some texts.

    `angular(n)[l]` is arccos(cos(x_l, x_{l+n})) / pi at each text's last token, averaged over
    texts, where x_l is the residual stream entering layer l (x_L: after the last layer, never a
    post-final-norm state). `bi[i]` is the block influence of layer i: 1 - mean over all tokens of
    cos(input of layer i, output of layer i).
    """

    layers: int
    texts: int
    tokens: int
    last: dict[int, torch.Tensor]  # layer -> [texts, C] residual at each text's last token
    bi: list[float]
    mean_angular: dict[int, list[float]] = field(default_factory=dict)  # n -> per start, averaged over tokens
    held_bytes: int = 0  # what the measurement held at its peak (estimated): the forward and the states kept

    def angular(self, n: int, token: str = "last") -> list[float]:
        """Distance from the input of layer l to the input of layer l + n, for l = 0 .. layers - n: at each
        text's last token, or (`token="mean"`, when measured for this n) averaged over all tokens."""
        if token == "mean":
            return self.mean_angular[n]
        out = []
        for start in range(self.layers - n + 1):
            cos = torch.nn.functional.cosine_similarity(self.last[start], self.last[start + n], dim=-1)
            out.append(float((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean()))
        return out


def similarity(model: LazyModel, name: str, texts: list[str], *, seq_len: int = 256, max_texts: int = 64,
               mean_n: int | None = None, device: str = "cpu", progress: bool = False) -> Similarity:
    """Run the streamed forward over up to `max_texts` texts (each cut to `seq_len` tokens) and measure.

    With `mean_n`, also the angular distance over `mean_n` layers averaged over every token; that keeps the
    residual streams of `mean_n + 1` layers for all texts in memory.
    """
    from recipekit.engine.forward.streamed import FLOAT32, StreamedForward
    from recipekit.engine.forward.tokenize import TextTokenizer

    tokenizer = TextTokenizer.of(model.side_files, model.token_rows)
    sequences = [tokenizer.encode(t)[:seq_len] for t in texts[:max_texts]]
    forward = StreamedForward(model, device=device, name=name)
    count = len(forward.decoder.layers)
    last = LastToken(("residual",))
    cos_sum = [0.0] * count
    # the residual streams entering the last `keep` layers, for every sequence (a ring indexed by layer)
    keep = max(2, (mean_n or 0) + 1)
    ring: list[torch.Tensor] = []
    mean_sum = [0.0] * (count - mean_n + 1) if mean_n else []

    def observe(a) -> None:
        if a.point != "residual":
            return
        last(a)
        rows = slice(a.rows.start, a.rows.stop)
        if not ring:
            ring.extend(torch.empty(len(sequences), *a.tensor.shape[1:], device=a.tensor.device) for _ in range(keep))
        if a.layer > 0:
            cos = torch.nn.functional.cosine_similarity(ring[(a.layer - 1) % keep][rows], a.tensor, dim=-1)
            cos_sum[a.layer - 1] += float(cos[a.valid].sum())
        if mean_n and a.layer >= mean_n:
            cos = torch.nn.functional.cosine_similarity(ring[(a.layer - mean_n) % keep][rows], a.tensor, dim=-1)
            mean_sum[a.layer - mean_n] += float((torch.arccos(cos[a.valid].clamp(-1, 1)) / math.pi).sum())
        ring[a.layer % keep][rows] = a.tensor

    forward.run(sequences, observer=observe, progress=progress)
    lengths = [len(s) for s in sequences]
    tokens = sum(lengths)
    # the ring, and each sequence's last token entering every layer
    kept = FLOAT32 * forward.spec.hidden * len(sequences) * (keep * max(lengths) + count + 1)
    return Similarity(count, len(sequences), tokens, {layer: v for (_, layer), v in last.values.items()},
                      [1 - c / tokens for c in cos_sum], {mean_n: [v / tokens for v in mean_sum]} if mean_n else {},
                      forward.held_bytes(lengths) + kept)
