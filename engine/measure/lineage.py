"""Do two models descend from one base? A cheap look at their RMSNorm weights, read without torch.

Fine-tunes (and merges) of one base keep its norm weights nearly unchanged, so
the Pearson correlation of two models' norm weights is close to 1 for
relatives and near 0 for unrelated models. An MoE whose experts come from
another base than its attention gets hidden states its MLPs never saw: that is
how frankenMoEs end up producing gibberish, so `stack_experts` warns.
"""
from __future__ import annotations

import math
import os
import statistics
import struct
from array import array

from recipekit.engine.core.graph import LazyModel, Load
from recipekit.engine.core.layers import decoder_of
from recipekit.engine.io.inputs import InputFiles
from recipekit.engine.io.safetensors_header import TensorInfo

NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


def norm_correlation(a: LazyModel, a_name: str, b: LazyModel, b_name: str) -> float | None:
    """Median over the layers' norms of the Pearson correlation of the two models' weights (each norm on its
    own, so a norm rescaled as a whole still matches); None when they cannot be compared (other shapes,
    computed tensors, weights not on disk yet such as an uncached Hub shard, or constant norms)."""
    first, second = _norm_values(a, a_name), _norm_values(b, b_name)
    if first is None or second is None or len(first) != len(second):
        return None
    scores = [r for x, y in zip(first, second) if len(x) == len(y) and (r := _pearson(x, y)) is not None]
    return statistics.median(scores) if scores else None


def _norm_values(model: LazyModel, name: str) -> list[list[float]] | None:
    """Every decoder norm's weights, in layer order."""
    values: list[list[float]] = []
    with InputFiles() as files:
        for layer in decoder_of(model, name).layers:
            for rest in NORMS:
                node = model.tensors.get(layer.get(rest, ""))
                if not isinstance(node, Load) or not node.tensor.file.is_file():
                    return None
                decoded = _floats(node.tensor, files)
                if decoded is None:
                    return None
                values.append(decoded)
    return values


def _floats(info: TensorInfo, files: InputFiles) -> list[float] | None:
    """A small float tensor's values (F32, BF16 or F16), decoded with the standard library."""
    raw = os.pread(files.fd(info), info.nbytes, info.offset)
    if len(raw) != info.nbytes:
        return None
    if info.dtype == "F32":
        return array("f", raw).tolist()
    if info.dtype == "BF16":  # the high half of a float32
        widened = bytearray(2 * len(raw))
        widened[2::4], widened[3::4] = raw[0::2], raw[1::2]
        return array("f", bytes(widened)).tolist()
    if info.dtype == "F16":
        return list(struct.unpack(f"<{len(raw) // 2}e", raw))
    return None


def _pearson(x: list[float], y: list[float]) -> float | None:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None  # constant norms (e.g. all ones at init) say nothing about lineage
    return sxy / math.sqrt(sxx * syy)
