"""The added modules in the streamed forward: the Llama family's `decoder_layer` calls these at the three points
where the torch classes apply them (docs/architecture.md, "Added modules"), with the layer's weights by their
names inside the layer and the same math (`math.py`)."""
from __future__ import annotations

import torch

from recipekit.engine.core.added_modules import AddedModules
from recipekit.engine.modeling.math import adaptive_scale, se_gate, token_mix


def attention_input(added: AddedModules | None, weights: dict[str, torch.Tensor], x: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """The attention's input after input_layernorm: scaled (adaptive_norm), then token-mixed; x [B, T, C],
    mask [B, 1, T, T] (a position is a token of its sequence when it may attend itself)."""
    if added is None:
        return x
    if added.norm_width is not None:
        x = _scaled(weights, "input_layernorm_scale", x)
    if added.kernel_size is not None:
        x, _ = token_mix(x, weights["token_mixing.weight"], torch.diagonal(mask[:, 0], dim1=1, dim2=2))
    return x


def mlp_input(added: AddedModules | None, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The MLP's input after post_attention_layernorm, scaled (adaptive_norm)."""
    if added is None or added.norm_width is None:
        return x
    return _scaled(weights, "post_attention_layernorm_scale", x)


def mlp_output(added: AddedModules | None, weights: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """The MLP's output before it joins the residual stream, gated (se_block)."""
    if added is None or added.se_width is None:
        return y
    return se_gate(y, weights["se_block.down.weight"], weights["se_block.up.weight"])


def _scaled(weights: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return adaptive_scale(x, weights[f"{name}.down.weight"], weights[f"{name}.up.weight"], weights[f"{name}.up.bias"])
