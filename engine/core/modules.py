"""Weight matrices of a decoder layer by module name, in every layout a family stores them.

Users name modules as the Llama family does (`self_attn.v_proj`, `mlp.gate_proj`). Some families fuse several
projections into one matrix (Phi-3: `self_attn.qkv_proj` holds q, k and v one after the other along the output
rows, `mlp.gate_up_proj` the gate then up), so a module is a tensor and, in a fused layout, the rows that are its
own. Reads headers only: no torch.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from recipekit.engine.core.architectures import layer_config
from recipekit.engine.core.graph import LazyModel
from recipekit.engine.core.layers import decoder_of
from recipekit.engine.errors import Path_, PlanError, Problem


@dataclass(frozen=True)
class ModuleWeight:
    """The weight of one module in one layer: rows [rows[0], rows[1]) of `tensor` (all of it when `rows` is None),
    and the shape of that weight."""

    tensor: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None


def _phi3(config: dict) -> dict[str, list[tuple[str, int]]]:
    """Phi-3 (and Phi-4, which is stored as Phi-3): the row sizes transformers splits its fused matrices by."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv = kv_heads * head_dim
    return {"self_attn.qkv_proj": [("self_attn.q_proj", heads * head_dim), ("self_attn.k_proj", kv),
                                   ("self_attn.v_proj", kv)],
            "mlp.gate_up_proj": [("mlp.gate_proj", config["intermediate_size"]),
                                 ("mlp.up_proj", config["intermediate_size"])]}


# model_type -> (config -> fused module -> its parts in row order, each with its number of rows)
FUSED: dict[str, Callable[[dict], dict[str, list[tuple[str, int]]]]] = {"phi3": _phi3}


def layer_modules(model: LazyModel, layer: Mapping[str, str]) -> dict[str, ModuleWeight]:
    """Every module of one decoder layer (`layer` maps names inside the layer to full tensor names) that has a
    weight: `<module>.weight` itself, and the parts of a fused matrix the family's table names."""
    found = {rest[: -len(".weight")]: ModuleWeight(full, tuple(model.tensors[full].shape))
             for rest, full in layer.items() if rest.endswith(".weight")}
    config = layer_config(model.config)
    fused = FUSED.get(str(config.get("model_type")))
    for module, parts in (fused(config) if fused else {}).items():
        whole = found.get(module)
        if whole is None:
            continue
        if sum(rows for _, rows in parts) != whole.shape[0]:
            sizes = " + ".join(f"{rows} ({part.rsplit('.', 1)[-1]})" for part, rows in parts)
            raise PlanError(f"{whole.tensor} has {whole.shape[0]} rows, but its config makes {module} {sizes}: "
                            "the config does not describe these weights")
        start = 0
        for part, rows in parts:
            found.setdefault(part, ModuleWeight(whole.tensor, (rows, *whole.shape[1:]), (start, start + rows)))
            start += rows
    return found


def module_weights(model: LazyModel, name: str, module: str, path: Path_ = ()) -> list[ModuleWeight]:
    """The weight of `module` in every decoder layer of model `name`, in layer order. A module some layer lacks is
    a `PlanError` at `path` naming the modules the layers have, with the closest one."""
    layers = [layer_modules(model, layer) for layer in decoder_of(model, name).layers]
    lacking = [i for i, modules in enumerate(layers) if module not in modules]
    if lacking:
        common = [m for m in layers[0] if all(m in modules for modules in layers)]
        close = difflib.get_close_matches(module, common, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        where = "its layers" if len(lacking) == len(layers) else f"layer {lacking[0]}"
        matrices = sorted(m for m in common if len(layers[0][m].shape) == 2)
        raise PlanError(Problem(f"model {name!r} has no module {module!r} in {where}{hint}; its weight matrices: "
                                f"{', '.join(matrices) or 'none'}", path=path))
    return [modules[module] for modules in layers]
