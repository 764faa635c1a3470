"""expand_layers: identity copies of layers; the grown model's logits equal the original's (bitwise for Llama in
fp32, to 1e-6 for every family), per-layer config lists follow, and bad requests are located errors."""
from __future__ import annotations

import pytest
import torch

from recipekit.engine.cli import main
from tests.bad_inputs.checks import assert_no_output, cli
from tests.tiny import FAMILIES, load_causal_lm, make_model, read_config, tensors_of, write_recipe

SETTINGS = {"gemma2": {"sliding_window": 4}, "gemma3_text": {"sliding_window": 4, "sliding_window_pattern": 2},
            "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2},
            "mixtral": {"num_local_experts": 3, "num_experts_per_tok": 2},
            "qwen2_moe": {"num_experts": 3, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                          "shared_expert_intermediate_size": 24},
            "qwen3_moe": {"num_experts": 3, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
            "phi3": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}}


def _expand(tmp_path, family: str, rule: str) -> tuple:
    base = make_model(tmp_path / family, family=family, layers=4, seed=9, **SETTINGS.get(family, {}))
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{base: {family}}}
        steps:
          - op: expand_layers
            model: base
            {rule}
        """)
    out = tmp_path / "out"
    assert main(["run", str(recipe), "-o", str(out), "-q"]) == 0
    return base, out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_grown_model_computes_what_the_original_did(tmp_path, family):
    base, out = _expand(tmp_path, family, "after: [0, 2]")
    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a padded row
    with torch.no_grad():
        before = load_causal_lm(base)(ids, attention_mask=mask).logits
        after = load_causal_lm(out)(ids, attention_mask=mask).logits
    if family == "llama":
        assert torch.equal(before, after)
    else:
        assert torch.allclose(before, after, rtol=0, atol=1e-6), (before - after).abs().max()

    config, source = read_config(out), read_config(base)
    assert config["num_hidden_layers"] == 6
    if "layer_types" in source or family in ("qwen2", "gemma2", "gemma3_text"):
        types = source.get("layer_types")
        if types:
            assert config["layer_types"] == [types[0], types[0], types[1], types[2], types[2], types[3]]

    got, original = tensors_of(out), tensors_of(base)
    for j, i in ((0, 0), (1, 0), (2, 1), (3, 2), (4, 2), (5, 3)):
        for name, value in original.items():
            if f"layers.{i}." not in name:
                continue
            rest = name.split(f"layers.{i}.", 1)[1]
            new = got[name.replace(f"layers.{i}.", f"layers.{j}.")]
            zero = j in (1, 4) and any(p in rest for p in ("o_proj", "down_proj", ".w2."))
            assert torch.equal(new, torch.zeros_like(value) if zero else value), (j, rest)


def test_every_k_inserts_after_every_kth_layer(tmp_path, capsys):
    base, out = _expand(tmp_path, "llama", "every: 2")
    got, original = tensors_of(out), tensors_of(base)
    assert read_config(out)["num_hidden_layers"] == 6
    assert torch.equal(got["model.layers.2.self_attn.q_proj.weight"], original["model.layers.1.self_attn.q_proj.weight"])
    assert not got["model.layers.5.mlp.down_proj.weight"].any()
    card = (out / "README.md").read_text()
    assert "inserted 2 identity layers into `base` (4 -> 6 layers): output layers 2 (of 1), 5 (of 3)" in card
    assert "- expanded" in card


@pytest.mark.parametrize("rule, where, message", [
    ("after: [1]\n            every: 2", "steps[0]", "give exactly one of after: [layer, ...] or every: k"),
    ("", "steps[0]", "give exactly one of after"),
    ("after: [-1]", "steps[0]", "layer indices count from 0"),
    ("after: [1, 1]", "steps[0]", "each layer may be named once in after"),
    ("after: [4]", "steps[0].after", "layer 4 is out of range: 'base' has 4 layers (0..3)"),
    ("every: 5", "steps[0].every", "every: 5 inserts nothing: 'base' has 4 layers"),
    ("every: 0", "steps[0].every", "greater than or equal to 1"),
    ("after: []", "steps[0].after", "at least 1 item"),
    ("after: [true]", "steps[0].after[0]", "valid integer"),
])
def test_bad_requests_are_located_and_write_nothing(tmp_path, capsys, rule, where, message):
    make_model(tmp_path / "m", layers=4)
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{base: m}}
        steps:
          - op: expand_layers
            model: base
            {rule}
        """)
    result = cli(capsys, "run", recipe, "-o", tmp_path / "out")
    assert result.rc == 2 and len(result.err.splitlines()) == 1, result.err
    assert result.err.startswith(f"{recipe}:") and f": {where}: " in result.err and message in result.err, result.err
    assert_no_output(tmp_path / "out")
