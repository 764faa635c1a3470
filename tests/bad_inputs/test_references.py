"""Mistakes in what a recipe refers to: models and steps by name, and layers the models do not have."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.bad_inputs.checks import (
    COMMANDS,
    Line,
    assert_no_output,
    assert_recipe_refused,
    assert_refused,
    cli,
    invoke,
    line,
    mark,
    snapshot,
    yaml_text,
)
from tests.tiny import make_model

# id -> (recipe text, expected lines). Models are at ./llama (6 layers) beside the recipe.
REFERENCE_CASES: dict[str, tuple[str, list[Line]]] = {
    "layer-index-out-of-range": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1, 6]
        """,
        [line("layers: [1, ^6]", "steps[0].layers[1]", "layer 6 is out of range", "has 6 layers")],
    ),
    "layer-out-of-range-of-a-step": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            id: pruned
            model: a
            layers: [1]
          - op: drop_layers
            model: pruned
            layers: [0, 5]
        """,
        [line("layers: [0, ^5]", "steps[1].layers[1]", "layer 5 is out of range", "'pruned' has 5 layers")],
    ),
    "drop-leaves-no-layers": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [[0, 6]]
        """,
        [line("layers: ^[[0, 6]]", "steps[0].layers", "leaves no layer", "it has 6 layers")],
    ),
    "slice-beyond-the-model": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: slice_layers
            slices:
              - model: a
                range: [0, 4]
              - model: a
                range: [2, 8]
        """,
        [line("range: ^[2, 8]", "steps[0].slices[1].range", "[2, 8]", "out of range", "6 layers")],
    ),
    "super-weight-in-a-vector": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: protect_super_weights
            model: a
            coordinates: [{layer: 0, row: 1, column: 1, module: input_layernorm}]
        """,
        [line("module: ^input_layernorm", "steps[0].coordinates[0].module", "shape [32]", "2-D weight")],
    ),
    "low-rank-of-a-vector": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: low_rank
            model: a
            modules: [post_attention_layernorm]
        """,
        [line("modules: [^post_attention_layernorm]", "steps[0].modules[0]", "shape [32]", "needs a matrix")],
    ),
    "snr-of-a-vector": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            select: {metric: snr, module: input_layernorm, where: infinite}
        """,
        [line("module: ^input_layernorm", "steps[0].select.module", "shape [32]", "SNR is measured on a matrix")],
    ),
    "unknown-model-reference": (
        """
        recipe: 1
        models:
          base: ./llama
        steps:
          - op: drop_layers
            model: bsae
            layers: [1]
        """,
        [line("model: ^bsae", "steps[0].model", "unknown model or step 'bsae'", "did you mean 'base'?")],
    ),
    "reference-to-a-later-step": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: slice_layers
            slices:
              - model: pruned
                range: [0, 2]
          - op: drop_layers
            id: pruned
            model: a
            layers: [1]
        """,
        [line("- model: ^pruned", "steps[0].slices[0].model", "unknown model or step 'pruned'")],
    ),
    "unused-step-without-id": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
          - op: drop_layers
            model: a
            layers: [2]
        """,
        [line("  - ^op: drop_layers\n    model: a\n    layers: [1]", "steps[0]", "the result of this step is never used",
              "give it an id and name it in a later step, or remove the step")],
    ),
    "unused-step-id": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            id: first
            model: a
            layers: [1]
          - op: drop_layers
            id: second
            model: a
            layers: [2]
          - op: slice_layers
            slices: [{model: second, range: [0, 2]}]
        """,
        [line("id: ^first", "steps[0].id", "no later step reads 'first', so this step's result is never used",
              "only the last step's result is the output")],
    ),
    "duplicate-step-id": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            id: pruned
            model: a
            layers: [1]
          - op: drop_layers
            id: pruned
            model: pruned
            layers: [2]
        """,
        [line("  - op: drop_layers\n    id: ^pruned\n    model: pruned", "steps[1].id", "'pruned'", "already")],
    ),
    "step-id-shadows-a-model": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            id: a
            model: a
            layers: [1]
        """,
        [line("id: ^a", "steps[0].id", "'a'", "already the name of a model")],
    ),
    "tokenizer-from-a-step": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            id: pruned
            model: a
            layers: [1]
        output:
          tokenizer: pruned
        """,
        [line("tokenizer: ^pruned", "output.tokenizer", "unknown model 'pruned'", "one of: a")],
    ),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_reference_mistake(work: Path, capsys, case: str, command: str) -> None:
    template, lines = REFERENCE_CASES[case]
    assert_recipe_refused(work, capsys, command, yaml_text(template), lines)


@pytest.mark.parametrize("case", ["unknown-model-reference", "duplicate-step-id", "unused-step-id"])
def test_reference_mistake_schema_only(tmp_path: Path, capsys, case: str) -> None:
    """`validate --schema-only` opens no model, so references between names must be refused the same way."""
    template, lines = REFERENCE_CASES[case]
    text = yaml_text(template)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")

    result = cli(capsys, "validate", "--schema-only", recipe)

    assert_refused(result, [(ln.prefix(recipe, text), ln.words) for ln in lines])


def test_incompatible_models_in_one_stack(work: Path, capsys) -> None:
    make_model(work / "wide", layers=4, hidden_size=64, head_dim=16, seed=3)
    text = yaml_text("""
        recipe: 1
        models:
          a: ./llama
          wide: ./wide
        steps:
          - op: slice_layers
            slices:
              - model: a
                range: [0, 3]
              - model: wide
                range: [2, 4]
        """)
    recipe = work / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")
    out = work / "OUT"
    before = snapshot(work)

    result = invoke(capsys, "run", recipe, out)

    # the offending field is the second slice (its entry or its `model`), not the whole step
    located = [f"{recipe}:{mark(text, '- ^model: wide')}: steps[0].slices[1]: ",
               f"{recipe}:{mark(text, '- model: ^wide')}: steps[0].slices[1].model: "]
    assert result.rc == 2 and "Traceback" not in result.err, result.err
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith(tuple(located)), f"expected one of {located}, got:\n{result.err}"
    assert "'wide'" in lines[0] and "does not fit" in lines[0], result.err
    assert_no_output(out)
    assert snapshot(work) == before


def test_validate_reports_schema_and_reference_problems_together(work: Path, capsys) -> None:
    """A wrong type in one step must not hide an unknown model in another: one report holds every problem."""
    text = yaml_text("""
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: b
            layers: [1]
          - op: drop_layers
            model: a
            layers: "x"
        """)
    recipe = work / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")

    result = cli(capsys, "validate", recipe)

    expected = [
        line("model: ^b", "steps[0].model", "unknown model or step 'b'"),
        line('layers: ^"x"', "steps[1].layers", "list", "'x'"),
    ]
    assert_refused(result, [(ln.prefix(recipe, text), ln.words) for ln in expected])


def test_a_missing_local_folder_is_not_taken_for_a_hub_id(work: Path, capsys) -> None:
    """`models/llama-zzz` next to a `models/` folder is a typo in a local path, not the Hub repo models/llama-zzz."""
    (work / "models").mkdir()
    text = "recipe: 1\nmodels: {a: models/llama-zzz}\nsteps:\n  - {op: drop_layers, model: a, layers: [1]}\n"
    recipe = work / "recipe.yaml"
    recipe.write_text(text)
    result = cli(capsys, "validate", recipe)
    assert_refused(result, [(f"{recipe}:{mark(text, 'a: ^models/llama-zzz')}: models.a: ",
                             ("model directory 'models/llama-zzz' not found", "models/ exists there"))])


@pytest.mark.parametrize("command", COMMANDS)
def test_a_model_path_in_a_symlink_loop_is_located(work: Path, capsys, command: str) -> None:
    (work / "loop1").symlink_to("loop2")
    (work / "loop2").symlink_to("loop1")
    text = "recipe: 1\nmodels: {a: loop1}\nsteps:\n  - {op: drop_layers, model: a, layers: [1]}\n"
    recipe = work / "recipe.yaml"
    recipe.write_text(text)
    before = snapshot(work)
    result = invoke(capsys, command, recipe, work / "OUT")
    assert_refused(result, [(f"{recipe}:{mark(text, 'a: ^loop1')}: models.a: ",
                             ("model path 'loop1' cannot be resolved", "Symlink loop"))])
    assert snapshot(work) == before


@pytest.mark.parametrize("ref", ["./missing", "../missing", "ABSOLUTE/missing", "~/missing", "models/x/y",
                                 "models/llama-zzz", "nothing-here/", "models\\x"])
def test_a_missing_path_is_a_missing_local_model_and_never_a_hub_lookup(work: Path, capsys, monkeypatch, ref) -> None:
    """Whatever looks like a path (or starts with an existing folder) is looked for locally only, online too."""
    import huggingface_hub

    from recipekit.engine.io import hub

    def no_hub(*args, **kwargs):
        raise AssertionError(f"{ref!r} was looked up on the Hub")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(hub, "unreachable", no_hub)
    monkeypatch.setenv("HOME", str(work))
    (work / "models").mkdir()
    ref = ref.replace("ABSOLUTE", str(work))
    text = f"recipe: 1\nmodels: {{a: '{ref}'}}\nsteps:\n  - {{op: drop_layers, model: a, layers: [1]}}\n"
    recipe = work / "recipe.yaml"
    recipe.write_text(text)
    for command in ("validate", "run"):
        result = invoke(capsys, command, recipe, work / "out")
        assert_refused(result, [(f"{recipe}:{mark(text, 'a: ^')}: models.a: ",
                                 (f"model directory {ref!r} not found",))])
        assert_no_output(work / "out")
