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
    # required / optional: the others are measured from the base; "ignored": a base may be named (it gives the
    # config) but it is merged like any model
    base: Literal["required", "optional", "ignored"]
    others: tuple[int, int | None]  # how many models besides the base (for "ignored": how many models), at most
    per_model: dict[str, float | None] = field(default_factory=dict)
    shared: dict[str, float | bool | None] = field(default_factory=dict)
    reference: str = ""
    seeded: bool = False  # draws random values (seeded by the recipe's seed and the tensor's name)

    def takes(self, parameter: str) -> bool:
        return parameter in self.per_model or parameter in self.shared


def _task_vectors(name: str, reference: str, *, normalize: bool, rescale: bool, extra: dict | None = None,
                  seeded: bool = False) -> Method:
    per_model: dict[str, float | None] = {"weight": None, "density": 1.0, **(extra or {})}
    shared: dict[str, float | bool | None] = {"normalize": normalize, "lambda": 1.0, "rescale": rescale,
                                              "int8_mask": False}
    return Method(name, name, "required", (1, None), per_model=per_model, shared=shared, reference=reference,
                  seeded=seeded)


_TIES, _DARE, _BREADCRUMBS, _DELLA = ("https://arxiv.org/abs/2306.01708", "https://arxiv.org/abs/2311.03099",
                                      "https://arxiv.org/abs/2312.06795", "https://arxiv.org/abs/2406.11617")
_RAM = "https://arxiv.org/abs/2601.13572"

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("linear", "linear", "ignored", (2, None), per_model={"weight": None}, shared={"normalize": True},
           reference="https://arxiv.org/abs/2203.05482"),
    Method("passthrough", "passthrough", "ignored", (1, 1), per_model={"scale": None}),
    Method("slerp", "slerp", "required", (1, 1), shared={"t": None}, reference="https://en.wikipedia.org/wiki/Slerp"),
    Method("nuslerp", "nuslerp", "optional", (2, 2), per_model={"weight": None},
           shared={"nuslerp_flatten": True, "nuslerp_row_wise": False}),
    Method("multislerp", "multislerp", "optional", (1, None), per_model={"weight": None},
           shared={"normalize_weights": True, "eps": 1e-8},
           reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"),
    Method("karcher", "karcher", "ignored", (1, None), shared={"max_iter": 10, "tol": 1e-5},
           reference="https://arxiv.org/abs/2603.04972"),
    Method("nearswap", "nearswap", "required", (1, 1), shared={"t": None},
           reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"),
    Method("model_stock", "model_stock", "required", (2, None), shared={"filter_wise": False},
           reference="https://arxiv.org/abs/2403.19522"),
    Method("arcee_fusion", "arcee_fusion", "required", (1, 1), reference="https://arcee.ai", seeded=True),
    Method("sce", "sce", "required", (1, None), shared={"select_topk": 1.0, "int8_mask": False},
           reference="https://arxiv.org/abs/2408.07990"),
    Method("ram", "ram", "required", (1, None), shared={"epsilon": 1e-5}, reference=_RAM),
    Method("ramplus_tl", "ramplus_tl", "required", (1, None), shared={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
           reference=_RAM),
    _task_vectors("task_arithmetic", "https://arxiv.org/abs/2212.04089", normalize=False, rescale=False),
    _task_vectors("ties", _TIES, normalize=True, rescale=False),
    _task_vectors("dare_ties", _DARE, normalize=False, rescale=True, seeded=True),
    _task_vectors("dare_linear", _DARE, normalize=False, rescale=True, seeded=True),
    _task_vectors("breadcrumbs", _BREADCRUMBS, normalize=False, rescale=False, extra={"gamma": 0.01}),
    _task_vectors("breadcrumbs_ties", _BREADCRUMBS, normalize=False, rescale=False, extra={"gamma": 0.01}),
    _task_vectors("della", _DELLA, normalize=True, rescale=True, extra={"epsilon": 0.15}, seeded=True),
    _task_vectors("della_linear", _DELLA, normalize=False, rescale=True, extra={"epsilon": 0.15}, seeded=True),
]}

# how a model card names each method's result: "a TIES merge of a and b"
TITLES = {
    "linear": "linear", "passthrough": "passthrough", "slerp": "SLERP", "nuslerp": "NuSLERP",
    "multislerp": "multi-SLERP", "karcher": "Karcher-mean", "nearswap": "NearSwap", "model_stock": "Model Stock",
    "arcee_fusion": "Arcee Fusion", "sce": "SCE", "ram": "RAM", "ramplus_tl": "RAM+TL",
    "task_arithmetic": "task-arithmetic", "ties": "TIES", "dare_ties": "DARE-TIES", "dare_linear": "DARE linear",
    "breadcrumbs": "Model Breadcrumbs", "breadcrumbs_ties": "Model Breadcrumbs TIES", "della": "DELLA",
    "della_linear": "DELLA linear",
}
assert TITLES.keys() == METHODS.keys()
