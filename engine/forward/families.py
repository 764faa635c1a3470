"""One door to every family's forward math: the spec a config describes, and the decoder layer that spec runs.

`StreamedForward` (and anything else that runs layers, such as training) asks
the spec the family-level questions (`embed_scale`, `final_norm`, `logits`,
`rope_tables`, `sliding`, `layer_tensors`) and runs each layer through
`decoder_layer`, so it never names a family itself.
"""
from __future__ import annotations

import torch

from recipekit.engine.forward import gemma, llama
from recipekit.engine.forward.blocks import Observe, Rope
from recipekit.engine.forward.support import FAMILIES, forward_type

Spec = llama.LlamaSpec | gemma.GemmaSpec
_SPECS = {"llama": llama.LlamaSpec, "gemma": gemma.GemmaSpec}
_LAYERS = {llama.LlamaSpec: llama.decoder_layer, gemma.GemmaSpec: gemma.decoder_layer}


def spec_of(config: dict) -> Spec:
    """The forward spec of a model config (its `text_config` for a multimodal one); `PlanError` naming the
    supported model types, or what the family does not support."""
    return _SPECS[FAMILIES[forward_type(config)]].from_config(config)


def decoder_layer(spec: Spec, layer: int, weights: dict[str, torch.Tensor], hidden: torch.Tensor,
                  mask: torch.Tensor, rope: Rope, observe: Observe) -> torch.Tensor:
    """Decoder layer `layer` of the spec's family: hidden [B, T, C] -> [B, T, C] (see `llama.decoder_layer`)."""
    return _LAYERS[type(spec)](spec, layer, weights, hidden, mask, rope, observe)
