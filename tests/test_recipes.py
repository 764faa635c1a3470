"""Every recipe under recipes/ validates, runs on a fresh clone, loads in transformers,
and holds exactly the layers it says it does."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recipekit.engine import load_recipe
from recipekit.engine.cli import main
from tests.tiny import assert_layers_from, load_causal_lm, read_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "models" not in p.relative_to(ROOT).parts)

# What each recipe must produce: output layer j comes from (model name, layer); other tensors from `base`.
EXPECTED = {
    "recipes/demo/drop-layers.yaml": dict(
        layers=[("base", i) for i in (0, 1, 2, 4, 7)], base="base", dtype=None),
    "recipes/demo/story-drop-middle.yaml": dict(
        layers=[("story", i) for i in (0, 1, 2, 5, 6, 7)], base="story", dtype=None),
    "recipes/demo/story-drop-by-snr.yaml": dict(  # v_proj SNR is lowest in layers 4 and 6
        layers=[("story", i) for i in (0, 1, 2, 3, 5, 7)], base="story", dtype=None),
    "recipes/demo/story-drop-by-angular.yaml": dict(  # inputs of layers 2 and 4 are closest on heldout.txt
        layers=[("story", i) for i in (0, 1, 4, 5, 6, 7)], base="story", dtype=None),
    "recipes/demo/story-drop-first.yaml": dict(
        layers=[("story", i) for i in range(1, 8)], base="story", dtype=None),
    "recipes/demo/frankenmerge.yaml": dict(
        layers=[("a", i) for i in range(4)] + [("b", i) for i in range(3, 8)] + [("b", 7)],
        base="a", dtype=torch.float16),
}


def test_recipes_are_found():
    assert len(RECIPES) >= 2


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_validates_runs_and_holds_what_it_says(path, tmp_path, capsys):
    key = str(path.relative_to(ROOT))
    assert key in EXPECTED, f"add what {key} must produce to EXPECTED"
    want = EXPECTED[key]
    assert main(["validate", str(path)]) == 0
    out = tmp_path / "out"
    assert main(["run", str(path), "-o", str(out), "-q"]) == 0
    assert f"to {out}" in capsys.readouterr().out

    models = {name: (path.parent / ref).resolve() for name, ref in load_recipe(path).recipe.models.items()}
    assert_layers_from(out, [(models[m], i) for m, i in want["layers"]], models[want["base"]], want["dtype"])
    model = load_causal_lm(out)
    assert model.config.num_hidden_layers == len(want["layers"]) == read_config(out)["num_hidden_layers"]
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
    assert (out / "recipe.yaml").read_text() == path.read_text()
    assert (out / "tokenizer.json").is_file() and (out / "README.md").is_file()
