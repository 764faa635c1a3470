"""The output's recipe.yaml: relative local paths made absolute in the text, everything else as written."""
from __future__ import annotations

import textwrap

import yaml

from recipekit.engine import load_recipe
from recipekit.engine.recipe.standalone import standalone


def _standalone(tmp_path, text: str, *, hub_only: bool = False):
    path = tmp_path / "recipes" / "recipe.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    loaded = load_recipe(path)
    return loaded.text, standalone(loaded.text, loaded.recipe, loaded.base_dir, hub_only=hub_only)


def test_relative_paths_become_absolute_in_every_yaml_style(tmp_path):
    (tmp_path / "recipes" / "models").mkdir(parents=True)
    text, got = _standalone(tmp_path, """
        recipe: 1   # the version
        models:
          plain: models/a            # a local folder
          quoted: "./b"
          anchored: &m ../c
          alias: *m
          block: |-
            models/d
          hub: org/e
          absolute: /opt/f
          home: ~/g
        steps:
          - {op: drop_layers, model: plain, select: {metric: bi, count: 1, text: 'calib.txt'}}
        """)
    models = tmp_path / "recipes" / "models"
    data = yaml.safe_load(got.text)
    assert data["models"] == {"plain": str(models / "a"), "quoted": str(tmp_path / "recipes" / "b"),
                              "anchored": str(tmp_path / "c"), "alias": str(tmp_path / "c"),
                              "block": str(models / "d"), "hub": "org/e", "absolute": "/opt/f", "home": "~/g"}
    assert data["steps"][0]["select"]["text"] == str(tmp_path / "recipes" / "calib.txt")
    assert got.absolute == ("models.plain", "models.quoted", "models.anchored", "models.alias",
                            "models.block", "steps[0].select.text")
    assert not got.shareable
    assert "recipe: 1   # the version" in got.text and "# a local folder" in got.text and "&m" in got.text


def test_a_recipe_of_hub_ids_is_kept_byte_for_byte(tmp_path):
    text, got = _standalone(tmp_path, """
        recipe: 1
        models: {a: org/one, b: 'org/two@v1'}
        steps:
          - {op: merge, method: linear, models: [{model: a}, {model: b}]}
        """)
    assert got.text == text and got.absolute == () and got.shareable


def test_a_shared_recipe_is_all_hub_ids_even_where_a_folder_of_that_name_exists(tmp_path):
    (tmp_path / "recipes" / "org" / "one").mkdir(parents=True)
    text, got = _standalone(tmp_path, "recipe: 1\nmodels: {a: org/one}\nsteps: [{op: drop_layers, model: a, "
                                      "layers: [1]}]\n", hub_only=True)
    assert got.text == text and got.shareable
