"""A computed tensor is checked before it is written: NaN or infinity that finite inputs did not have (a cast that
overflows float16, a kernel that overflows) is one line, exit 2, nothing written; values already non-finite in an
input pass through as they would in a byte copy."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.bad_inputs.checks import assert_no_output, cli
from tests.tiny import finetune, make_model, write_recipe

WEIGHT = "model.layers.1.mlp.down_proj.weight"


def _with_value(model, value: float):
    """Set one entry of a layer weight of a one-shard model (in place)."""
    (shard,) = model.glob("*.safetensors")
    tensors = load_file(shard)
    tensors[WEIGHT][3, 5] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    return model


@pytest.mark.parametrize("method", [None, "ties"])  # a streamed cast; a whole-tensor merge kernel
def test_a_value_float16_cannot_hold_is_refused(tmp_path, capsys, method):
    base = _with_value(make_model(tmp_path / "base", layers=2, seed=1), 1e6)
    steps = ("  - {op: drop_layers, model: base, layers: [0]}" if method is None else
             "  - {op: merge, method: ties, base: base, models: [{model: other, weight: 1.0, density: 1.0}]}")
    if method is not None:
        finetune(base, tmp_path / "other", seed=2)
    recipe = write_recipe(tmp_path, "recipe: 1\nmodels: {base: base, other: base}\nsteps:\n" + steps +
                          "\noutput: {dtype: float16}\n")
    if method is not None:
        recipe.write_text(recipe.read_text().replace("other: base", "other: other"))
    result = cli(capsys, "run", recipe, "-o", tmp_path / "out")
    assert result.rc == 2 and len(result.err.splitlines()) == 1, result.err
    name = WEIGHT if method is not None else WEIGHT.replace("layers.1", "layers.0")
    assert f"tensor {name!r} would have 1 NaN or infinite value(s) in float16, from finite inputs" in result.err
    assert "largest |input| 1e+06" in result.err and "wider output dtype" in result.err
    assert_no_output(tmp_path / "out")


def test_an_input_that_is_already_infinite_passes_through(tmp_path, capsys):
    base = _with_value(make_model(tmp_path / "base", layers=2, seed=1), float("inf"))
    recipe = write_recipe(tmp_path, "recipe: 1\nmodels: {base: base}\nsteps:\n"
                                    "  - {op: drop_layers, model: base, layers: [0]}\noutput: {dtype: float16}\n")
    assert cli(capsys, "run", recipe, "-o", tmp_path / "out", "-q").rc == 0
    (shard,) = (tmp_path / "out").glob("*.safetensors")
    assert torch.isinf(load_file(shard)[WEIGHT.replace("layers.1", "layers.0")][3, 5])
