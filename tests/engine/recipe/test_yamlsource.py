from __future__ import annotations

import pytest

from recipekit.engine.errors import RecipeError
from recipekit.engine.recipe.yamlsource import load_yaml


def test_values_and_marks():
    data, loc = load_yaml("a: 1\nb:\n  - x\n  - {c: 2.5, d: null, e: true}\n", "f.yaml")
    assert data == {"a": 1, "b": ["x", {"c": 2.5, "d": None, "e": True}]}
    assert loc.where(("b", 1, "c")) == "f.yaml:4:9"
    assert loc.where(("b", 1, "c"), key=True) == "f.yaml:4:6"
    assert loc.where(("b", 0)) == "f.yaml:3:5"
    assert loc.where(("b", 7, "missing")) == "f.yaml:3:3"  # the nearest located parent: the list


def test_dates_stay_text():
    data, _ = load_yaml("when: 2024-01-02\n")
    assert data == {"when": "2024-01-02"}


@pytest.mark.parametrize("text, message, where", [
    ("a: !!python/object/apply:os.system ['true']\n", "not allowed", "f.yaml:1:4"),
    ("a: 1\na: 2\n", "duplicate key 'a'", "f.yaml:2:1"),
    ("base: &b {x: 1}\nother:\n  <<: *b\n", "merge keys", "f.yaml:3:3"),
    ("a:\n\t- 1\n", "tab", "f.yaml:2:1"),
    ("a: [1, 2\n", "YAML syntax error", "f.yaml:1:4"),
    ("", "empty", "f.yaml"),
    ("a: !custom 3\n", "not allowed", "f.yaml:1:4"),
])
def test_refusals_are_located(text, message, where):
    with pytest.raises(RecipeError) as info:
        load_yaml(text, "f.yaml")
    problem = info.value.problems[0]
    assert message in problem.message
    assert problem.where == where


def test_binary_and_non_utf8_are_refused():
    with pytest.raises(RecipeError, match="binary"):
        load_yaml(b"\x00\x01\x02", "f.yaml")
    with pytest.raises(RecipeError, match="UTF-8"):
        load_yaml(b"a: \xff\xfe\n", "f.yaml")


def test_alias_bomb_is_bounded():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    with pytest.raises(RecipeError, match="alias bomb"):
        load_yaml("\n".join(lines) + "\n", "f.yaml")
