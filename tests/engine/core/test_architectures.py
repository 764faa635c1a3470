"""Per-layer config rules agree with transformers' own config classes."""
from __future__ import annotations

import pytest
import transformers

from recipekit.engine.core.architectures import materialise, rewrite_layers

CASES = [
    ("Qwen2Config", dict(use_sliding_window=True, sliding_window=64, max_window_layers=5)),
    ("Qwen2Config", dict(use_sliding_window=False, max_window_layers=2)),
    ("Qwen3Config", dict(use_sliding_window=True, sliding_window=64, max_window_layers=3)),
    ("Qwen2MoeConfig", dict(use_sliding_window=True, sliding_window=64, max_window_layers=5)),
    ("Gemma2Config", dict()),
    ("Gemma3TextConfig", dict(sliding_window_pattern=4)),
    ("Gemma3TextConfig", dict()),
    ("Cohere2Config", dict()),
    ("GptOssConfig", dict()),
    ("SmolLM3Config", dict(use_sliding_window=True, sliding_window=64, no_rope_layer_interval=3)),
]


@pytest.mark.parametrize("config_class, settings", CASES)
@pytest.mark.parametrize("layers", [1, 7, 12])
def test_materialised_lists_equal_transformers(config_class, settings, layers):
    config = getattr(transformers, config_class)(num_hidden_layers=layers, **settings)
    raw = {"model_type": config.model_type, "num_hidden_layers": layers, **settings}
    ours = materialise(raw)
    assert ours["layer_types"] == config.layer_types
    if hasattr(config, "no_rope_layers"):
        assert ours["no_rope_layers"] == config.no_rope_layers


def test_materialise_keeps_explicit_lists_and_does_not_mutate():
    raw = {"model_type": "qwen2", "num_hidden_layers": 2, "layer_types": ["full_attention", "sliding_attention"]}
    assert materialise(raw)["layer_types"] == ["full_attention", "sliding_attention"]
    llama = {"model_type": "llama", "num_hidden_layers": 3}
    assert materialise(llama) == llama and "layer_types" not in llama


def test_rewrite_takes_each_entry_from_its_source_model():
    a = {"num_hidden_layers": 3, "layer_types": ["a0", "a1", "a2"], "no_rope_layers": [1, 0, 1],
         "mlp_only_layers": [1]}
    b = {"num_hidden_layers": 2, "layer_types": ["b0", "b1"], "no_rope_layers": [0, 0], "mlp_only_layers": [0]}
    out = rewrite_layers(a, [(a, 2), (b, 0), (a, 1), (b, 1)])
    assert out["num_hidden_layers"] == 4
    assert out["layer_types"] == ["a2", "b0", "a1", "b1"]
    assert out["no_rope_layers"] == [1, 0, 0, 0]
    assert out["mlp_only_layers"] == [1, 2]
    assert a["num_hidden_layers"] == 3  # inputs untouched


def test_rewrite_refuses_a_source_without_the_list():
    a = {"num_hidden_layers": 1, "layer_types": ["full_attention"]}
    with pytest.raises(ValueError, match="layer_types"):
        rewrite_layers(a, [(a, 0), ({"num_hidden_layers": 1}, 0)])
