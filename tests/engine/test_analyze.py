"""`recipe analyze --metric snr`: every layer and module, equal to the kernel on the stored weights."""
from __future__ import annotations

import json
import math

from recipekit.engine.cli import main
from recipekit.ops.snr import snr
from tests.tiny import make_model, tensors_of


def test_snr_table_matches_the_kernel_on_every_weight(tmp_path, capsys):
    path = make_model(tmp_path / "m", layers=3, dtype="bfloat16")
    assert main(["analyze", str(path), "--metric", "snr", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    weights = tensors_of(path)
    assert len(rows) == 3 * 7
    for row in rows:
        expected = snr(weights[f"model.layers.{row['layer']}.{row['module']}.weight"])
        assert row["infinite"] == math.isinf(expected.snr)
        assert row["snr"] == (None if row["infinite"] else expected.snr)
        assert row["signal_values"] == expected.signal_values


def test_snr_of_chosen_modules_and_of_a_recipe(tmp_path, capsys):
    path = make_model(tmp_path / "m", layers=4)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"recipe: 1\nmodels: {{m: {path}}}\nsteps: [{{op: drop_layers, model: m, layers: [0]}}]\n")
    assert main(["analyze", str(recipe), "--metric", "snr", "--module", "self_attn.v_proj", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["layer"], r["module"]) for r in rows] == [(i, "self_attn.v_proj") for i in range(3)]
    direct = snr(tensors_of(path)["model.layers.1.self_attn.v_proj.weight"])
    assert rows[0]["signal_values"] == direct.signal_values  # output layer 0 is input layer 1
    assert main(["analyze", str(path), "--metric", "snr"]) == 0
    assert "self_attn.q_proj" in capsys.readouterr().out
    assert main(["analyze", str(path), "--metric", "snr", "--module", "mlp.nope"]) == 2
    assert "has no mlp.nope in every layer" in capsys.readouterr().err
