"""mergekit-yaml merge configs (the `models` and `slices` forms) run unchanged and compute what the recipe they
convert to computes; fields recipekit does not compute are named where they are."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from recipekit.engine.cli import main
from recipekit.ops.merge.interpolate import slerp
from tests.bad_inputs.checks import assert_recipe_refused, line
from tests.tiny import add_char_tokenizer, finetune, load_causal_lm, make_model, tensors_of

LAYERS = 4


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mergekit-merges")
    add_char_tokenizer(make_model(root / "base", layers=LAYERS, seed=1))
    for k in (1, 2):
        finetune(root / "base", root / f"ft{k}", seed=20 + k)
    return root


def _run_and_convert(work: Path, name: str, text: str, capsys) -> tuple[Path, dict]:
    """Run the config and the recipe `recipe convert` prints for it; both outputs must be the same bytes."""
    config = work / f"{name}.yml"
    config.write_text(textwrap.dedent(text).lstrip())
    assert main(["run", str(config), "-o", str(work / f"{name}-out"), "-q", "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["convert", str(config)]) == 0
    converted = capsys.readouterr().out
    (work / f"{name}-recipe.yaml").write_text(converted)
    assert main(["run", str(work / f"{name}-recipe.yaml"), "-o", str(work / f"{name}-from-recipe"), "-q",
                 "--overwrite"]) == 0
    for file in ("model-00001-of-00001.safetensors", "config.json", "tokenizer.json"):
        assert (work / f"{name}-out" / file).read_bytes() == (work / f"{name}-from-recipe" / file).read_bytes()
    return work / f"{name}-out", yaml.safe_load(converted)


TIES = """
models:
  - model: ./base
  - model: ./ft1
    parameters: {weight: 0.6, density: 0.5}
  - model: ./ft2
    parameters:
      weight: [0.2, 0.8]
      density: 0.7
merge_method: ties
base_model: ./base
parameters:
  normalize: true
  int8_mask: true
dtype: float32
tokenizer_source: base
"""


def test_a_models_form_ties_config_is_one_merge_step(work: Path, capsys) -> None:
    out, recipe = _run_and_convert(work, "ties", TIES, capsys)
    assert recipe["steps"] == [{"op": "merge", "method": "ties", "models": [
        {"model": "base"}, {"model": "ft1", "weight": 0.6, "density": 0.5},
        {"model": "ft2", "weight": [0.2, 0.8], "density": 0.7}], "base": "base",
        "parameters": {"normalize": True, "int8_mask": True}, "compute_dtype": "float32"}]
    assert recipe["output"] == {"dtype": "float32", "tokenizer": "base"}  # no out_dtype: written in dtype
    assert load_causal_lm(out).config.num_hidden_layers == LAYERS


SLERP = """
slices:
  - sources:
      - model: ./base
        layer_range: [0, 4]
      - model: ./ft1
        layer_range: [0, 4]
merge_method: slerp
base_model: ./base
parameters:
  t:
    - filter: self_attn
      value: [0, 1]
    - filter: mlp
      value: [1, 0]
    - value: 0.5
dtype: float32
"""


def test_the_classic_slerp_config_runs_with_its_filters_and_gradients(work: Path, capsys) -> None:
    out, recipe = _run_and_convert(work, "slerp", SLERP, capsys)
    assert [s["op"] for s in recipe["steps"]] == ["slice_layers", "slice_layers", "merge"]
    got, base, ft1 = tensors_of(out), tensors_of(work / "base"), tensors_of(work / "ft1")
    for i in range(LAYERS):
        t = i / (LAYERS - 1)
        for name, want_t in ((f"model.layers.{i}.self_attn.o_proj.weight", t),
                             (f"model.layers.{i}.mlp.up_proj.weight", 1 - t),
                             (f"model.layers.{i}.input_layernorm.weight", 0.5)):
            assert torch.allclose(got[name], slerp(base[name], ft1[name], t=want_t), atol=1e-6), name
    assert torch.allclose(got["model.embed_tokens.weight"],
                          slerp(base["model.embed_tokens.weight"], ft1["model.embed_tokens.weight"], t=0.5))


TWO_SLICES = """
slices:
  - sources:
      - model: ./base
        layer_range: [0, 2]
      - model: ./ft1
        layer_range: [0, 2]
        parameters: {weight: 0.25}
  - sources:
      - model: ./base
        layer_range: [2, 4]
      - model: ./ft2
        layer_range: [2, 4]
    parameters:
      weight: [{filter: mlp, value: 1.0}]
merge_method: task_arithmetic
base_model: ./base
parameters:
  weight: 0.5
random_seed: 7
"""


def test_each_slice_is_merged_on_its_own_then_stacked(work: Path, capsys) -> None:
    out, recipe = _run_and_convert(work, "two", TWO_SLICES, capsys)
    got, base = tensors_of(out), tensors_of(work / "base")
    ft1, ft2 = tensors_of(work / "ft1"), tensors_of(work / "ft2")
    for i in range(LAYERS):
        for part in ("mlp.down_proj.weight", "self_attn.q_proj.weight"):
            name = f"model.layers.{i}.{part}"
            if i < 2:
                other, w = ft1, 0.25  # the source's own weight
            else:  # the slice's rule where it matches, else the global weight
                other, w = ft2, (1.0 if "mlp" in part else 0.5)
            want = base[name] + w * (other[name] - base[name])
            assert torch.allclose(got[name], want, atol=1e-6), name
    # embeddings merged with the first slice, final norm and lm_head with the last, as mergekit takes them
    for name, other, w in (("model.embed_tokens.weight", ft1, 0.25), ("model.norm.weight", ft2, 0.5),
                           ("lm_head.weight", ft2, 0.5)):
        assert torch.allclose(got[name], base[name] + w * (other[name] - base[name]), atol=1e-6), name
    assert recipe["steps"][-1]["op"] == "slice_layers" and recipe["steps"][-1]["head"] == "slice1"
    assert [s.get("id") for s in recipe["steps"][:3]] == ["base-layers-0-2", "ft1-layers-0-2", "slice0"]
    assert load_causal_lm(out).config.num_hidden_layers == LAYERS


LINEAR_IN_BF16 = """
models:
  - model: ./ft1
    parameters: {weight: 0.3}
  - model: ./ft2
    parameters: {weight: 0.7}
merge_method: linear
dtype: bfloat16
out_dtype: float32
"""


def test_dtype_is_what_a_merge_computes_in_and_out_dtype_what_it_writes(work: Path, capsys) -> None:
    out, recipe = _run_and_convert(work, "linear-bf16", LINEAR_IN_BF16, capsys)
    assert recipe["steps"][0]["compute_dtype"] == "bfloat16"
    assert recipe["output"] == {"dtype": "float32"}
    got, ft1, ft2 = tensors_of(out), tensors_of(work / "ft1"), tensors_of(work / "ft2")
    for name in got:
        by_hand = torch.add(ft1[name].bfloat16() * 0.3, ft2[name].bfloat16(), alpha=0.7) / (0.3 + 0.7)
        assert torch.equal(got[name], by_hand.float()), name


def test_every_merge_of_a_slices_config_computes_in_its_dtype(work: Path, capsys) -> None:
    config = work / "two-bf16.yml"
    config.write_text(textwrap.dedent(TWO_SLICES).lstrip() + "dtype: bfloat16\n")
    assert main(["convert", str(config)]) == 0
    recipe = yaml.safe_load(capsys.readouterr().out)
    merges = [s for s in recipe["steps"] if s["op"] == "merge"]
    assert len(merges) == 2 and all(s["compute_dtype"] == "bfloat16" for s in merges)
    assert all("compute_dtype" not in s for s in recipe["steps"] if s["op"] != "merge")
    assert recipe["output"] == {"dtype": "bfloat16"}  # no out_dtype: written in dtype, as mergekit does


UNSUPPORTED = """
models:
  - model: ./base
  - model: ./ft1
    parameters: {weight: 0.5, t: 0.3}
merge_method: ties
base_model: ./base
modules: {text: {}}
chat_template: chatml
tokenizer_source: union
"""


@pytest.mark.parametrize("command", ["run", "validate", "convert"])
def test_what_a_merge_config_asks_that_recipekit_does_not_compute_is_named(work: Path, capsys,
                                                                           command: str) -> None:
    assert_recipe_refused(work, capsys, command, textwrap.dedent(UNSUPPORTED).lstrip(), [
        line("weight: 0.5, ^t: 0.3", "models[1].parameters.t", "not a per-model parameter"),
        line("modules: ^{text", "modules", "modules"),
        line("chat_template: ^chatml", "chat_template", "built-in templates by name are not included"),
    ])


# one config field feeds three recipe fields (two merges' compute_dtype, output.dtype): named once
MISSPELT_DTYPE = """\
slices:
  - sources:
      - {model: ./base, layer_range: [0, 2]}
      - {model: ./ft1, layer_range: [0, 2]}
  - sources:
      - {model: ./base, layer_range: [2, 4]}
      - {model: ./ft1, layer_range: [2, 4]}
merge_method: slerp
base_model: ./base
parameters: {t: 0.5}
dtype: fp16
"""
# float64 is a dtype to compute in, not one recipekit writes: without out_dtype it is refused as the output's
FLOAT64_OUTPUT = """\
models:
  - {model: ./ft1, parameters: {weight: 1}}
  - {model: ./ft2, parameters: {weight: 1}}
merge_method: linear
dtype: float64
"""


@pytest.mark.parametrize("text, marker, path, words", [
    ("models:\n  - model: ./base\n  - model: ./ft1\n    parameters: {weight: 1, density: 2}\n"
     "merge_method: ties\nbase_model: ./base\n", "density: ^2", "models[1].parameters.density",
     ("must lie in [0, 1]",)),
    ("models:\n  - model: ./ft1\n    parameters: {weight: 1}\nmerge_method: ties\n", "^models:",
     "base_model", ("needs a base",)),
    ("slices:\n  - sources:\n      - {model: ./base, layer_range: [0, 4]}\n      - {model: ./ft1, layer_range: [0, 3]}\n"
     "merge_method: slerp\nbase_model: ./base\nparameters: {t: 0.5}\n", "{model: ^./ft1",
     "slices[0].sources[1].model", ("'ft1-layers-0-3' has 3 layers", "'base-layers-0-4' has 4")),
    (MISSPELT_DTYPE, "dtype: ^fp16", "dtype", ("'fp16'", "'float16'")),
    (FLOAT64_OUTPUT, "dtype: ^float64", "dtype", ("'float64'", "'float32'")),
])
def test_problems_of_a_merge_config_are_located_in_it(work: Path, capsys, text: str, marker: str, path: str,
                                                      words: tuple[str, ...]) -> None:
    assert_recipe_refused(work, capsys, "validate", text, [line(marker, path, *words)])
