"""low_rank (LASER): replace chosen weight matrices by low-rank approximations.

The rank is fixed, or (by default) the number of singular values above the
random-matrix noise edge that `recipe analyze --metric snr` uses. Protected
super weights in a replaced matrix are restored exactly, so the guard sees
them kept.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from recipekit.engine.core.graph import LazyModel, elementwise, keeps
from recipekit.engine.core.layers import decoder_of, out_of_range
from recipekit.engine.core.modules import module_weights
from recipekit.engine.core.probe import Probe
from recipekit.engine.core.rmt import noise_edge
from recipekit.engine.core.schema import LayerSpan, Ref, StepBase
from recipekit.engine.core.words import counted, listed
from recipekit.engine.errors import Path_, PlanError, Problem

if TYPE_CHECKING:
    import torch


class LowRank(StepBase):
    """Replace the weights of `modules` in `layers` by their low-rank approximation."""

    op: Literal["low_rank"] = Field(description="Low-rank approximation of weight matrices (LASER).")
    model: Ref = Field(description="The model or step whose matrices are replaced.")
    modules: list[str] = Field(min_length=1, description=(
        "Modules such as mlp.down_proj or self_attn.v_proj, named as in Llama; in a fused layout (Phi-3's "
        "qkv_proj, gate_up_proj) a module's rows of the fused matrix are replaced, the other rows kept."))
    layers: list[LayerSpan] | None = Field(None, min_length=1, description="Layers (indices and [start, end) "
                                                                          "ranges); default: every layer.")
    rank: int | None = Field(None, ge=1, description="Keep this many singular values; default: those above the "
                                                     "random-matrix noise edge (laserRMT).")
    lowest_snr: int | None = Field(None, ge=1, description="Of the chosen matrices, replace only this many, those "
                                                           "with the lowest random-matrix SNR.")

    def references(self) -> list[tuple[Path_, str]]:
        return [(("model",), self.model)]

    def title(self, names: Mapping[str, str]) -> str:
        return f"{names[self.model]} with low-rank {listed(self.modules)}"


def low_rank(step: LowRank, models: Mapping[str, LazyModel], probe: Probe) -> LazyModel:
    model = models[step.model]
    decoder = decoder_of(model, step.model)
    count = len(decoder.layers)
    layers = list(range(count))
    if step.layers is not None:
        problems = out_of_range([(("layers", k), span) for k, span in enumerate(step.layers)], count, step.model)
        if problems:
            raise PlanError(problems)
        layers = list(dict.fromkeys(i for start, end in step.layers for i in range(start, end)))
    chosen = []  # (layer, module)
    weights = {}
    for k, module in enumerate(step.modules):
        weights[module] = module_weights(model, step.model, module, path=("modules", k))
        shape = weights[module][0].shape
        if len(shape) != 2:
            raise PlanError(Problem(f"{module}.weight has shape {list(shape)}: a low-rank approximation needs a "
                                    "matrix (e.g. mlp.down_proj, self_attn.v_proj)", path=("modules", k)))
        chosen += [(i, module) for i in layers]
    note_snr = ""
    if step.lowest_snr is not None:
        snr = {m: probe.snr(model, step.model, m) for m in step.modules}
        chosen = sorted(sorted(chosen, key=lambda c: (snr[c[1]][c[0]], c))[: step.lowest_snr])
        note_snr = " (lowest SNR: " + ", ".join(f"{m} of layer {i} {snr[m][i]:.4g}" for i, m in chosen) + ")"
    blocks: dict[str, dict[tuple[int, int] | None, str]] = {}  # tensor -> its rows to replace (None: all of it)
    for i, module in chosen:
        weight = weights[module][i]
        if step.rank is not None and step.rank > min(weight.shape):
            raise PlanError(Problem(f"rank {step.rank} is more than {module} of layer {i} allows (shape "
                                    f"{list(weight.shape)})", path=("rank",)))
        blocks.setdefault(weight.tensor, {})[weight.rows] = module
    tensors = dict(model.tensors)
    kept = []
    for name, rows in blocks.items():
        if None in rows and len(rows) > 1:  # a fused matrix named whole and by one of its parts
            raise PlanError(Problem(f"{rows[None]} and {', '.join(m for r, m in rows.items() if r)} are both in "
                                    f"{name}: name the fused matrix or its parts, not both", path=("modules",)))
        node = tensors[name]
        keep = tuple(sorted((w.row, w.column) for w in model.protected if keeps(node, w)))
        kept += [w.label for w in model.protected if keeps(node, w)]
        fused = {} if None in rows else {"rows": tuple(sorted(rows))}
        tensors[name] = elementwise("low_rank", node, rank=step.rank, keep=keep, **fused)
    how = f"rank {step.rank}" if step.rank is not None else "the singular values above the noise edge"
    note = (f"low_rank: {counted(len(chosen), 'matrix', 'matrices')} to {how}{note_snr}"
            + (f"; super weights kept exactly: {', '.join(kept)}" if kept else ""))
    return model.evolve(tensors=tensors, notes=model.notes + (note,))


def low_rank_kernel(x: torch.Tensor, *, rank: int | None, keep: tuple[tuple[int, int], ...],
                    rows: tuple[tuple[int, int], ...] | None = None) -> torch.Tensor:
    """[out, in] -> the matrix rebuilt from its `rank` largest singular directions (None: those above the
    random-matrix noise edge, as laserRMT does), computed in float64; with `rows` (the modules of a fused matrix),
    each block of rows [start, end) on its own and the other rows as they were. The entries in `keep` are restored
    exactly."""
    if rows is None:
        y = _rebuilt(x, rank)
    else:
        y = x.clone()
        for start, end in rows:
            y[start:end] = _rebuilt(x[start:end], rank)
    for row, column in keep:
        y[row, column] = x[row, column]
    return y


def _rebuilt(x: torch.Tensor, rank: int | None) -> torch.Tensor:
    import torch

    u, values, vh = torch.linalg.svd(x.to(torch.float64), full_matrices=False)
    k = rank if rank is not None else int(torch.count_nonzero(values > noise_edge(values, tuple(x.shape))))
    return ((u[:, :k] * values[:k]) @ vh[:k]).to(x.dtype)


KERNELS = {"low_rank": low_rank_kernel}
