"""mergekit-moe configs run unchanged through `recipe run`, and `recipe convert` prints the same recipe."""
from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
import yaml

from recipekit.engine.cli import main
from tests.bad_inputs.checks import assert_recipe_refused, assert_refused, cli, line, mark
from tests.tiny import add_char_tokenizer, make_model, read_config, tensors_of

EVERY_FIELD = """
base_model: ./base
architecture: qwen
gate_mode: hidden
dtype: bfloat16
experts_per_token: 1
experts:
  - source_model: ./e0
    positive_prompts: ["0123 4567", "31 41 59"]
    negative_prompts: ["the cat"]
    noise_scale: 0.01
  - source_model: ./base
    positive_prompts: ["the cat sat"]
    residual_scale: 0.5
shared_experts:
  - source_model: ./e0
    positive_prompts: ["HELLO"]
    residual_scale: 0.1
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("foreign")
    add_char_tokenizer(make_model(root / "base", seed=0))
    make_model(root / "e0", seed=1)
    return root


@pytest.fixture
def work(tmp_path: Path, folder: Path) -> Path:
    for name in ("base", "e0"):
        shutil.copytree(folder / name, tmp_path / name)
    return tmp_path


def test_every_field_runs_unchanged_and_equals_its_conversion(work: Path, capsys) -> None:
    config = work / "moe.yml"
    config.write_text(textwrap.dedent(EVERY_FIELD).lstrip())
    assert main(["run", str(config), "-o", str(work / "from-config"), "-q"]) == 0
    capsys.readouterr()

    assert main(["convert", str(config)]) == 0
    converted = capsys.readouterr().out
    recipe = yaml.safe_load(converted)
    assert recipe["models"] == {"base": "./base", "e0": "./e0"}
    stack, gates = recipe["steps"]
    assert stack == {
        "id": "moe", "op": "stack_experts", "base": "base", "layout": "qwen2_moe", "experts_per_token": 1,
        "experts": [{"model": "e0", "positive": ["0123 4567", "31 41 59"], "negative": ["the cat"],
                     "noise_scale": 0.01},
                    {"model": "base", "positive": ["the cat sat"], "residual_scale": 0.5}],
        "shared_expert": {"model": "e0", "positive": ["HELLO"], "residual_scale": 0.1}}
    assert gates == {"op": "init_gates", "model": "moe", "mode": "hidden", "hidden_state": "residual",
                     "token": "last"}
    assert recipe["output"] == {"tokenizer": "base", "dtype": "bfloat16"}

    (work / "converted.yaml").write_text(converted)
    assert main(["run", str(work / "converted.yaml"), "-o", str(work / "from-recipe"), "-q"]) == 0
    for name in ("model-00001-of-00001.safetensors", "config.json", "recipe.yaml"):
        assert (work / "from-config" / name).read_bytes() == (work / "from-recipe" / name).read_bytes(), name
    out = read_config(work / "from-config")
    assert out["model_type"] == "qwen2_moe" and out["num_experts"] == 2 and out["num_experts_per_tok"] == 1
    assert "mlp.shared_expert_gate.weight" in "".join(tensors_of(work / "from-config"))


def test_defaults_are_mergekits(work: Path, capsys) -> None:
    """No gate_mode means hidden over the residual stream at the last token; experts_per_token stays 2."""
    config = work / "moe.yml"
    config.write_text("base_model: ./base\nexperts:\n  - source_model: ./e0\n    positive_prompts: [a]\n"
                      "  - source_model: ./base\n    positive_prompts: [b]\n")
    assert main(["convert", str(config)]) == 0
    recipe = yaml.safe_load(capsys.readouterr().out)
    assert recipe["steps"][1] == {"op": "init_gates", "model": "moe", "mode": "hidden", "hidden_state": "residual",
                                  "token": "last"}
    assert "experts_per_token" not in recipe["steps"][0] and "dtype" not in recipe["output"]


UNSUPPORTED = """
base_model: ./base
gate_mode: hidden
tokenizer_source: base
experts:
  - source_model: ./e0+adapter
    positive_prompts: [a]
    negative_prompt: [b]
  - source_model: ./base
    positive_prompts: [c]
architecture: deepseek
"""


@pytest.mark.parametrize("command", ["run", "validate", "plan", "convert"])
def test_unsupported_fields_are_each_named_where_they_are(work: Path, capsys, command: str) -> None:
    assert_recipe_refused(work, capsys, command, textwrap.dedent(UNSUPPORTED).lstrip(), [
        line("^tokenizer_source", "tokenizer_source", "not a field of a mergekit-moe config", "supported: base_model"),
        line("source_model: ^./e0+adapter", "experts[0].source_model", "model+LoRA"),
        line("^negative_prompt:", "experts[0].negative_prompt", "did you mean 'negative_prompts'"),
        line("architecture: ^deepseek", "architecture", "architecture 'deepseek' is not supported"),
    ])


def test_problems_found_later_name_the_configs_fields(work: Path, capsys) -> None:
    text = ("base_model: ./base\ngate_mode: random\nexperts_per_token: 3\nexperts:\n  - source_model: ./e0\n"
            "  - source_model: ./missing\n")
    config = work / "moe.yml"
    config.write_text(text)
    result = cli(capsys, "plan", config)
    assert_refused(result, [(f"{config}:{mark(text, '- source_model: ^./missing')}: experts[1].source_model: ",
                             ("model directory './missing' not found",))])

    config.write_text(text.replace("./missing", "./base"))
    result = cli(capsys, "plan", config)
    assert_refused(result, [(f"{config}:3:20: experts_per_token: ", ("only 2 experts",))])


def test_convert_refuses_what_is_not_a_foreign_config(work: Path, capsys) -> None:
    recipe = work / "r.yaml"
    recipe.write_text("recipe: 1\nmodels: {a: ./base}\nsteps: [{op: drop_layers, model: a, layers: [1]}]\n")
    assert_refused(cli(capsys, "convert", recipe), [(f"{recipe}: ", ("already a recipekit recipe",))])
    other = work / "other.yaml"
    other.write_text("slerp: {t: 0.5}\n")
    assert_refused(cli(capsys, "convert", other), [(f"{other}: ", ("not a config recipekit can convert",))])
