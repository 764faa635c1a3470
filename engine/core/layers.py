"""Decoder layers found from tensor names, and the one primitive of layer surgery.

A decoder layer tensor is named `<prefix>.layers.<i>.<rest>`. `compose_layers`
builds a model whose layer j is layer i of some model m: dropping, slicing
and frankenmerging are all lists of such picks.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple

from recipekit.engine.core.architectures import layer_config, materialise, rewrite_layers
from recipekit.engine.core.graph import LazyModel
from recipekit.engine.core.tags import FRANKENMERGE, PRUNED
from recipekit.engine.core.words import counted
from recipekit.engine.errors import Path_, PlanError, Problem

_LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*?\.)?layers)\.(?P<index>\d+)\.(?P<rest>.+)$")


class Pick(NamedTuple):
    """Output layer := layer `layer` of `model` (named `name`); `path` is the recipe field that asked for it."""

    name: str
    model: LazyModel
    layer: int
    path: Path_ = ()


@dataclass(frozen=True)
class Decoder:
    """The decoder stack of a model: `layers[i]` maps each `<rest>` to the full tensor name."""

    prefix: str
    layers: tuple[dict[str, str], ...]

    def layer_names(self) -> set[str]:
        return {name for layer in self.layers for name in layer.values()}


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """`model.layers.3.mlp.up_proj.weight` -> (`model.layers`, 3, `mlp.up_proj.weight`)."""
    match = _LAYER_NAME.match(name)
    return (match["prefix"], int(match["index"]), match["rest"]) if match else None


def decoder_of(model: LazyModel, model_name: str) -> Decoder:
    """Find the decoder stack; the prefix whose layer count matches `num_hidden_layers` wins, and of several
    (a vision encoder as deep as the language model) the one under `language_model`."""
    stacks: dict[str, dict[int, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    for name in model.tensors:
        parts = split_layer_name(name)
        if parts:
            stacks[parts[0]][parts[1]][parts[2]] = name
    expected = layer_config(model.config).get("num_hidden_layers")
    if not stacks:
        raise PlanError(f"model {model_name!r} has no decoder layers (tensors named <prefix>.layers.<i>.<rest>)")
    matching = [p for p, layers in stacks.items() if len(layers) == expected]
    if len(matching) > 1:  # a vision encoder as deep as the language model: the count cannot tell them apart
        matching = [p for p in matching if "language_model" in p.split(".")] or matching
    if len(stacks) == 1:
        prefix = next(iter(stacks))
    elif len(matching) == 1:
        prefix = matching[0]
    else:
        raise PlanError(f"model {model_name!r}: cannot tell the decoder stack among {sorted(stacks)} "
                        f"(config num_hidden_layers = {expected})")
    layers = stacks[prefix]
    count = len(layers)
    if sorted(layers) != list(range(count)):
        raise PlanError(f"model {model_name!r}: layer indices under {prefix!r} are not 0..{count - 1}")
    if expected != count:
        raise PlanError(f"model {model_name!r}: config.json says num_hidden_layers = {expected!r} "
                        f"but the weights hold {counted(count, 'layer')}")
    return Decoder(prefix, tuple(dict(layers[i]) for i in range(count)))


def incomplete(model: LazyModel, decoder: Decoder) -> list[str]:
    """What a model's weights lack that its own structure says they need: a tensor every other decoder layer has
    (attention and norms always; the MLP too unless the config is a Mixture of Experts, whose dense and sparse
    layers differ), the embeddings, the final norm, and `lm_head` unless the embeddings are tied."""
    config = layer_config(model.config)
    moe = any(k in config for k in ("num_experts", "num_local_experts", "n_routed_experts"))
    names = set().union(*map(set, decoder.layers))
    if moe:
        names = {n for n in names if not n.startswith(("mlp.", "block_sparse_moe."))}
    found = []
    for i, layer in enumerate(decoder.layers):
        missing = sorted(names - set(layer))
        if missing:
            found.append(f"layer {i} lacks {missing[0]}, which the other layers have"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    parent = decoder.prefix[: -len("layers")]
    for tensor, what in ((f"{parent}embed_tokens.weight", "the token embeddings"),
                         (f"{parent}norm.weight", "the final norm")):
        if tensor not in model.tensors:
            found.append(f"there is no {tensor} ({what})")
    tied = config.get("tie_word_embeddings", model.config.get("tie_word_embeddings"))
    if tied is False and not any(n == "lm_head.weight" or n.endswith(".lm_head.weight") for n in model.tensors):
        found.append("there is no lm_head.weight, and the config says the embeddings are not tied")
    return found


def head_tensors(model: LazyModel, decoder: Decoder) -> list[str]:
    """The tensors after the decoder stack: its final norm (`<parent>.norm.*`, beside `<parent>.layers`) and
    `lm_head.*` (absent when the embeddings are tied)."""
    parent = decoder.prefix[: -len("layers")]
    return sorted(name for name in model.tensors
                  if name.startswith(f"{parent}norm.") or name.startswith("lm_head.") or ".lm_head." in name)


def compose_layers(picks: list[Pick], base_name: str, base: LazyModel, note: str,
                   tags: tuple[str, ...] | None = None) -> LazyModel:
    """A model whose layer j is `picks[j]`; all other tensors and the config from `base`.

    Picked layers from other models must have the base's tensor names and shapes. The result is tagged `tags`,
    by default by what was done to the layers (`surgery_tags`).
    """
    base_decoder = decoder_of(base, base_name)
    decoders = {id(p.model): decoder_of(p.model, p.name) for p in picks}
    base_shapes: dict[str, set[tuple[int, ...]]] = defaultdict(set)
    for layer in base_decoder.layers:
        for rest, name in layer.items():
            base_shapes[rest].add(base.tensors[name].shape)

    everywhere = set.intersection(*(set(layer) for layer in base_decoder.layers))  # MoE layers may add more
    layer_names = base_decoder.layer_names()
    tensors = {name: node for name, node in base.tensors.items() if name not in layer_names}
    for j, (name, model, i, path) in enumerate(picks):
        lacking = sorted(everywhere - set(decoders[id(model)].layers[i]))
        if model is not base and lacking:  # a layer of another family (a Llama layer has no Gemma 3 q_norm)
            more = f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else ""
            raise PlanError(Problem(f"layer {i} of model {name!r} does not fit the base {base_name!r}: it has no "
                                    f"{lacking[0]}{more}, which every layer of the base has", path=path))
        for rest, full in decoders[id(model)].layers[i].items():
            node = model.tensors[full]
            if model is not base and node.shape not in base_shapes.get(rest, ()):
                raise PlanError(Problem(
                    f"layer {i} of model {name!r} does not fit the base {base_name!r}: tensor {rest!r} has shape "
                    f"{list(node.shape)}, the base has {sorted(list(s) for s in base_shapes[rest]) or 'no such tensor'}",
                    path=path))
            tensors[f"{base_decoder.prefix}.{j}.{rest}"] = node

    config = dict(base.config)
    source_configs = {id(p.model): materialise(layer_config(p.model.config)) for p in picks}
    try:
        new_layers = rewrite_layers(materialise(layer_config(base.config)),
                                    [(source_configs[id(p.model)], p.layer) for p in picks])
    except ValueError as e:
        raise PlanError(str(e)) from None
    if layer_config(config) is config:
        config = new_layers
    else:
        config["text_config"] = new_layers
    composed = base.evolve(
        config=config,
        tensors=tensors,
        layer_origins=tuple(p.model.layer_origins[p.layer] for p in picks),
        moe=None,  # its layer indices no longer hold
    )
    if tags is None:
        tags = surgery_tags(picks, base, len(base_decoder.layers))
    return composed.absorb(*(p.model for p in picks), note=note, tags=tags)


def surgery_tags(picks: list[Pick], base: LazyModel, count: int) -> tuple[str, ...]:
    """`pruned` when the picks are some of the base's `count` layers in their order, none when they are all of
    them, `frankenmerge` otherwise (a layer repeated or moved, or layers of another model or step)."""
    indices = [p.layer for p in picks]
    if any(p.model is not base for p in picks) or indices != sorted(set(indices)):
        return (FRANKENMERGE,)
    return (PRUNED,) if len(indices) < count else ()


def out_of_range(spans: list[tuple[Path_, tuple[int, int]]], count: int, model_name: str) -> list[Problem]:
    """The one layer-range check: a problem for each span [start, end) that reaches past the model's `count`
    layers, at the path of the field that asked for it."""
    problems = []
    for path, (start, end) in spans:
        if end > count:
            what, limit = ((f"layer {start}", f"0..{count - 1}") if end == start + 1
                           else (f"range [{start}, {end}]", f"end may be at most {count}"))
            problems.append(Problem(f"{what} is out of range: {model_name!r} has {counted(count, 'layer')} ({limit})",
                                    path=path))
    return problems
