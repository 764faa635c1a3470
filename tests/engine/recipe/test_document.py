"""Recipe validation: every problem, located, in file order."""
from __future__ import annotations

import pytest

from recipekit.engine.errors import RecipeError
from recipekit.engine.recipe.document import parse_recipe
from recipekit.engine.recipe.yamlsource import load_yaml


def problems_of(text: str) -> list[str]:
    data, locator = load_yaml(text, "r.yaml")
    with pytest.raises(RecipeError) as info:
        parse_recipe(data, locator)
    return [str(p) for p in info.value.problems]


def test_schema_and_reference_problems_are_reported_together_in_file_order():
    assert problems_of("""\
recipe: 1
models: {a: ./x}
steps:
  - op: drop_layers
    model: b
    layers: [1]
  - op: drop_layers
    id: p
    model: a
    layers: [x]
  - op: slice_layers
    slices: [{model: p, range: [0, 1]}, {model: q, range: [0, 1]}]
output: {tokenizer: z}
""") == [
        "r.yaml:5:12: steps[0].model: unknown model or step 'b'; known here: a",
        "r.yaml:10:14: steps[1].layers[0]: expected a layer index or a [start, end] range (end exclusive), got 'x'",
        "r.yaml:12:49: steps[2].slices[1].model: unknown model or step 'q'; known here: a, p",
        "r.yaml:13:21: output.tokenizer: unknown model 'z'; the tokenizer comes from one of: a",
    ]


def test_nested_unknown_key_suggests_from_the_right_model():
    assert problems_of("""\
recipe: 1
models: {a: ./x}
steps:
  - op: slice_layers
    slices:
      - {model: a, rnage: [0, 2]}
""") == ["r.yaml:6:9: steps[0].slices[0].range: missing required key 'range'",
         "r.yaml:6:20: steps[0].slices[0].rnage: unknown key 'rnage' (did you mean 'range'?); allowed: model, range"]


def test_missing_op_and_missing_keys():
    problems = problems_of("""\
recipe: 1
models: {a: ./x}
steps:
  - model: a
  - op: drop_layers
""")
    assert problems[0] == "r.yaml:4:5: steps[0]: every step needs an 'op': one of drop_layers, slice_layers, expand_layers, add_modules, stack_experts, init_gates, protect_super_weights, low_rank, heal, merge"
    assert "r.yaml:5:5: steps[1].model: missing required key 'model'" in problems


def test_drop_layers_needs_layers_or_a_selector_not_both():
    base = "recipe: 1\nmodels: {a: ./x}\nsteps:\n  - {op: drop_layers, model: a%s}\n"
    message = "give either layers (indices and ranges) or select (a metric), not both or neither"
    assert problems_of(base % "") == [f"r.yaml:4:5: steps[0]: {message}"]
    assert problems_of(base % ", layers: [1], select: {metric: snr, where: infinite}") == [
        f"r.yaml:4:5: steps[0]: {message}"]
    assert problems_of(base % ", select: {metric: snr, where: infinite, lowest: 2}") == [
        "r.yaml:4:41: steps[0].select: give exactly one of where: infinite, below: X, lowest: k"]


def test_top_level_problems():
    assert problems_of("- 1\n- 2\n") == [
        "r.yaml:1:1: a recipe is a mapping with keys recipe, models, steps, output; got list"]
    assert problems_of("recipe: 2\nmodels: {}\nsteps: []\n") == [
        "r.yaml:1:9: recipe: unsupported recipe version 2: this recipekit reads version 1"]
    problems = problems_of("models: {a: x}\nsteps: [{op: drop_layers, model: a, layers: [0]}]\nmodles: 1\n")
    assert "r.yaml:1:1: recipe: missing required key 'recipe'" in problems
    assert "r.yaml:3:1: modles: unknown key 'modles' (did you mean 'models'?); allowed: recipe, description, " \
           "models, steps, output" in problems


def test_duplicate_ids():
    (problem,) = problems_of("""\
recipe: 1
models: {a: ./x}
steps:
  - {id: a, op: drop_layers, model: a, layers: [0]}
""")
    assert problem == "r.yaml:4:10: steps[0].id: id 'a' is already the name of a model or an earlier step"
