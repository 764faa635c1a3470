"""Which models the streamed forward runs, known without torch: `validate --no-measure` checks it too.

Besides the model type, what a family's math reads from the config and may
refuse (a RoPE type, a partial rotary factor, an activation, bidirectional
attention) is read here, once, by the family's spec and by `check_config`.
"""
from __future__ import annotations

from recipekit.engine.core.added_modules import family_of
from recipekit.engine.core.architectures import layer_config, materialise
from recipekit.engine.errors import PlanError

# model_type (of the layer config: a multimodal Gemma 3's `text_config`) -> the module holding its math
FAMILIES = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
    "mixtral": "llama", "qwen2_moe": "llama", "qwen3_moe": "llama", "phi3": "llama", "olmo2": "llama",
    "gemma2": "gemma", "gemma3_text": "gemma",
}
SUPPORTED = tuple(FAMILIES)


def forward_type(config: dict) -> str:
    """The config's model type (an add_modules output's family: `recipekit_qwen2` -> `qwen2`); `PlanError`
    naming the supported ones when the streamed forward cannot run it."""
    model_type = family_of(str(layer_config(config).get("model_type")))
    if model_type not in FAMILIES:
        raise PlanError(f"the streamed forward supports model types {', '.join(SUPPORTED)}; "
                        f"this model is {model_type!r}")
    return model_type


LLAMA_ROPE_TYPES = ("default", "linear", "llama3")
PHI3_ROPE_TYPES = ("default", "longrope")  # what transformers' Phi-3 accepts
GEMMA_ROPE_TYPES = ("default", "linear")
SLIDING, FULL = "sliding_attention", "full_attention"
GEMMA_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}  # config name -> F.gelu's `approximate`


def check_config(config: dict) -> None:
    """Everything `StreamedForward` would refuse in config.json alone, without torch: `PlanError` naming it."""
    model_type = forward_type(config)
    c = materialise(layer_config(config))
    try:
        if FAMILIES[model_type] == "llama":
            llama_rope(c)
        else:
            gemma_activation(c)
            gemma_ropes(c)
    except (TypeError, ValueError) as e:
        raise PlanError(f"config.json: {e}") from None


def llama_rope(c: dict) -> dict:
    """The one RoPE of a Llama-family layer config (Phi-3: longrope, partial rotary embeddings)."""
    phi3 = c.get("model_type") == "phi3"
    return rope_parameters(c.get("rope_parameters") or c.get("rope_scaling"), c, partial=phi3,
                           kinds=PHI3_ROPE_TYPES if phi3 else LLAMA_ROPE_TYPES)


def gemma_ropes(c: dict) -> dict[str, dict]:
    """A Gemma layer config's RoPE by layer type. Gemma 2: one for both. Gemma 3: from `rope_parameters` nested
    by layer type, or from the older `rope_theta` (global), `rope_local_base_freq` (local) and `rope_scaling`
    (global layers only)."""
    given = c.get("rope_parameters")
    if c.get("model_type") == "gemma2":
        return dict.fromkeys((SLIDING, FULL), rope_parameters(given or c.get("rope_scaling"), c,
                                                               kinds=GEMMA_ROPE_TYPES))
    if isinstance(given, dict) and (FULL in given or SLIDING in given):
        full, local = given.get(FULL), given.get(SLIDING)
    else:
        full, local = given or c.get("rope_scaling"), None
    local_theta = number(c, "rope_local_base_freq", 10000.0, float)
    return {FULL: rope_parameters(full, c, kinds=GEMMA_ROPE_TYPES, theta=1_000_000.0),
            SLIDING: rope_parameters(local, {**c, "rope_theta": local_theta}, kinds=GEMMA_ROPE_TYPES)}


def gemma_activation(c: dict) -> str:
    """The `approximate` of a Gemma layer config's GELU; `PlanError` for another activation or for bidirectional
    attention (the forward runs causal language models)."""
    model_type = c.get("model_type")
    if c.get("use_bidirectional_attention"):
        raise PlanError(f"use_bidirectional_attention is not supported by the streamed forward for {model_type!r} "
                        "(it runs causal language models)")
    activation = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in GEMMA_ACTIVATIONS:
        raise PlanError(f"hidden_activation {activation!r} is not supported by the streamed forward for "
                        f"{model_type!r} (supported: {', '.join(GEMMA_ACTIVATIONS)})")
    return GEMMA_ACTIVATIONS[activation]


def number(config: dict, key: str, default: float, kind: type) -> float:
    """A number of the config (`default` when absent or null); text or a boolean where a number belongs is a
    ValueError naming the key."""
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ValueError(f"{key} should be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


# the keys each RoPE type needs besides rope_theta
_NEEDS = {"default": (), "linear": ("factor",),
          "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
          "longrope": ("short_factor", "long_factor", "original_max_position_embeddings")}


def rope_parameters(rope: dict | None, config: dict, *, kinds: tuple[str, ...], theta: float = 10000.0,
               partial: bool = False) -> dict:
    """The RoPE dict `rope` (from the config, or None) completed from `config`: the type (`rope_type` or the older
    `type`), `rope_theta` (else the config's, else `theta`), `partial_rotary_factor` (only where the family
    rotates part of each head, `partial`), and for longrope the context lengths. `PlanError` when the type is
    not in `kinds` or lacks a key it needs."""
    out = dict(rope or {})
    kind = out.get("rope_type", out.get("type", "default"))
    if kind in ("su", "yarn") and "longrope" in kinds:  # Phi-3's older names for longrope, as transformers reads them
        kind = "longrope"
    factor = out.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if kind not in kinds:
        raise PlanError(f"RoPE type {kind!r} is not supported by the streamed forward for model type "
                        f"{config.get('model_type')!r} (supported RoPE types: {', '.join(kinds)})")
    if not isinstance(factor, (int, float)) or (factor != 1.0 and not partial):
        raise PlanError(f"partial_rotary_factor {factor!r} is not supported by the streamed forward for model type "
                        f"{config.get('model_type')!r} (supported: 1.0, every dim rotates)")
    if kind == "longrope":  # transformers prefers the config's own pretraining length to the rope dict's
        out["original_max_position_embeddings"] = config.get("original_max_position_embeddings",
                                                             out.get("original_max_position_embeddings"))
        out.setdefault("max_position_embeddings", config.get("max_position_embeddings"))
    missing = [key for key in _NEEDS[kind] if out.get(key) is None]
    if missing:
        raise PlanError(f"config.json: RoPE type {kind!r} needs {', '.join(missing)}")
    out.update(rope_type=kind, rope_theta=float(out.get("rope_theta", config.get("rope_theta") or theta)),
               partial_rotary_factor=float(factor))
    return out
