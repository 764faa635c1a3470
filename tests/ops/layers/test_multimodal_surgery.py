"""Layer surgery on a multimodal checkpoint (Gemma 3 image-text): only the language model's layers change."""
from __future__ import annotations

import json
import re
import struct

import pytest
import torch

from recipekit.engine import PlanError, load_recipe
from recipekit.engine.core.rmt import snr
from tests.tiny import make_model, make_multimodal_gemma3, read_config, tensors_of, write_recipe

TOKENS = torch.tensor([[5, 17, 42, 3, 88, 9, 61, 23, 90, 50, 7, 77]])  # longer than the sliding window
TEXT = dict(sliding_window=4, sliding_window_pattern=3)  # sliding and full attention, every third layer full
DECODER = re.compile(r"^language_model\.model\.layers\.(\d+)\.(.+)$")


def raw_tensors(model_dir) -> dict[str, tuple[str, list[int], bytes]]:
    """Every tensor of a model directory as (dtype, shape, the bytes in its file), read from the safetensors
    headers by hand."""
    out = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        data = file.read_bytes()
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size])
        header.pop("__metadata__", None)
        for name, entry in header.items():
            start, end = entry["data_offsets"]
            out[name] = (entry["dtype"], entry["shape"], data[8 + size + start:8 + size + end])
    return out


def assert_language_layers_from(out, origins, base) -> None:
    """Output decoder layer j holds the bytes of layer `origins[j][1]` of `origins[j][0]`; every other tensor
    (vision tower, projector, embeddings, final norm) holds the bytes of `base`'s."""
    got, sources = raw_tensors(out), {}
    expected = {name: t for name, t in raw_tensors(base).items() if not DECODER.match(name)}
    for j, (path, i) in enumerate(origins):
        sources.setdefault(path, raw_tensors(path))
        for name, t in sources[path].items():
            match = DECODER.match(name)
            if match and int(match[1]) == i:
                expected[f"language_model.model.layers.{j}.{match[2]}"] = t
    assert sorted(got) == sorted(expected)
    for name, t in expected.items():
        assert got[name] == t, name


def load(model_dir):
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS, use_cache=False).logits


def with_layers(model, layers: list) -> None:
    """Give the loaded model's language model these decoder layers (each keeps its attention type)."""
    text = model.model.language_model
    types = [layer.self_attn.layer_type for layer in layers]
    text.layers = torch.nn.ModuleList(layers)
    for config in {id(c): c for c in (text.config, model.config.text_config)}.values():
        config.num_hidden_layers, config.layer_types = len(layers), types


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return make_multimodal_gemma3(tmp_path_factory.mktemp("models") / "gemma3", layers=5, **TEXT)


def test_dropping_layers_changes_only_the_language_model(gemma3, tmp_path):
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{base: {gemma3}}}
        steps: [{{op: drop_layers, model: base, layers: [1, 3]}}]
        """)
    out = load_recipe(recipe).run(tmp_path / "out").out
    before, after = read_config(gemma3), read_config(out)
    kept = [0, 2, 4]
    assert after["text_config"]["num_hidden_layers"] == 3
    assert after["text_config"]["layer_types"] == [before["text_config"]["layer_types"][i] for i in kept]
    assert after["vision_config"] == before["vision_config"]
    assert {k: v for k, v in after.items() if k != "text_config"} == \
        {k: v for k, v in before.items() if k != "text_config"}
    assert_language_layers_from(out, [(gemma3, i) for i in kept], gemma3)

    reference = load(gemma3)
    with_layers(reference, [reference.model.language_model.layers[i] for i in kept])
    pruned = load(out)
    torch.testing.assert_close(logits(pruned), logits(reference), atol=1e-6, rtol=0)
    assert not torch.allclose(logits(pruned), logits(load(gemma3)), atol=1e-3)


def test_a_vision_tower_as_deep_as_the_language_model_is_left_alone(tmp_path):
    """Once the language model has as many layers as the vision encoder, the count cannot tell the decoder."""
    model = make_multimodal_gemma3(tmp_path / "even", layers=3, vision_layers=3, **TEXT)
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{base: {model}}}
        steps: [{{op: drop_layers, model: base, layers: [0]}}]
        """)
    out = load_recipe(recipe).run(tmp_path / "out").out
    assert read_config(out)["text_config"]["num_hidden_layers"] == 2
    assert read_config(out)["vision_config"]["num_hidden_layers"] == 3
    assert_language_layers_from(out, [(model, 1), (model, 2)], model)
    reference = load(model)
    with_layers(reference, list(reference.model.language_model.layers[1:]))
    torch.testing.assert_close(logits(load(out)), logits(reference), atol=1e-6, rtol=0)


def test_frankenmerge_of_two_multimodal_models(gemma3, tmp_path):
    other = make_multimodal_gemma3(tmp_path / "other", layers=5, seed=1, **TEXT)
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{a: {gemma3}, b: {other}}}
        steps:
          - op: slice_layers
            slices: [{{model: a, range: [0, 3]}}, {{model: b, range: [1, 5]}}]
        """)
    out = load_recipe(recipe).run(tmp_path / "out").out
    origins = [(gemma3, 0), (gemma3, 1), (gemma3, 2), (other, 1), (other, 2), (other, 3), (other, 4)]
    assert_language_layers_from(out, origins, gemma3)
    types = [read_config(path)["text_config"]["layer_types"][i] for path, i in origins]
    assert read_config(out)["text_config"]["layer_types"] == types
    assert read_config(out)["text_config"]["num_hidden_layers"] == 7

    reference, donor = load(gemma3), load(other)
    with_layers(reference, [*reference.model.language_model.layers[:3], *donor.model.language_model.layers[1:]])
    torch.testing.assert_close(logits(load(out)), logits(reference), atol=1e-6, rtol=0)


def test_expanded_multimodal_model_computes_what_it_did(gemma3, tmp_path):
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{base: {gemma3}}}
        steps: [{{op: expand_layers, model: base, after: [1, 4]}}]
        """)
    out = load_recipe(recipe).run(tmp_path / "out").out
    config = read_config(out)["text_config"]
    types = read_config(gemma3)["text_config"]["layer_types"]
    assert config["num_hidden_layers"] == 7
    assert config["layer_types"] == [types[i] for i in (0, 1, 1, 2, 3, 4, 4)]
    vision = {n: t for n, t in raw_tensors(gemma3).items() if not DECODER.match(n)}
    assert {n: t for n, t in raw_tensors(out).items() if not DECODER.match(n)} == vision
    torch.testing.assert_close(logits(load(out)), logits(load(gemma3)), atol=1e-5, rtol=0)


def test_a_multimodal_model_cannot_be_the_base_of_experts(gemma3, tmp_path):
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{base: {gemma3}, e: {gemma3}}}
        steps:
          - op: stack_experts
            base: base
            experts: [{{model: e}}, {{model: e}}]
        """)
    with pytest.raises(PlanError, match="text-only base model") as e:
        load_recipe(recipe).run(tmp_path / "out")
    assert e.value.problems[0].path[:2] == ("steps", 0)
    assert not (tmp_path / "out").exists()


def test_layers_of_another_family_do_not_fit(gemma3, tmp_path):
    llama = make_model(tmp_path / "llama", layers=2)
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{a: {gemma3}, b: {llama}}}
        steps:
          - op: slice_layers
            slices: [{{model: a, range: [0, 2]}}, {{model: b, range: [0, 2]}}]
        """)
    lacking = r"layer 0 of model 'b' does not fit the base 'a': it has no \S+ .*which every layer of the base has"
    with pytest.raises(PlanError, match=lacking) as e:
        load_recipe(recipe).run(tmp_path / "out")
    assert e.value.problems[0].path[:2] == ("steps", 0)
    assert not (tmp_path / "out").exists()


def test_snr_selector_measures_the_language_model(gemma3, tmp_path):
    """The SNR of self_attn.v_proj is the language model's (the vision tower has a v_proj too)."""
    tensors = tensors_of(gemma3)
    values = [snr(tensors[f"language_model.model.layers.{i}.self_attn.v_proj.weight"]).snr for i in range(5)]
    lowest = min(range(5), key=values.__getitem__)
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{base: {gemma3}}}
        steps: [{{op: drop_layers, model: base, select: {{metric: snr, module: self_attn.v_proj, lowest: 1}}}}]
        """)
    out = load_recipe(recipe).run(tmp_path / "out").out
    assert_language_layers_from(out, [(gemma3, i) for i in range(5) if i != lowest], gemma3)
