"""The torch side of the added modules: one small `nn.Module` per module (math from `math.py`) and the two
mixins that put them into a family's transformers classes (`families.py`).

`AddedModulesLayer` goes before a family's decoder layer class: it builds the family's layer, then the modules
its config's `added_modules` names, and lays the forward out as docs/architecture.md ("Added modules") draws
it. `AddedModulesCausalLM` goes before a family's `...ForCausalLM`: it rebuilds the decoder's layers as those,
and hands the 2-D padding mask on to them (token mixing zeroes padded positions). The modules start at identity
in a model made from a config too: the random first layers are `nn.Linear`s that transformers initialises, the
rest start at zero (`StartAtZero`, and the token mixing weight).
"""
from __future__ import annotations

import torch
from torch import nn

from recipekit.engine.core.added_modules import AddedModules
from recipekit.engine.modeling.math import adaptive_scale, se_gate, token_mix

_STATES = "recipekit_token_mixing"  # the attribute of a transformers cache that keeps token mixing's inputs


class StartAtZero(nn.Module):
    """The weight [outputs, inputs] (and bias) of a projection that starts at zero (the bias at `bias`). Not an
    `nn.Linear`, so transformers' initialisation leaves it be and a model made from a config starts at identity
    too; the math reads `weight` and `bias` directly."""

    def __init__(self, inputs: int, outputs: int, bias: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(outputs, inputs))
        self.bias = nn.Parameter(torch.full((outputs,), bias)) if bias is not None else None


class NormScale(nn.Module):
    """adaptive_norm: the per-token, per-channel scale of one RMSNorm's output."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.down = nn.Linear(hidden, width, bias=False)
        self.up = StartAtZero(width, hidden, bias=1.0)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return adaptive_scale(y, self.down.weight, self.up.weight, self.up.bias)


class TokenMixing(nn.Module):
    """token_mixing: a residual causal depthwise convolution over the sequence, weight [hidden, kernel_size].

    With a transformers cache, the last kernel_size - 1 inputs of this layer are kept on the cache object with the
    number of tokens they follow, so generation one token at a time computes what a full forward does; an empty
    cache for this layer starts over, and a cache that holds other tokens than those (cut back by assisted
    decoding, or another model's) is refused rather than mixed wrongly. Beam search reorders them with the cache
    (`reorder_saved_inputs`).
    """

    def __init__(self, hidden: int, kernel_size: int, layer_idx: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden, kernel_size))
        self.layer_idx = layer_idx

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None, cache: object | None) -> torch.Tensor:
        past, states, seen = None, None, 0
        if cache is not None:
            states = cache.__dict__.setdefault(_STATES, {})  # layer -> (tokens seen, their last k-1 inputs)
            seen = cache.get_seq_length(self.layer_idx)  # before this layer's attention adds these tokens
            if seen > 0:
                if states.get(self.layer_idx, (None,))[0] != seen:
                    raise ValueError("this cache holds other tokens than token mixing saw: it was filled by another "
                                     "model or cut back (assisted generation); token_mixing supports generation "
                                     "that only appends or reorders (greedy, sampling, beam search), not assisted "
                                     "decoding")
                past = states[self.layer_idx][1]
        out, last = token_mix(x, self.weight, valid, past)
        if states is not None:
            states[self.layer_idx] = (seen + x.shape[1], last.detach())
        return out


def reorder_saved_inputs(cache: object, beam_idx: torch.Tensor) -> None:
    """Give each row of token mixing's saved inputs the beam it continues, as beam search does to the cache."""
    states = cache.__dict__.get(_STATES, {})
    for layer, (seen, last) in states.items():
        states[layer] = (seen, last.index_select(0, beam_idx.to(last.device)))


class SEBlock(nn.Module):
    """se_block: squeeze-and-excitation of the MLP output's channels, per token."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.down = nn.Linear(hidden, width, bias=False)
        self.up = StartAtZero(width, hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return se_gate(y, self.down.weight, self.up.weight)


def added_modules(config) -> AddedModules:
    """The modules a transformers config names (none when it names none)."""
    return AddedModules.from_config({"added_modules": getattr(config, "added_modules", None)}) or AddedModules()


class AddedModulesLayer:
    """Mixin for a family's decoder layer: the layer plus the modules the config names, in their places."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        added, hidden = added_modules(config), config.hidden_size
        norm = added.norm_width
        self.input_layernorm_scale = NormScale(hidden, norm) if norm else None
        self.post_attention_layernorm_scale = NormScale(hidden, norm) if norm else None
        self.token_mixing = TokenMixing(hidden, added.kernel_size, layer_idx) if added.kernel_size else None
        self.se_block = SEBlock(hidden, added.se_width) if added.se_width else None

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """hidden_states [B, T, C]; `token_mask` the 2-D padding mask of the whole sequence so far, [B, past + T];
        everything else goes to the family's attention as its own layer would pass it."""
        residual = hidden_states
        x = self.input_layernorm(hidden_states)
        if self.input_layernorm_scale is not None:
            x = self.input_layernorm_scale(x)
        if self.token_mixing is not None:
            valid = token_mask[:, token_mask.shape[1] - x.shape[1]:] if token_mask is not None else None
            x = self.token_mixing(x, valid, kwargs.get("cache", kwargs.get("past_key_values")))
        x, _ = self.self_attn(hidden_states=x, attention_mask=attention_mask, **kwargs)
        hidden_states = residual + x
        x = self.post_attention_layernorm(hidden_states)
        if self.post_attention_layernorm_scale is not None:
            x = self.post_attention_layernorm_scale(x)
        x = self.mlp(x)
        if self.se_block is not None:
            x = self.se_block(x)
        return hidden_states + x


class AddedModulesCausalLM:
    """Mixin for a family's causal LM; subclasses set `layer_class` (their `AddedModulesLayer`)."""

    layer_class: type[nn.Module]

    def __init__(self, config):
        super().__init__(config)
        # the family's model builds its own layer class; these replace them (free under from_pretrained, which
        # builds on the meta device)
        self.model.layers = nn.ModuleList(self.layer_class(config, i) for i in range(config.num_hidden_layers))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        token_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, token_mask=token_mask, **kwargs)

    def _reorder_cache(self, cache, beam_idx: torch.Tensor):
        """What beam search calls between steps, where a model defines it, instead of `cache.reorder_cache`."""
        cache.reorder_cache(beam_idx)
        reorder_saved_inputs(cache, beam_idx)
        return cache
