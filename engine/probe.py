"""Measurements of LazyModels that ops may ask for (ops never open files themselves)."""
from __future__ import annotations

from .lazy import LazyModel


class Probe:
    """What the engine measures for data-driven ops. A recipe that selects nothing by a metric never calls it."""

    def snr(self, model: LazyModel, name: str, module: str) -> list[float]:
        """Random-matrix SNR of `<module>.weight` in every decoder layer of `model`, in layer order."""
        from .analyze import snr_table  # imports torch: only recipes that select by a metric pay for it

        return [row.snr for row in snr_table(model, name, (module,))]
