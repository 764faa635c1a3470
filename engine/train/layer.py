"""The one door from training to the family forward math: decoder layers, masks, RoPE tables, final norm and head.

Training runs layers with autograd on; the math is the streamed forward's own (`forward/llama.py`), so a healed
layer computes exactly what transformers will compute when it loads the output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from recipekit.engine.core.graph import LazyModel
from recipekit.engine.forward.blocks import Rope, attention_mask
from recipekit.engine.forward.families import Spec, decoder_layer
from recipekit.engine.forward.streamed import SCORE_BUDGET, StreamedForward
from recipekit.engine.io.inputs import InputFiles
from recipekit.engine.run.evaluate import Evaluator


def _ignore(point: str, tensor: torch.Tensor) -> None:
    pass


@dataclass(frozen=True)
class Geometry:
    """What every layer of one pass shares: sequences of `length` tokens (no padding), their masks and RoPE."""

    spec: Spec
    masks: dict[int | None, torch.Tensor]  # sliding window (None: full attention) -> [1, 1, T, T]
    ropes: list[Rope]  # per layer (families with local and global RoPE bases differ by layer)

    @classmethod
    def of(cls, spec: Spec, length: int, device: torch.device) -> Geometry:
        valid = torch.ones(1, length, dtype=torch.bool, device=device)
        masks = {window: attention_mask(valid, window) for window in set(spec.sliding)}
        return cls(spec, masks, spec.rope_tables(length, device))

    def layer(self, i: int, weights: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        """Decoder layer i: hidden [b, T, C] -> [b, T, C], differentiable in `weights` and `hidden`."""
        mask = self.masks[self.spec.sliding[i]].expand(hidden.shape[0], -1, -1, -1)
        return decoder_layer(self.spec, i, weights, hidden, mask, self.ropes[i], _ignore)

    def logits(self, hidden: torch.Tensor, norm: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """The stream after the last layer [b, T, C] -> logits [b, T, vocab] (the family's final norm and
        soft-capping)."""
        return self.spec.logits(self.spec.final_norm(hidden, norm), head.to(hidden.dtype))


class Stack:
    """A LazyModel's decoder stack as training reads it: one layer's weights at a time, the embeddings of given
    tokens, the final norm and the head (through the streamed forward, which checks the model first)."""

    def __init__(self, model: LazyModel, name: str, device: str):
        self.forward = StreamedForward(model, device=device, name=name)
        self.model = model
        self.spec = self.forward.spec
        self.device = self.forward.device
        self.count = len(self.forward.decoder.layers)

    def pass_batch(self, length: int) -> int:
        """Windows of `length` tokens that go through a layer together without gradients (the streamed
        forward's micro-batch)."""
        return max(1, SCORE_BUDGET // (self.spec.heads * length * length))

    def geometry(self, length: int) -> Geometry:
        return Geometry.of(self.spec, length, self.device)

    def layer_names(self, i: int) -> dict[str, str]:
        """Layer i's tensors: the name after `layers.<i>.` -> the full name."""
        return self.forward.decoder.layers[i]

    def read_layer(self, i: int, files: InputFiles) -> dict[str, torch.Tensor]:
        """Layer i's weights in their stored dtype, on the device."""
        return self.read(self.layer_names(i), files)

    def read(self, names: dict[str, str], files: InputFiles) -> dict[str, torch.Tensor]:
        nodes = {key: self.model.tensors[name] for key, name in names.items()}
        evaluator = Evaluator(list(nodes.values()), files.fd)
        return {key: evaluator.value(node).to(self.device) for key, node in nodes.items()}

    def embed(self, ids: torch.Tensor, files: InputFiles) -> torch.Tensor:
        """ids [N, T] -> the stream entering layer 0, [N, T, C] float32 (scaled where the family scales it)."""
        return self.forward.scaled(self.forward.embed(ids, files))

    def head(self, files: InputFiles) -> tuple[torch.Tensor, torch.Tensor]:
        """(final norm weight [C], output projection [vocab, C] in float32)."""
        norm = self.read({"norm": self.forward.norm_name}, files)["norm"]
        return norm, self.forward.lm_head()
