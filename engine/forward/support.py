"""Which models the streamed forward runs, known without torch: `validate --no-measure` checks it too."""
from __future__ import annotations

from recipekit.engine.core.architectures import layer_config
from recipekit.engine.errors import PlanError

# model_type (of the layer config: a multimodal Gemma 3's `text_config`) -> the module holding its math
FAMILIES = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
    "mixtral": "llama", "qwen2_moe": "llama", "qwen3_moe": "llama", "phi3": "llama", "olmo2": "llama",
    "gemma2": "gemma", "gemma3_text": "gemma",
}
SUPPORTED = tuple(FAMILIES)


def forward_type(config: dict) -> str:
    """The config's model type; `PlanError` naming the supported ones when the streamed forward cannot run it."""
    model_type = str(layer_config(config).get("model_type"))
    if model_type not in FAMILIES:
        raise PlanError(f"the streamed forward supports model types {', '.join(SUPPORTED)}; "
                        f"this model is {model_type!r}")
    return model_type
