"""Which experts a Mixture of Experts' routers choose on real text (`recipe analyze-routing`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from recipekit.engine.core.graph import LazyModel
from recipekit.engine.core.moe_layouts import LAYOUTS
from recipekit.engine.core.words import counted
from recipekit.engine.errors import PlanError
from recipekit.engine.forward.streamed import Activation, StreamedForward
from recipekit.engine.forward.tokenize import TextTokenizer

STARVED = 0.1  # an expert receiving under this fraction of its fair share (1 / experts) is reported


@dataclass(frozen=True)
class Routing:
    """Per MoE layer, how many routing slots (top-k choices over real tokens) each expert received."""

    experts: int
    experts_per_token: int
    texts: int
    tokens: int
    layers: tuple[int, ...]
    counts: tuple[tuple[int, ...], ...]  # counts[j][e]: slots of expert e in MoE layer layers[j]
    top1: tuple[tuple[int, ...], ...]  # tokens whose first choice is e

    def shares(self) -> list[list[float]]:
        """Fraction of each layer's routing slots per expert (each row sums to 1)."""
        return [[c / max(1, sum(row)) for c in row] for row in self.counts]

    def warnings(self) -> list[str]:
        """Experts that (almost) never get tokens, with the layers where that happens."""
        by_expert: dict[int, list[int]] = {}
        for layer, row in zip(self.layers, self.shares()):
            for e, share in enumerate(row):
                if share < STARVED / self.experts:
                    by_expert.setdefault(e, []).append(layer)
        return [f"expert {e} receives under {100 * STARVED / self.experts:.2g}% of the routing in "
                f"{len(layers)} of {counted(len(self.layers), 'MoE layer')} ({', '.join(map(str, layers[:12]))}"
                f"{', ...' if len(layers) > 12 else ''})" for e, layers in by_expert.items()]

    def to_dict(self) -> dict:
        return {"experts": self.experts, "experts_per_token": self.experts_per_token, "texts": self.texts,
                "tokens": self.tokens,
                "layers": [{"layer": layer, "share": share, "slots": list(counts), "top1": list(top1)}
                           for layer, share, counts, top1 in zip(self.layers, self.shares(), self.counts, self.top1)],
                "warnings": self.warnings()}


def routing(model: LazyModel, name: str, texts: list[str], *, seq_len: int = 256, max_texts: int = 64,
            device: str = "cpu", progress: bool = False) -> Routing:
    """Run the streamed forward over the texts and count each router's top-k choices on real tokens."""
    model_type = str(model.config.get("model_type"))
    if model_type not in LAYOUTS:
        raise PlanError(f"{name} is not a Mixture of Experts (model type {model_type!r}); analyze-routing reads "
                        f"the routers of {', '.join(LAYOUTS)} models")
    forward = StreamedForward(model, device=device, name=name)
    k = forward.spec.experts_per_token
    tokenizer = TextTokenizer.of(model.side_files, model.token_rows)
    sequences = [ids for ids in (tokenizer.encode(t)[:seq_len] for t in texts[:max_texts]) if ids]
    counts: dict[int, torch.Tensor] = {}
    top1: dict[int, torch.Tensor] = {}

    def observe(a: Activation) -> None:
        if a.point != "router":
            return
        experts = a.tensor.shape[-1]
        chosen = a.tensor[a.valid].float().topk(k, dim=-1).indices
        if a.layer not in counts:
            counts[a.layer] = torch.zeros(experts, dtype=torch.long)
            top1[a.layer] = torch.zeros(experts, dtype=torch.long)
        counts[a.layer] += torch.bincount(chosen.reshape(-1).cpu(), minlength=experts)
        top1[a.layer] += torch.bincount(chosen[:, 0].cpu(), minlength=experts)

    forward.run(sequences, observer=observe, progress=progress)
    layers = tuple(sorted(counts))
    experts = int(counts[layers[0]].numel()) if layers else 0
    return Routing(experts, k, len(sequences), sum(len(s) for s in sequences), layers,
                   tuple(tuple(int(c) for c in counts[i]) for i in layers),
                   tuple(tuple(int(c) for c in top1[i]) for i in layers))
