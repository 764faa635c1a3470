"""drop_layers and slice_layers, checked against transformers' own models."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from recipekit.engine import PlanError, load_recipe
from tests.tiny import DEMO, assert_layers_from, load_causal_lm, make_model, read_config, write_recipe

TOKENS = torch.tensor([[5, 17, 42, 3, 88, 9, 61, 23]])


def logits_without_layers(model_dir, dropped: set[int]) -> torch.Tensor:
    """Reference: the original model with decoder layers deleted in memory."""
    model = load_causal_lm(model_dir)
    kept = [layer for i, layer in enumerate(model.model.layers) if i not in dropped]
    model.model.layers = torch.nn.ModuleList(kept)
    model.config.num_hidden_layers = len(kept)
    for j, layer in enumerate(kept):
        layer.self_attn.layer_idx = j
    with torch.no_grad():
        return model(TOKENS).logits


def logits_of(model_dir) -> torch.Tensor:
    with torch.no_grad():
        return load_causal_lm(model_dir)(TOKENS).logits


@pytest.mark.parametrize("fixture", ["llama", "llama_sharded"])
def test_drop_layers_logits_match_in_memory_removal(fixture, request, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{base: {model_dir}}}
        steps:
          - op: drop_layers
            model: base
            layers: [1, [3, 5]]
        """)
    out = load_recipe(recipe).run(tmp_path / "out").out
    assert read_config(out)["num_hidden_layers"] == 3
    torch.testing.assert_close(logits_of(out), logits_without_layers(model_dir, {1, 3, 4}), atol=1e-6, rtol=0)
    assert_layers_from(out, [(model_dir, 0), (model_dir, 2), (model_dir, 5)], model_dir)


def test_tied_embeddings_stay_tied(llama_sharded, tmp_path):
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{base: {llama_sharded}}}
        steps: [{{op: drop_layers, model: base, layers: [0]}}]
        """)
    out = load_recipe(recipe).run(tmp_path / "out").out
    config = read_config(out)
    assert config["tie_word_embeddings"] is True
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    model = load_causal_lm(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_frankenmerge_is_bitwise_and_loads(llama, llama_sharded, tmp_path):
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{a: {llama}, b: {llama_sharded}}}
        steps:
          - op: slice_layers
            slices:
              - {{model: a, range: [0, 4]}}
              - {{model: b, range: [2, 6]}}
              - {{model: a, range: [3, 4]}}
        output: {{shard_size: 40KB}}
        """)
    out = load_recipe(recipe).run(tmp_path / "out").out
    origins = [(llama, i) for i in range(4)] + [(llama_sharded, i) for i in range(2, 6)] + [(llama, 3)]
    assert_layers_from(out, origins, llama)
    assert read_config(out)["num_hidden_layers"] == 9
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert logits_of(out).shape == (1, TOKENS.shape[1], 96)


def slice_recipe(folder, a, b, slices: str, **fields: str):
    """A recipe with models `a` and `b` and one slice_layers step: `slices` (YAML) and other fields."""
    lines = "".join(f"\n    {key}: {value}" for key, value in fields.items())
    return write_recipe(folder, f"recipe: 1\nmodels: {{a: {a}, b: {b}}}\nsteps:\n  - op: slice_layers\n"
                                f"    slices: {slices}{lines}\n")


def test_slice_base_gives_non_layer_tensors(llama, llama_sharded, tmp_path):
    recipe = slice_recipe(tmp_path, llama, llama_sharded, "[{model: a, range: [0, 2]}]", base="b")
    out = load_recipe(recipe).run(tmp_path / "out").out
    assert_layers_from(out, [(llama, 0), (llama, 1)], llama_sharded)
    assert read_config(out)["tie_word_embeddings"] is True


def test_slice_head_gives_final_norm_and_lm_head(llama, tmp_path):
    other = make_model(tmp_path / "other", layers=6, seed=7)
    recipe = slice_recipe(tmp_path, llama, other, "[{model: a, range: [0, 3]}, {model: b, range: [3, 6]}]",
                          head="b")
    out = load_recipe(recipe).run(tmp_path / "out").out
    assert_layers_from(out, [(llama, 0), (llama, 1), (llama, 2), (other, 3), (other, 4), (other, 5)], llama,
                       head=other)
    reference = load_causal_lm(llama)
    donor = load_causal_lm(other)
    reference.model.layers = torch.nn.ModuleList([*reference.model.layers[:3], *donor.model.layers[3:]])
    reference.model.norm, reference.lm_head = donor.model.norm, donor.lm_head
    with torch.no_grad():
        assert torch.allclose(logits_of(out), reference(TOKENS).logits, atol=1e-6)


def test_a_head_with_tied_embeddings_gives_them_as_lm_head(llama, llama_sharded, tmp_path):
    recipe = slice_recipe(tmp_path, llama, llama_sharded, "[{model: a, range: [0, 2]}]", head="b")
    out = load_recipe(recipe).run(tmp_path / "out").out
    assert_layers_from(out, [(llama, 0), (llama, 1)], llama, head=llama_sharded)
    donor = load_causal_lm(llama_sharded)
    assert torch.equal(load_causal_lm(out).lm_head.weight, donor.model.embed_tokens.weight)


def test_a_base_with_tied_embeddings_cannot_take_another_lm_head(llama, llama_sharded, tmp_path):
    recipe = slice_recipe(tmp_path, llama, llama_sharded, "[{model: b, range: [0, 2]}]", head="a")
    with pytest.raises(PlanError, match="ties lm_head to its embeddings") as e:
        load_recipe(recipe).run(tmp_path / "out")
    assert e.value.problems[0].path == ("steps", 0, "head")
    assert not (tmp_path / "out").exists()


def test_slices_of_a_different_shape_are_refused_before_writing(llama, tmp_path):
    wide = make_model(tmp_path / "wide", hidden_size=48, head_dim=12)
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{a: {llama}, w: {wide}}}
        steps:
          - op: slice_layers
            slices: [{{model: a, range: [0, 2]}}, {{model: w, range: [0, 2]}}]
        """)
    with pytest.raises(PlanError, match="does not fit the base"):
        load_recipe(recipe).run(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _without_layer_types(model_dir, tmp_path):
    copy = tmp_path / model_dir.name
    shutil.copytree(model_dir, copy)
    config = read_config(copy)
    original = config.pop("layer_types")
    (copy / "config.json").write_text(json.dumps(config))
    return copy, original


@pytest.mark.parametrize("family, settings", [
    ("qwen3", dict(use_sliding_window=True, sliding_window=16, max_window_layers=3)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=2)),
    ("gemma3_text", dict(sliding_window=16, sliding_window_pattern=3)),
    ("gemma2", dict(sliding_window=16)),
])
def test_per_layer_config_lists_follow_the_layers(family, settings, tmp_path):
    """layer_types is materialised from the family's rule when absent, then sliced like the layers."""
    model_dir = make_model(tmp_path / family, family=family, layers=6, **settings)
    spelt_out = read_config(model_dir)["layer_types"]
    stripped, original = _without_layer_types(model_dir, tmp_path / "stripped")
    assert original == spelt_out
    for source in (model_dir, stripped):
        recipe = write_recipe(tmp_path, f"""
            recipe: 1
            models: {{base: {source}}}
            steps: [{{op: drop_layers, model: base, layers: [0, 4]}}]
            """)
        out = load_recipe(recipe).run(tmp_path / "out", overwrite=True).out
        expected = [t for i, t in enumerate(original) if i not in (0, 4)]
        assert read_config(out)["layer_types"] == expected
        model = load_causal_lm(out)  # transformers' strict config accepts it
        assert model.config.layer_types == expected
        assert len(set(expected)) == 2  # the test means something only with both kinds left


def _with_infinite_snr_layers(tmp_path, infinite: set[int]):
    """A 5-layer model whose v_proj in `infinite` layers has a tight spectrum: every singular value lies above
    the noise edge, so their SNR is infinite; the random v_proj of the other layers have finite SNR."""
    from safetensors.torch import load_file, save_file

    path = make_model(tmp_path / "snr-model", layers=5, seed=7)
    tensors = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(8)
    for i in infinite:
        name = f"model.layers.{i}.self_attn.v_proj.weight"
        rows, cols = tensors[name].shape
        u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g))
        v, _ = torch.linalg.qr(torch.randn(cols, rows, generator=g))
        tensors[name] = (u @ torch.diag(torch.linspace(1.0, 1.02, rows)) @ v.T).contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("rule", ["where: infinite", "lowest: 2", "below: 7"])
def test_drop_layers_selected_by_snr(tmp_path, rule):
    from recipekit.engine.core.rmt import snr
    from tests.tiny import tensors_of

    path = _with_infinite_snr_layers(tmp_path, {1, 3})
    values = [snr(tensors_of(path)[f"model.layers.{i}.self_attn.v_proj.weight"]).snr for i in range(5)]
    assert [i for i, v in enumerate(values) if v == float("inf")] == [1, 3]  # the model is what we meant
    expected = {"where: infinite": [1, 3], "lowest: 2": sorted(sorted(range(5), key=values.__getitem__)[:2]),
                "below: 7": [i for i, v in enumerate(values) if v < 7]}[rule]
    assert 0 < len(expected) < 5
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{base: {path}}}
        steps:
          - op: drop_layers
            model: base
            select: {{metric: snr, module: self_attn.v_proj, {rule}}}
        """)
    out = load_recipe(recipe).run(tmp_path / "out").out
    assert_layers_from(out, [(path, i) for i in range(5) if i not in expected], path)
    card = (out / "README.md").read_text()
    assert "selected by snr of self_attn.v_proj" in card and "1: inf" in card.split("(values:")[1]


def test_a_selector_that_takes_no_layer_is_refused(tmp_path):
    path = _with_infinite_snr_layers(tmp_path, set())
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{base: {path}}}
        steps:
          - op: drop_layers
            model: base
            select: {{metric: snr, where: infinite}}
        """)
    with pytest.raises(PlanError) as info:
        load_recipe(recipe).plan()
    (problem,) = info.value.problems
    assert problem.path == ("steps", 0, "select") and problem.where.endswith("recipe.yaml:6:13")
    assert problem.message.startswith("snr of self_attn.v_proj infinite selects no layer of 'base' (values: 0: ")


@pytest.fixture
def talking_model(tmp_path):
    """A tiny Llama with the demo byte-level tokenizer, and a text file of three paragraphs."""
    demo = DEMO / "models" / "llama-a"
    path = make_model(tmp_path / "talk", layers=5, vocab_size=258, seed=10)
    shutil.copy(demo / "tokenizer.json", path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text('{"bos_token": "<s>", "add_bos_token": true}')
    (tmp_path / "texts.txt").write_text("One small text.\n\nAnother, longer text for the batch.\n\nA third.\n")
    return path


@pytest.mark.parametrize("select", ["{metric: angular, n: 2, text: texts.txt}",
                                    "{metric: angular, n: 2, text: texts.txt, token: mean}",
                                    "{metric: bi, count: 2, text: texts.txt}"])
def test_drop_layers_selected_by_activations(talking_model, tmp_path, select):
    from recipekit.engine.core.graph import LazyModel
    from recipekit.engine.io.source import open_model
    from recipekit.engine.measure.similarity import similarity
    from recipekit.engine.measure.texts import paragraphs

    measured = similarity(LazyModel.from_source("m", open_model(str(talking_model), base_dir=tmp_path)), "m",
                          paragraphs((tmp_path / "texts.txt").read_text()), mean_n=2)
    if "angular" in select:
        distances = measured.angular(2, "mean" if "mean" in select else "last")
        start = distances.index(min(distances))
        expected = [start, start + 1]
    else:
        expected = sorted(sorted(range(5), key=measured.bi.__getitem__)[:2])
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{m: {talking_model}}}
        steps:
          - op: drop_layers
            model: m
            select: {select}
        """)
    out = load_recipe(recipe).run(tmp_path / "out").out
    assert_layers_from(out, [(talking_model, i) for i in range(5) if i not in expected], talking_model)
    assert "selected by the" in (out / "README.md").read_text()


def test_a_missing_text_is_a_located_error(talking_model, tmp_path):
    from recipekit.engine import SourceError

    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{m: {talking_model}}}
        steps: [{{op: drop_layers, model: m, select: {{metric: bi, count: 1, text: nope.txt}}}}]
        """)
    with pytest.raises(SourceError) as info:
        load_recipe(recipe).plan()
    assert str(info.value).startswith(f"{tmp_path / 'nope.txt'}: steps[0]: text file not found")
