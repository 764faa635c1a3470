"""SNR tables: the random-matrix SNR (`core/rmt.py`) of each chosen module's weight in every decoder layer.

A module is named as the Llama family names it; in a fused layout (Phi-3's `qkv_proj`) its weight is its rows of
the fused matrix (`core/modules.py`).

Data-free, one weight in memory at a time: what `recipe analyze --metric snr` prints and `select: {metric: snr}`
chooses by. torch is imported only when a table is computed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from recipekit.engine.core.graph import LazyModel
from recipekit.engine.core.layers import decoder_of
from recipekit.engine.core.modules import layer_modules, module_weights
from recipekit.engine.core.names import PROJECTIONS
from recipekit.engine.core.rmt import snr
from recipekit.engine.errors import PlanError
from recipekit.engine.io.inputs import InputFiles
from recipekit.engine.io.safetensors_header import DTYPE_SIZES
from recipekit.engine.progress import progress_bar

MODULES = PROJECTIONS


@dataclass(frozen=True)
class SNRRow:
    layer: int
    module: str
    snr: float
    snr_over_max: float
    signal_values: int

    def to_dict(self) -> dict:
        finite = math.isfinite(self.snr)
        return {"layer": self.layer, "module": self.module, "snr": self.snr if finite else None,
                "infinite": not finite, "snr_over_max": self.snr_over_max if finite else None,
                "signal_values": self.signal_values}


def chosen_modules(model: LazyModel, name: str, modules: tuple[str, ...] | None = None) -> list[str]:
    """The modules an SNR table covers (default: those of `MODULES` the model has, fused or not); `PlanError`
    unless every layer has each one's weight as a matrix. Reads no tensor and needs no torch, so a check without
    measuring runs it too."""
    decoder = decoder_of(model, name)
    present = [m for m in MODULES if m in layer_modules(model, decoder.layers[0])]
    chosen = list(modules) if modules else present
    for module in chosen:
        shape = module_weights(model, name, module)[0].shape
        if len(shape) != 2:
            raise PlanError(f"{module}.weight of model {name!r} has shape {list(shape)}: SNR is measured on "
                            f"matrices (modules such as {', '.join(present[:3])})")
    return chosen


def held_bytes(model: LazyModel, name: str, modules: tuple[str, ...]) -> int:
    """What an SNR table holds at its peak (estimated): the largest tensor as read, the float64 copy of the matrix
    measured in it (a fused tensor's slice), and the float64 Gram matrix of its smaller side with the eigenvalue
    solver's workspace of the same size."""
    weights = [w for m in modules for w in module_weights(model, name, m)]
    return max(math.prod(model.tensors[w.tensor].shape) * DTYPE_SIZES[model.tensors[w.tensor].dtype]
               + math.prod(w.shape) * 8 + 2 * min(w.shape) ** 2 * 8 for w in weights)


def snr_table(model: LazyModel, name: str, modules: tuple[str, ...] | None = None, *, device: str = "cpu",
              progress: bool = False) -> list[SNRRow]:
    """SNR of each module's weight (its rows of a fused matrix) in every decoder layer, each tensor read onto
    `device` once per layer; modules default to those the model has."""
    from recipekit.engine.run.evaluate import Evaluator

    chosen = chosen_modules(model, name, modules)
    weights = {m: module_weights(model, name, m) for m in chosen}
    layers = len(decoder_of(model, name).layers)
    rows = []
    bar = progress_bar(layers * len(chosen), progress, unit="matrix", desc="snr")
    with InputFiles() as files:
        for i in range(layers):
            read = {}  # a fused tensor is read once for all of its modules
            for module in chosen:
                weight = weights[module][i]
                if weight.tensor not in read:
                    node = model.tensors[weight.tensor]
                    read[weight.tensor] = Evaluator([node], files.fd, device).value(node)
                matrix = read[weight.tensor]
                result = snr(matrix if weight.rows is None else matrix[weight.rows[0]:weight.rows[1]])
                rows.append(SNRRow(i, module, result.snr, result.snr_over_max, result.signal_values))
                bar.update(1)
    bar.close()
    return rows
