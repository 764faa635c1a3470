"""Super weights: single `mlp.down_proj` entries behind a massive activation, and what zeroing each one costs.

One streamed forward records, per decoder layer, the largest |input| of each
down_proj input channel and |output| of each output channel. A layer where
both the largest input and the largest output exceed `threshold` times that
layer's median holds a candidate at `down_proj.weight[output channel, input
channel]`. The found weights are zeroed and the forward is run again (up to
`rounds` times), because a large super weight can hide smaller ones.

A spike is not yet a weight the model depends on: in SmolLM2-135M six spikes
were found over the demo's stories, and zeroing one multiplied perplexity by
ten, another raised it by a third, and the other four changed it by 6% or
less (benchmarks/superweights.py). `verify` measures this: the perplexity of
a calibration text with each candidate zeroed on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from recipekit.engine.core.graph import LazyModel, elementwise
from recipekit.engine.core.names import DOWN
from recipekit.engine.core.probe import VERIFY_TOKENS
from recipekit.engine.forward.capture import MaxAbs
from recipekit.engine.forward.streamed import StreamedForward
from recipekit.engine.forward.tokenize import TextTokenizer
from recipekit.engine.io.inputs import InputFiles
from recipekit.engine.progress import progress_bar
from recipekit.engine.run.evaluate import Evaluator

DEFAULT_PROMPT = "Apple Inc. is a worldwide tech company."
# What `verify` scores when it is given no text: the search's prompt and a few plain paragraphs (written for
# recipekit) of the kinds of text models are trained on: narrative, explanation, instructions, numbers and code.
CALIBRATION_TEXT = "\n\n".join([
    DEFAULT_PROMPT + " It designs phones, computers and watches, and sells software and services for them.",
    ("The old lighthouse stood at the end of the harbour wall. Every evening the keeper climbed the ninety steps, "
     "cleaned the glass and lit the lamp, and every morning he wrote in his book how many ships had passed."),
    ("Water boils at 100 degrees Celsius at sea level, but at lower temperatures in the mountains, because the air "
     "pressure there is lower. This is why cooking rice or pasta takes longer at high altitude."),
    ("To change a flat tyre, loosen the wheel nuts while the car is still on the ground, then raise it with the "
     "jack, remove the nuts and the wheel, fit the spare and tighten the nuts in a cross pattern."),
    ("In 1969 two astronauts walked on the Moon while a third stayed in orbit. The mission lasted eight days, "
     "and the crew brought back about 21 kilograms of rock and dust."),
    ("def mean(values):\n    \"\"\"Return the arithmetic mean of a non-empty list.\"\"\"\n"
     "    return sum(values) / len(values)"),
    ("The committee met on Tuesday to discuss the budget for next year. Most members agreed that the library "
     "needed new computers, but they could not agree on how to pay for the longer opening hours."),
])


@dataclass(frozen=True)
class SuperWeight:
    layer: int
    row: int  # output channel: the residual stream channel that spikes
    column: int  # input channel: the intermediate activation that spikes
    value: float
    tensor: str
    round: int
    out_ratio: float  # the layer's largest |output| over its median
    in_ratio: float
    perplexity_zeroed: float | None = None  # set by `verify`: the calibration text's perplexity without it
    effect: float | None = None  # set by `verify`: perplexity_zeroed / the model's own perplexity - 1

    def to_dict(self) -> dict:
        return {"layer": self.layer, "row": self.row, "column": self.column, "value": self.value,
                "tensor": self.tensor, "round": self.round, "out_ratio": self.out_ratio, "in_ratio": self.in_ratio,
                "perplexity_zeroed": self.perplexity_zeroed, "effect": self.effect}


@dataclass(frozen=True)
class LayerPeaks:
    """A layer's largest down_proj |output| and |input| over their medians, in the model as it is (first round)."""

    layer: int
    out_ratio: float
    in_ratio: float

    def to_dict(self) -> dict:
        return {"layer": self.layer, "out_ratio": self.out_ratio, "in_ratio": self.in_ratio}


@dataclass(frozen=True)
class Search:
    """What `find_super_weights` found, and what it measured in every layer."""

    weights: list[SuperWeight]  # in the order found
    layers: list[LayerPeaks]  # every layer with a single down_proj (a Mixture-of-Experts layer has none)
    held_bytes: int = 0  # what the search held at its peak (estimated): one forward and the peaks kept


@dataclass(frozen=True)
class Verification:
    """What zeroing each candidate on its own does to the perplexity of a calibration text."""

    perplexity: float  # the model's own
    tokens: int  # calibration tokens scored
    weights: list[SuperWeight]  # with perplexity_zeroed and effect, the largest effect first
    held_bytes: int = 0  # what scoring held at its peak (estimated): one perplexity at a time


def find_super_weights(model: LazyModel, name: str, texts: list[str], *, threshold: float = 50.0, rounds: int = 10,
                       seq_len: int = 256, max_texts: int = 64, device: str = "cpu", progress: bool = False) -> Search:
    """Every super weight the default prompt and `texts` reveal, and every layer's peaks."""
    tokenizer = TextTokenizer.of(model.side_files, model.token_rows)
    sequences = [ids for ids in (tokenizer.encode(t)[:seq_len] for t in [DEFAULT_PROMPT, *texts[:max_texts]]) if ids]
    decoder = StreamedForward(model, name=name).decoder
    found: list[SuperWeight] = []
    layers: list[LayerPeaks] = []
    held = 0
    for round_ in range(1, rounds + 1):
        forward = StreamedForward(zeroed(model, name, found), device=device, name=name)
        peaks = MaxAbs(("down_in", "down_out"))
        forward.run(sequences, observer=peaks, progress=progress)
        held = max(held, forward.held_bytes([len(s) for s in sequences]) + peaks.held_bytes())
        new = []
        for layer in range(len(decoder.layers)):
            if ("down_out", layer) not in peaks.values:
                continue  # a Mixture-of-Experts layer has no single down_proj
            out, inp = peaks.values[("down_out", layer)].float(), peaks.values[("down_in", layer)].float()
            out_ratio, in_ratio = _ratio(out), _ratio(inp)
            if round_ == 1:
                layers.append(LayerPeaks(layer, out_ratio, in_ratio))
            if out_ratio > threshold and in_ratio > threshold:
                row, column = int(out.argmax()), int(inp.argmax())
                if not any((w.layer, w.row, w.column) == (layer, row, column) for w in found + new):
                    tensor = f"{decoder.prefix}.{layer}.{DOWN}"
                    new.append(SuperWeight(layer, row, column, 0.0, tensor, round_, out_ratio, in_ratio))
        if not new:
            break
        found += _with_values(model, new)
    return Search(found, layers, held)


def verify(model: LazyModel, name: str, weights: list[SuperWeight], text: str, *, seq_len: int = 256,
           max_tokens: int = VERIFY_TOKENS, device: str = "cpu", progress: bool = False) -> Verification:
    """Perplexity of `text` as it is, and with each weight zeroed on its own; the weights ranked by the increase.

    A text shorter than `seq_len` tokens is scored as one window, so a few sentences are enough.
    """
    from recipekit.engine.measure.perplexity import perplexity

    tokenizer = TextTokenizer.of(model.side_files, model.token_rows)
    tokens = min(len(tokenizer.encode_plain(text)), max_tokens)
    window = min(seq_len, tokens + (tokenizer.bos_id is not None))

    bar = progress_bar(len(weights) + 1, progress, unit="perplexity", desc="verifying")

    def score(m: LazyModel):
        result = perplexity(m, text, text_name=name, seq_len=window, max_tokens=max_tokens, device=device)
        bar.update(1)
        return result

    own = score(model)
    measured, held = [], own.held_bytes
    for w in weights:
        without = score(zeroed(model, name, [w]))
        held = max(held, without.held_bytes)
        effect = without.perplexity / own.perplexity - 1
        measured.append(replace(w, perplexity_zeroed=without.perplexity, effect=effect))
    bar.close()
    ranked = sorted(measured, key=lambda w: -w.effect)  # stable: equal effects keep the order found
    return Verification(own.perplexity, own.tokens, ranked, held)


def zeroed(model: LazyModel, name: str, weights: list[SuperWeight]) -> LazyModel:
    """The model with the given down_proj entries set to zero (a lazy rewrite: nothing is read)."""
    if not weights:
        return model
    tensors = dict(model.tensors)
    by_tensor: dict[str, list[tuple[int, int]]] = {}
    for w in weights:
        by_tensor.setdefault(w.tensor, []).append((w.row, w.column))
    for tensor, coordinates in by_tensor.items():
        tensors[tensor] = elementwise("zero_at", tensors[tensor], coordinates=tuple(sorted(coordinates)))
    return model.evolve(tensors=tensors)


def _ratio(peaks: torch.Tensor) -> float:
    median = float(peaks.median())
    return float(peaks.max()) / median if median > 0 else float("inf")


def _with_values(model: LazyModel, weights: list[SuperWeight]) -> list[SuperWeight]:
    """Read each weight's value (one down_proj at a time)."""
    out = []
    with InputFiles() as files:
        for w in weights:
            node = model.tensors[w.tensor]
            value = float(Evaluator([node], files.fd).value(node)[w.row, w.column])
            out.append(replace(w, value=value))
    return out
