"""The merge methods: for each, its kernel, whether it needs a base model, how many models it takes, and the
parameters it reads with mergekit's names and defaults.

`per_model` parameters may differ between the merged models (a model entry's value wins over the global one);
`shared` parameters are one per tensor. A default of None means the parameter is required.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Method:
    name: str
    kernel: str
    base: Literal["required", "optional", "ignored"]  # "ignored": a base may be named, but it is merged like any model
    min_models: int  # counting the base
    max_models: int | None = None
    per_model: dict[str, float | None] = field(default_factory=dict)
    shared: dict[str, float | bool | None] = field(default_factory=dict)
    reference: str = ""

    def takes(self, parameter: str) -> bool:
        return parameter in self.per_model or parameter in self.shared


def _task_vectors(name: str, reference: str, *, normalize: bool, rescale: bool, extra: dict | None = None) -> Method:
    per_model: dict[str, float | None] = {"weight": None, "density": 1.0, **(extra or {})}
    shared: dict[str, float | bool | None] = {"normalize": normalize, "lambda": 1.0, "rescale": rescale,
                                              "int8_mask": False}
    return Method(name, name, "required", 2, per_model=per_model, shared=shared, reference=reference)


_TIES, _DARE, _BREADCRUMBS, _DELLA = ("https://arxiv.org/abs/2306.01708", "https://arxiv.org/abs/2311.03099",
                                      "https://arxiv.org/abs/2312.06795", "https://arxiv.org/abs/2406.11617")

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("linear", "linear", "ignored", 2, per_model={"weight": None}, shared={"normalize": True},
           reference="https://arxiv.org/abs/2203.05482"),
    Method("slerp", "slerp", "required", 2, 2, shared={"t": None}, reference="https://en.wikipedia.org/wiki/Slerp"),
    Method("nearswap", "nearswap", "required", 2, 2, shared={"t": None},
           reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"),
    Method("model_stock", "model_stock", "required", 3, shared={"filter_wise": False},
           reference="https://arxiv.org/abs/2403.19522"),
    _task_vectors("task_arithmetic", "https://arxiv.org/abs/2212.04089", normalize=False, rescale=False),
    _task_vectors("ties", _TIES, normalize=True, rescale=False),
    _task_vectors("dare_ties", _DARE, normalize=False, rescale=True),
    _task_vectors("dare_linear", _DARE, normalize=False, rescale=True),
    _task_vectors("breadcrumbs", _BREADCRUMBS, normalize=False, rescale=False, extra={"gamma": 0.01}),
    _task_vectors("breadcrumbs_ties", _BREADCRUMBS, normalize=False, rescale=False, extra={"gamma": 0.01}),
    _task_vectors("della", _DELLA, normalize=True, rescale=True, extra={"epsilon": 0.15}),
    _task_vectors("della_linear", _DELLA, normalize=False, rescale=True, extra={"epsilon": 0.15}),
]}

SEEDED = ("dare_ties", "dare_linear", "della", "della_linear")  # methods that draw random masks
