"""The modules `add_modules` adds to every decoder layer, as data: their names, the families that have classes
for them, the tensors each adds (name inside the layer, shape, identity initialisation) and how config.json
records them. The op, the modelling classes (`engine/modeling/`) and the streamed forward read them from here,
so the three agree on every name and shape (docs/architecture.md, "Added modules").
"""
from __future__ import annotations

from dataclasses import dataclass

MODULES = ("adaptive_norm", "token_mixing", "se_block")  # the order they apply in a layer and are recorded in
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}  # model_type -> class stem
PREFIX = "recipekit_"  # model_type of an output: recipekit_llama, ...
CONFIG_KEY = "added_modules"
NORMS = ("input_layernorm", "post_attention_layernorm")  # the norms adaptive_norm scales (by `<norm>_scale`)

# how a new tensor starts: seeded normal values (std: the config's initializer_range), zeros, or ones
NORMAL, ZEROS, ONES = "normal", "zeros", "ones"


@dataclass(frozen=True)
class AddedModules:
    """Which modules a layer has and their shapes: `norm_width` (adaptive_norm's bottleneck r), `kernel_size`
    (token_mixing), `se_width` (se_block's bottleneck r); None for a module the layer does not have."""

    norm_width: int | None = None
    kernel_size: int | None = None
    se_width: int | None = None

    def names(self) -> list[str]:
        present = (self.norm_width, self.kernel_size, self.se_width)
        return [name for name, value in zip(MODULES, present) if value is not None]

    def config(self) -> dict:
        """The `added_modules` entry of config.json."""
        entries = {"adaptive_norm": {"width": self.norm_width}, "token_mixing": {"kernel_size": self.kernel_size},
                   "se_block": {"width": self.se_width}}
        return {name: entries[name] for name in self.names()}

    @classmethod
    def from_config(cls, config: dict) -> AddedModules | None:
        """The modules a config.json records, or None when it records none; ValueError when the entry is
        malformed (an unknown module, a missing or non-positive size)."""
        entry = config.get(CONFIG_KEY)
        if entry is None:
            return None
        if not isinstance(entry, dict) or not entry or set(entry) - set(MODULES):
            raise ValueError(f"{CONFIG_KEY} should map some of {', '.join(MODULES)} to their sizes, got {entry!r}")

        def size(module: str, key: str) -> int | None:
            if module not in entry:
                return None
            value = entry[module].get(key) if isinstance(entry[module], dict) else None
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{CONFIG_KEY}.{module}.{key} should be a positive integer, got {value!r}")
            return value

        return cls(size("adaptive_norm", "width"), size("token_mixing", "kernel_size"), size("se_block", "width"))

    def tensors(self, hidden: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every tensor one decoder layer gains, by its name inside the layer: (shape, initialisation)."""
        out: dict[str, tuple[tuple[int, ...], str]] = {}
        if self.norm_width is not None:
            for norm in NORMS:
                out[f"{norm}_scale.down.weight"] = ((self.norm_width, hidden), NORMAL)
                out[f"{norm}_scale.up.weight"] = ((hidden, self.norm_width), ZEROS)
                out[f"{norm}_scale.up.bias"] = ((hidden,), ONES)
        if self.kernel_size is not None:
            out["token_mixing.weight"] = ((hidden, self.kernel_size), ZEROS)
        if self.se_width is not None:
            out["se_block.down.weight"] = ((self.se_width, hidden), NORMAL)
            out["se_block.up.weight"] = ((hidden, self.se_width), ZEROS)
        return out


def family_of(model_type: str) -> str:
    """The transformers family a model type computes as: `recipekit_qwen2` -> `qwen2`; others unchanged."""
    return model_type.removeprefix(PREFIX) if model_type.removeprefix(PREFIX) in FAMILIES else model_type


def output_model_type(family: str) -> str:
    return PREFIX + family


def output_architecture(family: str) -> str:
    return f"Recipekit{FAMILIES[family]}ForCausalLM"


def bottleneck(hidden: int, reduction: int) -> int:
    """r = max(1, hidden // reduction)."""
    return max(1, hidden // reduction)
