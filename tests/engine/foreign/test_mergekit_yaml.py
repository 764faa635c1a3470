"""mergekit-yaml passthrough configs run unchanged, compute what mergekit computes, and convert to recipes."""
from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from recipekit.engine.cli import main
from tests.bad_inputs.checks import assert_recipe_refused, assert_refused, cli, line, mark
from tests.tiny import add_char_tokenizer, assert_layers_from, load_causal_lm, make_model

FRANKENMERGE = """
slices:
  - sources:
      - model: ./a
        layer_range: [0, 3]
  - sources:
      - model: ./b
        layer_range: [1, 4]
  - sources:
      - model: ./a
        layer_range: [2, 3]
  - sources:
      - model: ./b
        layer_range: [3, 4]
merge_method: passthrough
dtype: bfloat16
tokenizer_source: ./b
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mergekit-yaml")
    add_char_tokenizer(make_model(root / "a", seed=0))
    add_char_tokenizer(make_model(root / "b", seed=1), vocab_size=96)
    make_model(root / "tied", seed=2, tied=True)
    return root


@pytest.fixture
def work(tmp_path: Path, folder: Path) -> Path:
    for name in ("a", "b", "tied"):
        shutil.copytree(folder / name, tmp_path / name)
    return tmp_path


def test_a_frankenmerge_runs_unchanged_as_mergekit_computes_it(work: Path, capsys) -> None:
    config = work / "franken.yml"
    config.write_text(textwrap.dedent(FRANKENMERGE).lstrip())
    assert main(["run", str(config), "-o", str(work / "out"), "-q"]) == 0

    a, b = work / "a", work / "b"
    origins = [(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3), (a, 2), (b, 3)]
    # mergekit: embeddings with the first slice, final norm and lm_head with the last
    assert_layers_from(work / "out", origins, a, dtype=torch.bfloat16, head=b)
    model = load_causal_lm(work / "out")
    assert model.config.num_hidden_layers == 8
    assert (work / "out" / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_convert_prints_the_recipe_it_runs(work: Path, capsys) -> None:
    config = work / "franken.yml"
    config.write_text(textwrap.dedent(FRANKENMERGE).lstrip())
    assert main(["convert", str(config)]) == 0
    converted = capsys.readouterr().out
    recipe = yaml.safe_load(converted)
    assert recipe == {
        "recipe": 1, "models": {"a": "./a", "b": "./b"},
        "steps": [{"op": "slice_layers", "slices": [
            {"model": "a", "range": [0, 3]}, {"model": "b", "range": [1, 4]}, {"model": "a", "range": [2, 3]},
            {"model": "b", "range": [3, 4]}], "head": "b"}],
        "output": {"dtype": "bfloat16", "tokenizer": "b"}}

    (work / "converted.yaml").write_text(converted)
    assert main(["run", str(config), "-o", str(work / "from-config"), "-q"]) == 0
    assert main(["run", str(work / "converted.yaml"), "-o", str(work / "from-recipe"), "-q"]) == 0
    for name in ("model-00001-of-00001.safetensors", "config.json", "recipe.yaml", "tokenizer.json"):
        assert (work / "from-config" / name).read_bytes() == (work / "from-recipe" / name).read_bytes(), name


def test_one_model_keeps_its_own_head_and_out_dtype_wins(work: Path, capsys) -> None:
    config = work / "self.yml"
    config.write_text("merge_method: passthrough\nbase_model: ./a\ndtype: float32\nout_dtype: float16\n"
                      "tokenizer: {source: base}\nslices:\n"
                      "  - sources: [{model: ./a, layer_range: [0, 4]}]\n"
                      "  - sources: [{model: ./a, layer_range: [1, 3]}]\n")
    assert main(["convert", str(config)]) == 0
    recipe = yaml.safe_load(capsys.readouterr().out)
    assert "head" not in recipe["steps"][0]
    assert recipe["output"] == {"dtype": "float16", "tokenizer": "a"}
    assert main(["run", str(config), "-o", str(work / "out"), "-q"]) == 0
    a = work / "a"
    assert_layers_from(work / "out", [(a, 0), (a, 1), (a, 2), (a, 3), (a, 1), (a, 2)], a, dtype=torch.float16)


UNSUPPORTED = """
merge_method: passthrough
base_model: ./b
slice:
  - sources: []
slices:
  - sources:
      - model: ./a
        layer_range: [0, 2]
      - model: ./b
        layer_range: [0, 2]
  - sources:
      - model: ./b
        layer_range: [2, 4]
tokenizer_source: union
chat_template: chatml
"""


@pytest.mark.parametrize("command", ["run", "validate", "convert"])
def test_unsupported_fields_are_each_named_where_they_are(work: Path, capsys, command: str) -> None:
    assert_recipe_refused(work, capsys, command, textwrap.dedent(UNSUPPORTED).lstrip(), [
        line("base_model: ^./b", "base_model", "base_model differs from the first slice's model"),
        line("^slice:", "slice", "not a field of a mergekit-yaml config", "did you mean 'slices'",
             "supported: merge_method, slices, models, base_model, parameters"),
        line("^model: ./b\n        layer_range: [0, 2]", "slices[0].sources[1]", "one source per slice"),
        line("chat_template: ^chatml", "chat_template", "write `auto` or the Jinja template itself"),
    ])


def test_problems_found_later_name_the_configs_fields(work: Path, capsys) -> None:
    text = ("merge_method: passthrough\nslices:\n  - sources:\n      - model: ./a\n        layer_range: [0, 9]\n"
            "  - sources:\n      - model: ./missing\n        layer_range: [0, 1]\n")
    config = work / "bad.yml"
    config.write_text(text)
    result = cli(capsys, "validate", config)
    assert_refused(result, [(f"{config}:{mark(text, 'model: ^./missing')}: slices[1].sources[0].model: ",
                             ("model directory './missing' not found",))])

    config.write_text(text.replace("./missing", "./tied"))
    result = cli(capsys, "plan", config)
    assert_refused(result, [
        (f"{config}:{mark(text, 'layer_range: ^[0, 9]')}: slices[0].sources[0].layer_range: ", ("out of range",)),
    ])

    # the first slice's model ties its embeddings: lm_head cannot come from the last slice's
    config.write_text(text.replace("./a", "./tied").replace("./missing", "./a").replace("[0, 9]", "[0, 2]"))
    result = cli(capsys, "plan", config)
    assert_refused(result, [(f"{config}:{mark(text, 'model: ^./missing')}: slices[1].sources[0].model: ",
                             ("ties lm_head to its embeddings",))])


def test_a_mergekit_yaml_config_is_found_by_its_merge_method(work: Path, capsys) -> None:
    config = work / "m.yml"
    config.write_text("merge_method: frobnicate\nslices:\n  - sources: [{model: ./a, layer_range: [0, 4]}]\n")
    result = cli(capsys, "validate", config)
    assert_refused(result, [(f"{config}:1:15: merge_method: ", ("'frobnicate'", "ties"))])


def test_a_passthrough_scale_is_a_merge_of_one_model_per_slice(work: Path, capsys) -> None:
    """mergekit's `scale` (often a filter on o_proj/down_proj of repeated layers) multiplies those tensors; the
    rest stay byte copies."""
    from tests.tiny import tensors_of

    config = work / "scaled.yml"
    config.write_text(textwrap.dedent("""
        merge_method: passthrough
        slices:
          - sources: [{model: ./a, layer_range: [0, 3]}]
          - sources:
              - model: ./a
                layer_range: [1, 3]
                parameters:
                  scale: [{filter: o_proj, value: 0.5}, {filter: down_proj, value: 0.5}, {value: 1.0}]
        """).lstrip())
    assert main(["run", str(config), "-o", str(work / "out"), "-q"]) == 0
    got, a = tensors_of(work / "out"), tensors_of(work / "a")
    for j, i in enumerate([0, 1, 2, 1, 2]):
        for part in ("self_attn.o_proj.weight", "mlp.down_proj.weight", "mlp.up_proj.weight"):
            factor = 0.5 if j >= 3 and "up_proj" not in part else 1.0
            assert torch.equal(got[f"model.layers.{j}.{part}"], a[f"model.layers.{i}.{part}"] * factor), (j, part)
    assert load_causal_lm(work / "out").config.num_hidden_layers == 5
