"""Run a model one decoder layer at a time, straight from a LazyModel.

Layer-major: every sequence of a pass goes through layer i before layer i+1
is read, so each weight is read once and only activations stay in memory. A
background thread reads the next layer while this one computes. Observers see
named activations (see `llama.decoder_layer`; each family's math is in its
own module, reached through `families`) without the forward keeping them.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from recipekit.engine.core.graph import LazyModel, Load, Node, cast_source
from recipekit.engine.core.kernels import cast, torch_dtype
from recipekit.engine.core.layers import Decoder, decoder_of
from recipekit.engine.errors import PlanError
from recipekit.engine.forward.blocks import attention_mask
from recipekit.engine.forward.families import Spec, decoder_layer, spec_of
from recipekit.engine.io.inputs import InputFiles
from recipekit.engine.io.safetensors_header import DTYPE_SIZES
from recipekit.engine.progress import progress_bar
from recipekit.engine.run.evaluate import Evaluator, read_rows

# attention scores of one micro-batch stay below this many floats (256 MB)
SCORE_BUDGET = 2**26
FLOAT32 = 4  # bytes: the forward computes in float32


@dataclass(frozen=True)
class Activation:
    """What an observer sees: `tensor` [b, T, C] for sequences `rows` of the pass; `valid` [b, T] marks real tokens.

    `point` is `residual`, `attn_in`, `mlp_in`, `down_in`, `down_out`, `router` (MoE layers: router
    logits; they have no `down_in`/`down_out`) (of decoder layer `layer`; `residual`
    of layer = number of layers is the stream after the last layer, before the final norm) or `final` (after
    the final norm, `layer` = number of layers).
    """

    point: str
    layer: int
    tensor: torch.Tensor
    valid: torch.Tensor
    rows: range


Observer = Callable[[Activation], None]


def _check_tensors(spec: Spec, model: LazyModel, decoder: Decoder, embed_name: str, norm_name: str) -> None:
    """The weights must hold every tensor the family's math reads, and the config and the weights must describe
    the same model, before anything is computed: a config that contradicts its tensors would otherwise fail deep
    inside a matrix product, or worse, not fail."""
    missing = [n for n in (embed_name, norm_name) if n not in model.tensors]
    shaped = []  # (name, expected shape, why)
    for i, layer in enumerate(decoder.layers):
        at = f"{decoder.prefix}.{i}."
        wanted = spec.layer_tensors(i, {rest: model.tensors[name].shape for rest, name in layer.items()}, at)
        missing += [at + rest for rest in wanted if rest not in layer]
        shaped += [(at + rest, shape, why) for rest, (shape, why) in wanted.items() if shape and rest in layer]
    if missing:
        raise PlanError(f"the model lacks tensors the forward needs: {', '.join(missing[:4])}"
                        + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))
    embed = model.tensors[embed_name].shape
    if len(embed) != 2 or embed[1] != spec.hidden:
        raise PlanError(f"config.json and the weights disagree: {embed_name} has shape {list(embed)}, the config "
                        f"says [vocab, {spec.hidden}] (hidden_size)")
    for name, shape, why in shaped:
        got = model.tensors[name].shape
        if got != shape:
            raise PlanError(f"config.json and the weights disagree: {name} has shape {list(got)}, the config "
                            f"({why}) says {list(shape)}")


class StreamedForward:
    """The forward pass of a LazyModel of a supported family with one layer's weights in memory (two while
    prefetching)."""

    def __init__(self, model: LazyModel, *, device: str = "cpu", name: str = "model"):
        self.model = model
        self.spec = spec_of(model.config)
        self.decoder = decoder_of(model, name)
        self.device = torch.device(device)
        root = self.decoder.prefix.removesuffix("layers")
        self.embed_name = f"{root}embed_tokens.weight"
        self.norm_name = f"{root}norm.weight"
        # beside the decoder's parent: `lm_head.weight`, or `language_model.lm_head.weight` in a multimodal Gemma 3
        heads = [n for n in ("lm_head.weight", f"{root.removesuffix('model.')}lm_head.weight") if n in model.tensors]
        self.head_name = heads[0] if heads else self.embed_name
        _check_tensors(self.spec, model, self.decoder, self.embed_name, self.norm_name)
        self.weight_bytes_held = 0
        self.peak_weight_bytes = 0  # most weight bytes held at once during `run`, for memory checks
        self._held_lock = threading.Lock()  # the reader thread and the main thread both count

    def run(self, sequences: list[list[int]], *, observer: Observer | None = None,
            progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids per sequence -> (final normed hidden states [B, T, C], valid mask [B, T]), right-padded."""
        if not sequences or not all(sequences):
            raise ValueError("the forward needs at least one non-empty sequence")
        observe = observer or (lambda activation: None)
        length = max(len(s) for s in sequences)
        ids = torch.zeros(len(sequences), length, dtype=torch.long)
        valid = torch.zeros(len(sequences), length, dtype=torch.bool)
        for b, seq in enumerate(sequences):
            ids[b, :len(seq)] = torch.tensor(seq)
            valid[b, :len(seq)] = True
        ids, valid = ids.to(self.device), valid.to(self.device)
        ropes = self.spec.rope_tables(length, self.device)
        micro = self._micro_batch(length)
        batches = [range(start, min(start + micro, len(sequences))) for start in range(0, len(sequences), micro)]
        count = len(self.decoder.layers)

        with InputFiles() as files, ThreadPoolExecutor(max_workers=1) as reader:
            hidden = self.scaled(self.embed(ids, files))
            pending = reader.submit(self._read_layer, 0, files)
            bar = progress_bar(count, progress, unit="layer", desc="forward")
            for i in range(count):
                weights = pending.result()
                if i + 1 < count:
                    pending = reader.submit(self._read_layer, i + 1, files)
                masks = {}
                for rows in batches:
                    window = self.spec.sliding[i]
                    if window not in masks:
                        masks[window] = attention_mask(valid, window)
                    part = slice(rows.start, rows.stop)

                    def point(name: str, tensor: torch.Tensor, i=i, rows=rows, part=part) -> None:
                        observe(Activation(name, i, tensor, valid[part], rows))

                    hidden[part] = decoder_layer(self.spec, i, weights, hidden[part], masks[window][part],
                                                 ropes[i], point)
                self._release(weights)
                del weights
                bar.update(1)
            bar.close()
            observe(Activation("residual", count, hidden, valid, range(len(sequences))))  # after the last layer
            norm = self._read({"norm": self.model.tensors[self.norm_name]}, files)
            final = self.spec.final_norm(hidden, norm["norm"])
            self._release(norm)
        observe(Activation("final", count, final, valid, range(len(sequences))))
        return final, valid

    def _micro_batch(self, length: int) -> int:
        """Sequences of `length` tokens that go through a layer together."""
        return max(1, SCORE_BUDGET // (self.spec.heads * length * length))

    def held_bytes(self, lengths: list[int]) -> int:
        """About the most memory `run` holds for sequences of these lengths, observers' own state aside: what the
        plan's peak-memory estimate counts for a step that measures (it mirrors `run`, so it lives beside it).

        For the whole pass: two layers' weights in their stored dtype (one computing, the next read ahead) and a
        float32 copy of the largest one while it is upcast; the residual stream [B, T, C] in float32 and the
        attention mask [B, 1, T, T] (bool). Inside a layer, for one micro-batch of b sequences: q, k and v
        (repeated to every head) and the attention output, which stay until the layer returns; beside them the
        MLP's gate and up projections and their product [b, T, intermediate], the normed input and the new
        residual [b, T, C]. torch's fused attention (flash on the CPU, memory-efficient on CUDA) never holds the
        [b, heads, T, T] scores; a family whose attention computes them itself (Gemma 2's soft cap) holds
        `spec.score_copies` of them. After the last layer, the final norm holds the stream, its result and two
        temporaries of the same size.
        """
        length, count, spec = max(lengths), len(lengths), self.spec
        layer_bytes, upcast, width = 0, 0, spec.hidden
        for layer in self.decoder.layers:
            nodes = [self.model.tensors[name] for name in layer.values()]
            layer_bytes = max(layer_bytes, sum(math.prod(n.shape) * DTYPE_SIZES[n.dtype] for n in nodes))
            for node in nodes:
                if len(node.shape) == 2:
                    width = max(width, *node.shape)  # the widest activation a layer computes (the MLP's)
                    if DTYPE_SIZES[node.dtype] < FLOAT32:
                        upcast = max(upcast, math.prod(node.shape) * FLOAT32)
        batch = min(count, self._micro_batch(length))
        inside = FLOAT32 * batch * length * (4 * spec.heads * spec.head_dim + 3 * width + 2 * spec.hidden
                                             + spec.score_copies * spec.heads * length)
        stream = FLOAT32 * count * length * spec.hidden
        return max(2 * layer_bytes + upcast + stream + count * length * length + inside, 4 * stream)

    def embed(self, ids: torch.Tensor, files: InputFiles) -> torch.Tensor:
        """Token embeddings of `ids` (any shape) in float32 on the device; reads only the rows used when the
        embedding is an input tensor (a 150k-token vocabulary costs nothing for a few prompts)."""
        node = self.model.tensors[self.embed_name]
        vocab = node.shape[0]
        if int(ids.max()) >= vocab:
            raise PlanError(f"token id {int(ids.max())} is outside the model's vocabulary of {vocab}: "
                            "is the tokenizer the model's own?")
        source = node if isinstance(node, Load) else cast_source(node)
        if source is None:  # computed embeddings: evaluate them whole
            table = self._read({"embed": node}, files)
            rows = table["embed"][ids].float()
            self._release(table)
            return rows
        used, where = torch.unique(ids.cpu(), return_inverse=True)
        rows = read_rows(source.tensor, files.fd(source.tensor), used.tolist())
        if node is not source:  # a dtype cast: round the rows as the whole tensor would be
            rows = cast(rows, dtype=node.dtype)
        return rows.to(device=self.device, dtype=torch.float32)[where.to(self.device)]

    def scaled(self, rows: torch.Tensor) -> torch.Tensor:
        """Embedding rows times the family's `embed_scale` (Gemma: sqrt(hidden_size)), multiplied in the
        embedding's own dtype as transformers does (a bf16 model rounds the scale and the product to bf16)."""
        if self.spec.embed_scale == 1.0:
            return rows
        stored = torch_dtype(self.model.tensors[self.embed_name].dtype)
        return (rows.to(stored) * torch.tensor(self.spec.embed_scale, dtype=stored, device=rows.device)).float()

    def logits(self, states: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Final normed states [..., C] and `lm_head()` [vocab, C] -> logits [..., vocab], soft-capped where the
        family does (Gemma 2)."""
        return self.spec.logits(states, head)

    def lm_head(self) -> torch.Tensor:
        """The output projection [vocab, C] in float32 (the embedding when tied)."""
        with InputFiles() as files:
            weights = self._read({"head": self.model.tensors[self.head_name]}, files)
        self._release(weights)
        return weights["head"].float()

    def _read_layer(self, i: int, files: InputFiles) -> dict[str, torch.Tensor]:
        layer = self.decoder.layers[i]
        return self._read({rest: self.model.tensors[name] for rest, name in layer.items()}, files)

    def _read(self, nodes: dict[str, Node], files: InputFiles) -> dict[str, torch.Tensor]:
        evaluator = Evaluator(list(nodes.values()), files.fd)
        # kept in their stored dtype (half the memory for bf16 models); the math upcasts one weight at a time
        out = {key: evaluator.value(node).to(device=self.device) for key, node in nodes.items()}
        with self._held_lock:
            self.weight_bytes_held += sum(t.numel() * t.element_size() for t in out.values())
            self.peak_weight_bytes = max(self.peak_weight_bytes, self.weight_bytes_held)
        return out

    def _release(self, weights: dict[str, torch.Tensor]) -> None:
        with self._held_lock:
            self.weight_bytes_held -= sum(t.numel() * t.element_size() for t in weights.values())
