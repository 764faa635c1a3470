"""SNR tables: the random-matrix SNR (`core/rmt.py`) of each chosen module's weight in every decoder layer.

Data-free, one weight in memory at a time: what `recipe analyze --metric snr` prints and `select: {metric: snr}`
chooses by. torch is imported only when a table is computed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from recipekit.engine.core.graph import LazyModel
from recipekit.engine.core.layers import decoder_of
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
    """The modules an SNR table covers (default: those the model has); `PlanError` unless every layer has each
    one's weight as a matrix. Reads no tensor and needs no torch, so a check without measuring runs it too."""
    decoder = decoder_of(model, name)
    present = [m for m in MODULES if f"{m}.weight" in decoder.layers[0]]
    chosen = list(modules) if modules else present
    missing = [m for m in chosen if any(f"{m}.weight" not in layer for layer in decoder.layers)]
    flat = [m for m in chosen if m not in missing and len(model.tensors[decoder.layers[0][f"{m}.weight"]].shape) != 2]
    if flat:
        raise PlanError(f"{', '.join(flat)} of model {name!r} has 1-D weights: SNR is measured on matrices "
                        f"(modules such as {', '.join(present[:3])})")
    if missing:
        raise PlanError(f"model {name!r} has no {', '.join(missing)} in every layer; its modules: "
                        f"{', '.join(present) or 'none of ' + ', '.join(MODULES)}")
    return chosen


def held_bytes(model: LazyModel, name: str, modules: tuple[str, ...]) -> int:
    """What an SNR table holds at its peak (estimated): the largest matrix as read, its float64 copy, and the
    float64 Gram matrix of its smaller side with the eigenvalue solver's workspace of the same size."""
    nodes = [model.tensors[layer[f"{m}.weight"]] for layer in decoder_of(model, name).layers for m in modules]
    return max(math.prod(n.shape) * (DTYPE_SIZES[n.dtype] + 8) + 2 * min(n.shape) ** 2 * 8 for n in nodes)


def snr_table(model: LazyModel, name: str, modules: tuple[str, ...] | None = None, *, device: str = "cpu",
              progress: bool = False) -> list[SNRRow]:
    """SNR of `<module>.weight` in every decoder layer, each matrix read onto `device` in turn; modules default to
    those the model has."""
    from recipekit.engine.run.evaluate import Evaluator

    decoder = decoder_of(model, name)
    chosen = chosen_modules(model, name, modules)
    rows = []
    bar = progress_bar(len(decoder.layers) * len(chosen), progress, unit="matrix", desc="snr")
    with InputFiles() as files:
        for i, layer in enumerate(decoder.layers):
            for module in chosen:
                node = model.tensors[layer[f"{module}.weight"]]
                result = snr(Evaluator([node], files.fd, device).value(node))
                rows.append(SNRRow(i, module, result.snr, result.snr_over_max, result.signal_values))
                bar.update(1)
    bar.close()
    return rows
