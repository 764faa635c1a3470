"""The perplexities the README shows are what `recipe eval` computes, and surgery shows in them."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from recipekit.engine.cli import main

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| `(?P<target>recipes/[^`]+)` \| (?P<layers>\d+) \| (?P<ppl>[\d.]+) \|$", re.M)


def test_readme_perplexities_are_reproduced(capsys, monkeypatch):
    rows = {m["target"]: float(m["ppl"]) for m in ROW.finditer((ROOT / "README.md").read_text())}
    assert set(rows) == {"recipes/demo/models/tiny-story", "recipes/demo/story-drop-middle.yaml",
                         "recipes/demo/story-drop-first.yaml"}
    monkeypatch.chdir(ROOT)
    measured = {}
    for target, written in rows.items():
        capsys.readouterr()
        assert main(["eval", target, "--text", "recipes/demo/heldout.txt", "--seq-len", "256", "--json"]) == 0
        measured[target] = json.loads(capsys.readouterr().out)["perplexity"]
        assert math.isclose(measured[target], written, rel_tol=1e-3), (target, measured[target], written)
    full = measured["recipes/demo/models/tiny-story"]
    middle = measured["recipes/demo/story-drop-middle.yaml"]
    first = measured["recipes/demo/story-drop-first.yaml"]
    assert full < middle < first  # the first layer matters more than two middle ones


def test_the_upcycled_moe_scores_the_dense_perplexity(capsys, monkeypatch):
    """The README says the sparse-upcycling demo computes the dense model until trained."""
    claim = re.search(r"same held-out perplexity,\s+(?P<ppl>[\d.]+)\.", (ROOT / "README.md").read_text())
    assert claim is not None
    monkeypatch.chdir(ROOT)
    scores = []
    for target in ("recipes/demo/story-upcycle.yaml", "recipes/demo/models/tiny-story"):
        capsys.readouterr()
        assert main(["eval", target, "--text", "recipes/demo/heldout.txt", "--seq-len", "256", "--json"]) == 0
        scores.append(json.loads(capsys.readouterr().out)["perplexity"])
    assert math.isclose(scores[0], scores[1], rel_tol=1e-5)
    assert f"{scores[0]:.4f}" == claim["ppl"]
