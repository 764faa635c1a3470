"""Mistakes in the recipe text and its types: YAML, keys, values, the recipe file itself, usage."""
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
    snapshot,
    yaml_text,
)

# id -> (recipe text, expected lines). Models are at ./llama (6 layers) beside the recipe.
SCHEMA_CASES: dict[str, tuple[str, list[Line]]] = {
    "yaml-syntax-error": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a: b
            layers: [1]
        """,
        [line("model: a^: b", None, "YAML syntax error", "mapping values are not allowed")],
    ),
    "yaml-misindented-key": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
             layers: [1]
        """,
        [line("     layers^: [1]", None, "YAML syntax error")],
    ),
    # The parser notices these only at the end of the file; the mistake is where the construct began.
    "yaml-unclosed-bracket": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1, 2
        """,
        [line("layers: ^[1, 2", None, "YAML syntax error")],
    ),
    "yaml-no-space-after-colon": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers:[1]
        """,
        [line("^layers:[1]", None, "YAML syntax error")],
    ),
    "yaml-unterminated-quote": (
        """
        recipe: 1
        description: "llama without layer 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
        """,
        [line('description: ^"llama', None, "YAML syntax error")],
    ),
    "tab-indenting-a-model": (
        """
        recipe: 1
        models:
        <TAB>a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
        """,
        [line("^\ta: ./llama", None, "tab", "spaces")],
    ),
    "tab-after-spaces-in-a-step": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
          <TAB>layers: [1]
        """,
        [line("  ^\tlayers: [1]", None, "tab", "spaces")],
    ),
    "python-object-tag": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: !!python/object/apply:os.system ["echo pwned"]
            layers: [1]
        """,
        [line("model: ^!!python", None, "python/object/apply:os.system", "not allowed")],
    ),
    "yaml-merge-key": (
        """
        recipe: 1
        models:
          a: ./llama
        common: &common
          op: drop_layers
          model: a
        steps:
          - <<: *common
            layers: [1]
        """,
        [line("- ^<<: *common", None, "merge keys")],
    ),
    "duplicate-yaml-key": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
            layers: [2]
        """,
        [line("^layers: [2]", None, "duplicate key 'layers'")],
    ),
    "two-yaml-documents": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
        ---
        recipe: 1
        """,
        [line("^---", None, "YAML syntax error", "single document")],
    ),
    "recipe-is-a-list": (
        """
        - recipe: 1
        - models:
            a: ./llama
        """,
        [line("^- recipe: 1", None, "mapping", "got list")],
    ),
    "unsupported-version": (
        """
        recipe: 2
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
        """,
        [line("recipe: ^2", "recipe", "unsupported recipe version 2", "version 1")],
    ),
    "missing-version": (
        """
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
        """,
        [line("^models:", "recipe", "missing required key 'recipe'")],
    ),
    "unknown-op": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layer
            model: a
            layers: [1]
        """,
        [line("op: ^drop_layer", "steps[0].op", "unknown op 'drop_layer'", "did you mean 'drop_layers'?",
              "slice_layers")],
    ),
    "step-without-op": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - model: a
            layers: [1]
        """,
        [line("- ^model: a", "steps[0]", "needs an 'op'", "drop_layers")],
    ),
    "unknown-select-metric": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            select: {metric: angualr, n: 1, text: t.txt}
        """,
        [line("metric: ^angualr", "steps[0].select.metric", "unknown metric 'angualr'",
              "did you mean 'angular'?", "snr")],
    ),
    "select-without-metric": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            select: {n: 1, text: t.txt}
        """,
        [line("select: ^{n: 1", "steps[0].select", "'metric' is required", "snr, angular, bi")],
    ),
    "version-true": (
        """
        recipe: true
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
        """,
        [line("recipe: ^true", "recipe", "version 1", "True")],
    ),
    "rank-true": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: low_rank
            model: a
            modules: [mlp.down_proj]
            rank: true
        """,
        [line("rank: ^true", "steps[0].rank", "valid integer", "True")],
    ),
    "boolean-as-text": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
            allow_super_weight_loss: "yes"
        """,
        [line('allow_super_weight_loss: ^"yes"', "steps[0].allow_super_weight_loss", "valid boolean", "'yes'")],
    ),
    "negative-min-effect": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: protect_super_weights
            model: a
            min_effect: -0.1
        """,
        [line("min_effect: ^-0.1", "steps[0].min_effect", "greater than or equal to 0")],
    ),
    "min-effect-as-percent-text": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: protect_super_weights
            model: a
            min_effect: 10%
        """,
        [line("min_effect: ^10%", "steps[0].min_effect", "valid number", "'10%'")],
    ),
    "verify-as-text": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: protect_super_weights
            model: a
            verify: "no"
        """,
        [line('verify: ^"no"', "steps[0].verify", "valid boolean", "'no'")],
    ),
    "verify-tokens-too-few": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: protect_super_weights
            model: a
            verify_tokens: 1
        """,
        [line("verify_tokens: ^1", "steps[0].verify_tokens", "greater than or equal to 2")],
    ),
    "verification-settings-without-verification": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: protect_super_weights
            model: a
            verify: false
            min_effect: 0.2
            verify_text: calib.txt
        """,
        [line("  - ^op: protect_super_weights", "steps[0]", "min_effect, verify_text only apply with verify: true")],
    ),
    "verification-of-given-coordinates": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: protect_super_weights
            model: a
            coordinates: [{layer: 1, row: 2, column: 3}]
            min_effect: 0.2
        """,
        [line("  - ^op: protect_super_weights", "steps[0]", "verification applies to found candidates",
              "give text to search as well")],
    ),
    "number-as-text": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - id: moe
            op: stack_experts
            base: a
            experts: [{model: a}, {model: a}]
          - op: init_gates
            model: moe
            mode: random
            seed: "3"
        """,
        [line('seed: ^"3"', "steps[1].seed", "valid integer", "'3'")],
    ),
    "infinite-noise": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - id: moe
            op: stack_experts
            base: a
            experts: [{model: a, noise_scale: .inf}, {model: a, residual_scale: .nan}]
          - op: init_gates
            model: moe
            mode: random
            std: .inf
        """,
        [line("noise_scale: ^.inf", "steps[0].experts[0].noise_scale", "finite number", "inf"),
         line("residual_scale: ^.nan", "steps[0].experts[1].residual_scale", "finite number", "nan"),
         line("std: ^.inf", "steps[1].std", "finite number", "inf")],
    ),
    "recursive-alias": (
        """
        recipe: 1
        models: &m {a: *m}
        steps:
          - op: drop_layers
            model: a
            layers: [1]
        """,
        [line("models: ^&m {a: *m}", "", "recursive YAML alias")],
    ),
    "blank-description": (
        """
        recipe: 1
        description: "   "
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
        """,
        [line('description: ^"   "', "description", "description is blank")],
    ),
    "misspelt-step-key": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layer: [1]
        """,
        [line("^layer: [1]", "steps[0].layer", "unknown key 'layer'", "did you mean 'layers'?")],
    ),
    "misspelt-top-level-key": (
        """
        recipe: 1
        models:
          a: ./llama
        step:
          - op: drop_layers
            model: a
            layers: [1]
        """,
        [line("^step:", "step", "unknown key 'step'", "did you mean 'steps'?"),
         line("^recipe: 1", "steps", "missing required key 'steps'")],
    ),
    "misspelt-output-key": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
        output:
          dtyp: bfloat16
        """,
        [line("^dtyp: bfloat16", "output.dtyp", "unknown key 'dtyp'", "did you mean 'dtype'?")],
    ),
    "layers-wrong-type": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: "three"
        """,
        [line('layers: ^"three"', "steps[0].layers", "list", "'three'")],
    ),
    "steps-not-a-list": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          op: drop_layers
          model: a
          layers: [1]
        """,
        [line("^op: drop_layers", "steps", "list")],
    ),
    "no-steps": (
        """
        recipe: 1
        models:
          a: ./llama
        steps: []
        """,
        [line("steps: ^[]", "steps", "at least 1")],
    ),
    "model-name-with-space": (
        """
        recipe: 1
        models:
          my model: ./llama
        steps:
          - op: drop_layers
            model: my model
            layers: [1]
        """,
        # the mistake is the name, i.e. the key, not the path after it
        [line("^my model: ./llama", "models.my model")],
    ),
    "negative-layer-index": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1, -1]
        """,
        [line("layers: [1, ^-1]", "steps[0].layers[1]", "count from 0", "-1")],
    ),
    "reversed-layer-range": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [[3, 1]]
        """,
        [line("layers: [^[3, 1]]", "steps[0].layers[0]", "start < end", "[3, 1]")],
    ),
    "slice-range-of-one-number": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: slice_layers
            slices:
              - model: a
                range: [2]
        """,
        # a list of one number is not a mapping with a missing key '1': say what a range is
        [line("range: ^[2]", "steps[0].slices[0].range", "start", "end")],
    ),
    "unknown-output-dtype": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
        output:
          dtype: bf16
        """,
        [line("dtype: ^bf16", "output.dtype", "'bf16'", "did you mean 'bfloat16'?")],
    ),
    "unknown-compute-dtype": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: merge
            method: linear
            models: [{model: a, weight: 1}]
            compute_dtype: bf16
        """,
        [line("compute_dtype: ^bf16", "steps[0].compute_dtype", "'bf16'", "did you mean 'bfloat16'?", "float64")],
    ),
    "compute-dtype-not-a-name": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: merge
            method: linear
            models: [{model: a, weight: 1}]
            compute_dtype: 16
        """,
        [line("compute_dtype: ^16", "steps[0].compute_dtype", "'float32'", "got 16")],
    ),
    "unparsable-shard-size": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
        output:
          shard_size: 2XB
        """,
        [line("shard_size: ^2XB", "output.shard_size", "'2XB'", "2GB")],
    ),
    "zero-shard-size": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
        output:
          shard_size: 0
        """,
        [line("shard_size: ^0", "output.shard_size", "positive")],
    ),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(SCHEMA_CASES))
def test_schema_mistake(work: Path, capsys, case: str, command: str) -> None:
    template, lines = SCHEMA_CASES[case]
    assert_recipe_refused(work, capsys, command, yaml_text(template), lines)


@pytest.mark.parametrize("case", ["yaml-syntax-error", "tab-indenting-a-model", "python-object-tag", "unknown-op",
                                  "misspelt-step-key", "layers-wrong-type", "unsupported-version",
                                  "unknown-output-dtype", "unknown-compute-dtype"])
def test_schema_mistake_schema_only(tmp_path: Path, capsys, case: str) -> None:
    """`validate --schema-only` opens no model, so the recipe text alone must be refused the same way."""
    template, lines = SCHEMA_CASES[case]
    text = yaml_text(template)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")

    result = cli(capsys, "validate", "--schema-only", recipe)

    assert_refused(result, [(ln.prefix(recipe, text), ln.words) for ln in lines])


# --------------------------------------------------------------------------- the recipe file itself


RECIPE_FILE_CASES = {
    # id -> (what to put at the recipe path: bytes, "missing" or "directory"; words of the message)
    "empty-file": (b"", ("the recipe is empty",)),
    "only-comments": (b"# TODO: write the recipe\n\n", ("the recipe is empty",)),
    "binary-file": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ("binary file", "not a YAML recipe")),
    "latin-1-text": ("recipe: 1\ndescription: llama sans la couche \xe9\n".encode("latin-1"), ("not UTF-8",)),
    "recipe-file-missing": ("missing", ("cannot read the recipe", "No such file")),
    "recipe-is-a-directory": ("directory", ("is a directory",)),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(RECIPE_FILE_CASES))
def test_unusable_recipe_file(tmp_path: Path, capsys, case: str, command: str) -> None:
    content, words = RECIPE_FILE_CASES[case]
    recipe = tmp_path / "recipe.yaml"
    if content == "directory":
        recipe.mkdir()
    elif content != "missing":
        recipe.write_bytes(content)
    out = tmp_path / "OUT"
    before = snapshot(tmp_path)

    result = invoke(capsys, command, recipe, out)

    # no line or column to give: the file itself is named
    assert_refused(result, [(f"{recipe}: ", words)])
    assert_no_output(out)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- several problems, one report


def test_validate_reports_every_schema_problem(work: Path, capsys) -> None:
    text = yaml_text("""
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layer
            model: a
            layers: [1]
          - op: slice_layers
            slices:
              - model: a
                range: [3, 1]
        output:
          dtype: bf16
          shard_size: 2XB
        """)
    recipe = work / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")

    result = cli(capsys, "validate", recipe)

    expected = [
        line("op: ^drop_layer", "steps[0].op", "unknown op 'drop_layer'", "did you mean 'drop_layers'?"),
        line("range: ^[3, 1]", "steps[1].slices[0].range", "start < end"),
        line("dtype: ^bf16", "output.dtype", "'bf16'"),
        line("shard_size: ^2XB", "output.shard_size", "'2XB'"),
    ]
    assert_refused(result, [(ln.prefix(recipe, text), ln.words) for ln in expected])


def test_a_shard_size_that_is_neither_text_nor_a_number_is_located(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("recipe: 1\nmodels: {a: ./a}\nsteps: [{op: drop_layers, model: a, layers: [1]}]\n"
                      "output: {shard_size: 1.5}\n")
    result = cli(capsys, "validate", "--schema-only", recipe)
    assert_refused(result, [(f"{recipe}:4:22: output.shard_size: ", ("expected a size such as 2GB", "1.5"))])


@pytest.mark.parametrize("source", ["/dev/zero", "huge"])
def test_a_file_too_large_to_be_a_recipe_is_refused_at_once(tmp_path: Path, capsys, source: str) -> None:
    path = Path(source) if source.startswith("/") else tmp_path / "huge.yaml"
    if not source.startswith("/"):
        path.write_bytes(b"# " + b"x" * (5 * 2**20))
    import time

    start = time.perf_counter()
    result = cli(capsys, "validate", path)
    assert time.perf_counter() - start < 2
    assert_refused(result, [(f"{path}: ", ("larger than", "is it a recipe?"))])


def test_nesting_that_no_recipe_has_is_refused(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("recipe: 1\nmodels: " + "[" * 700 + "]" * 700 + "\n")
    assert_refused(cli(capsys, "validate", recipe), [(f"{recipe}", ("nested more than 64 levels",))])


def test_a_control_character_is_one_located_line(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"recipe: 1\nmodels: {a: ./llama}\nsteps:\n  - {op: drop_layers, model: a, layers: [1]}\x07\n")
    assert_refused(cli(capsys, "validate", recipe), [(f"{recipe}:4:45: ", ("control character U+0007",))])


def test_a_recipe_with_more_values_than_any_recipe_is_refused_fast(tmp_path: Path, capsys) -> None:
    import time

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("recipe: 1\nmodels: {a: ./llama}\nsteps:\n  - {op: drop_layers, model: a, layers: ["
                      + "1, " * 300_000 + "1]}\n")
    start = time.perf_counter()
    result = cli(capsys, "validate", recipe)
    assert time.perf_counter() - start < 1.0
    assert_refused(result, [(f"{recipe}: ", ("more than 20000 values",))])


def test_an_overlong_prompt_is_refused_before_any_forward(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("recipe: 1\nmodels: {a: ./llama}\nsteps:\n  - {id: m, op: stack_experts, base: a, experts: "
                      "[{model: a, positive: ['" + "word " * 2000 + "']}, {model: a}]}\n"
                      "  - {op: init_gates, model: m, mode: hidden}\n")
    result = cli(capsys, "validate", "--schema-only", recipe)
    assert_refused(result, [(f"{recipe}:4:", ("steps[0].experts[0].positive[0]", "at most 4000 characters"))])
