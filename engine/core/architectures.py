"""What must be written down per model family: the per-layer config keys.

Everything else about layers is found from tensor names. A per-layer list is
re-indexed with the same picks as the layers. Where a family derives such a
list from other keys and the config leaves it out, it is materialised from the
source config first: the rule applied to the new layer count would give other
answers (a Qwen2 `max_window_layers` threshold, a Gemma every-sixth-layer
pattern).
"""
from __future__ import annotations

from collections.abc import Callable

from recipekit.engine.core.added_modules import family_of
from recipekit.engine.core.words import counted

# Keys holding one value per layer, re-indexed with the layer picks.
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")
# Keys holding a list of layer indices, remapped through the picks.
INDEX_LISTS = ("mlp_only_layers",)


def _pattern(default: int) -> Callable[[dict, int], dict]:
    def rule(config: dict, n: int) -> dict:
        every = config.get("sliding_window_pattern", default)
        return {"layer_types": ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]}
    return rule


def _qwen2(config: dict, n: int) -> dict:
    sliding = config.get("sliding_window", 4096) if config.get("use_sliding_window", False) else None
    start = config.get("max_window_layers", 28)
    return {"layer_types": ["sliding_attention" if sliding is not None and i >= start else "full_attention"
                            for i in range(n)]}


def _qwen2_moe(config: dict, n: int) -> dict:
    on, limit = config.get("use_sliding_window", False), config.get("max_window_layers", 28)
    return {"layer_types": ["sliding_attention" if (i + 1) % 2 and i < limit and on else "full_attention"
                            for i in range(n)]}


def _smollm3(config: dict, n: int) -> dict:
    interval = config.get("no_rope_layer_interval", 4)
    no_rope = config.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    sliding = config.get("use_sliding_window", False) and config.get("sliding_window") is not None
    types = config.get("layer_types") or [
        "sliding_attention" if sliding and not no_rope[i] else "full_attention" for i in range(n)]
    return {"no_rope_layers": no_rope, "layer_types": types}


# model_type -> rule deriving the per-layer lists transformers would compute.
_DERIVED: dict[str, Callable[[dict, int], dict]] = {
    "qwen2": _qwen2,
    "qwen3": _qwen2,
    "qwen2_moe": _qwen2_moe,
    "gemma2": _pattern(2),
    "gpt_oss": _pattern(2),
    "gemma3": _pattern(6),
    "gemma3_text": _pattern(6),
    "cohere2": _pattern(4),
    "smollm3": _smollm3,
}


# keys the rules above read, and what each must be
_RULE_KEYS = {"sliding_window_pattern": "a positive integer", "max_window_layers": "an integer >= 0",
              "no_rope_layer_interval": "a positive integer", "sliding_window": "an integer or null",
              "use_sliding_window": "true or false"}


def config_problems(config: dict) -> list[str]:
    """What in a layer config the per-layer rules cannot use: a per-layer list that is not one entry per layer,
    an index list that is not layer indices, a rule's key of the wrong kind. Checked when a model is opened, so
    that no rule divides by zero or compares text with numbers later."""
    n = config.get("num_hidden_layers")
    problems = []
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return [f"num_hidden_layers should be a positive integer, got {n!r}"]
    for key in PER_LAYER_LISTS:
        value = config.get(key)
        if value is not None and (not isinstance(value, list) or len(value) != n):
            got = counted(len(value), "entry", "entries") if isinstance(value, list) else repr(value)
            problems.append(f"{key} should be a list with one entry per layer ({n}), got {got}")
    for key in INDEX_LISTS:
        value = config.get(key)
        if value is not None and not (isinstance(value, list) and all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in value)):
            problems.append(f"{key} should be a list of layer indices 0..{n - 1}, got {value!r}")
    for key, kind in _RULE_KEYS.items():
        if key not in config:
            continue
        value = config[key]
        integer = isinstance(value, int) and not isinstance(value, bool)
        fits = {"a positive integer": integer and value > 0, "an integer >= 0": integer and value >= 0,
                "an integer or null": value is None or integer, "true or false": isinstance(value, bool)}[kind]
        if not fits:
            problems.append(f"{key} should be {kind}, got {value!r}")
    return problems


def layer_config(config: dict) -> dict:
    """The (sub)config that holds `num_hidden_layers`: the model's, or its `text_config`."""
    if "num_hidden_layers" not in config and isinstance(config.get("text_config"), dict):
        return config["text_config"]
    return config


def materialise(config: dict) -> dict:
    """A copy of a layer config with every derivable per-layer list spelt out."""
    out = dict(config)
    rule = _DERIVED.get(family_of(str(config.get("model_type", ""))))  # recipekit_qwen2 derives as qwen2
    n = config.get("num_hidden_layers")
    if rule is not None and isinstance(n, int):
        for key, value in rule(config, n).items():
            out.setdefault(key, value)
    return out


def rewrite_layers(base: dict, picks: list[tuple[dict, int]]) -> dict:
    """The layer config of a model whose layer j is layer `picks[j][1]` of a model with config `picks[j][0]`.

    `base` gives every other key. Configs must already be materialised.
    Raises `ValueError` naming the key when a source lacks a list the base has.
    """
    out = dict(base)
    out["num_hidden_layers"] = len(picks)
    for key in PER_LAYER_LISTS:
        if isinstance(base.get(key), list):
            values = []
            for config, i in picks:
                source = config.get(key)
                if not isinstance(source, list) or i >= len(source):
                    raise ValueError(f"the base config has a per-layer {key!r} list but a sliced model has none")
                values.append(source[i])
            out[key] = values
    for key in INDEX_LISTS:
        if isinstance(base.get(key), list):
            out[key] = [j for j, (config, i) in enumerate(picks) if i in (config.get(key) or [])]
    return out
