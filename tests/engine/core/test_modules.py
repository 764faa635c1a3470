"""Modules named as in Llama address the right rows of a fused layout (Phi-3's qkv_proj and gate_up_proj)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from recipekit.engine.cli import main
from recipekit.engine.core.rmt import snr
from tests.tiny import load_causal_lm, make_model, read_config, tensors_of, write_recipe

Q, KV, INTERMEDIATE = 4 * 8, 2 * 8, 64  # make_model: 4 heads, 2 key-value heads, head_dim 8
ROWS = {"self_attn.q_proj": ("self_attn.qkv_proj", 0, Q), "self_attn.k_proj": ("self_attn.qkv_proj", Q, Q + KV),
        "self_attn.v_proj": ("self_attn.qkv_proj", Q + KV, Q + 2 * KV),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0, INTERMEDIATE),
        "mlp.up_proj": ("mlp.gate_up_proj", INTERMEDIATE, 2 * INTERMEDIATE)}
PLANTED = {0: 3, 1: 1, 2: 2}  # layer -> rank of the strong signal planted in its v rows


def by_hand(tensors: dict, layer: int, module: str) -> torch.Tensor:
    fused, start, end = ROWS[module]
    return tensors[f"model.layers.{layer}.{fused}.weight"][start:end]


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """A tiny Phi-3 whose v rows of qkv_proj hold a strong low-rank signal (rank PLANTED[layer]) over noise, so
    their SNR differs from the q and k rows around them."""
    path = make_model(tmp_path_factory.mktemp("models") / "phi3", family="phi3", layers=3)
    tensors = tensors_of(path)
    generator = torch.Generator().manual_seed(3)
    for layer, rank in PLANTED.items():
        name = f"model.layers.{layer}.self_attn.qkv_proj.weight"
        signal = torch.randn(KV, rank, generator=generator) @ torch.randn(rank, 32, generator=generator)
        tensors[name][Q + KV:] = 0.01 * torch.randn(KV, 32, generator=generator) + signal
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def analyze(capsys, *argv) -> list[dict]:
    assert main(["analyze", *map(str, argv), "--metric", "snr", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["rows"]


def test_snr_of_a_fused_module_is_the_snr_of_its_rows(phi3, capsys):
    tensors = tensors_of(phi3)
    rows = analyze(capsys, phi3)
    assert [r["module"] for r in rows[:7]] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    for r in rows:
        if r["module"] in ROWS:
            expected = snr(by_hand(tensors, r["layer"], r["module"]))
            assert (r["snr"], r["signal_values"]) == (expected.snr, expected.signal_values), r
    for i in range(3):  # the planted signal shows in the v rows only
        of = {r["module"]: r["snr"] for r in rows if r["layer"] == i}
        assert of["self_attn.v_proj"] > 20 * max(of["self_attn.q_proj"], of["self_attn.k_proj"]), of
    whole = analyze(capsys, phi3, "--module", "self_attn.qkv_proj")
    assert [r["snr"] for r in whole] == [snr(tensors[f"model.layers.{i}.self_attn.qkv_proj.weight"]).snr
                                         for i in range(3)]


def test_drop_layers_by_the_snr_of_v_proj(phi3, tmp_path):
    tensors = tensors_of(phi3)
    values = [snr(by_hand(tensors, i, "self_attn.v_proj")).snr for i in range(3)]
    lowest = min(range(3), key=values.__getitem__)
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{base: {phi3}}}
        steps: [{{op: drop_layers, model: base, select: {{metric: snr, module: self_attn.v_proj, lowest: 1}}}}]
        """)
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert read_config(tmp_path / "out")["num_hidden_layers"] == 2
    kept = [i for i in range(3) if i != lowest]
    got = tensors_of(tmp_path / "out")
    for j, i in enumerate(kept):
        assert torch.equal(got[f"model.layers.{j}.self_attn.qkv_proj.weight"],
                           tensors[f"model.layers.{i}.self_attn.qkv_proj.weight"])


def rank_k(matrix: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vh[:k]).to(matrix.dtype)


def test_low_rank_of_fused_modules_replaces_their_rows_only(phi3, tmp_path):
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{base: {phi3}}}
        steps: [{{op: low_rank, model: base, modules: [self_attn.v_proj, mlp.gate_proj, mlp.up_proj], rank: 2}}]
        """)
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0
    before, after = tensors_of(phi3), tensors_of(tmp_path / "out")
    for i in range(3):
        qkv = after[f"model.layers.{i}.self_attn.qkv_proj.weight"]
        assert torch.equal(qkv[:Q + KV], before[f"model.layers.{i}.self_attn.qkv_proj.weight"][:Q + KV])
        for module in ("self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            assert torch.equal(by_hand(after, i, module), rank_k(by_hand(before, i, module), 2)), (i, module)
    load_causal_lm(tmp_path / "out")  # a plain Phi-3 still


@pytest.mark.parametrize("step, words", [
    ("{op: drop_layers, model: base, select: {metric: snr, module: self_attn.v_prj, lowest: 1}}",
     ("steps[0].select.module: model 'base' has no module 'self_attn.v_prj' in its layers (did you mean "
      "'self_attn.v_proj'?); its weight matrices: mlp.down_proj, mlp.gate_proj, mlp.gate_up_proj, mlp.up_proj,")),
    ("{op: low_rank, model: base, modules: [mlp.gate_up_prj, mlp.down_proj], rank: 1}",
     ("steps[0].modules[0]: model 'base' has no module 'mlp.gate_up_prj' in its layers (did you mean "
      "'mlp.gate_up_proj'?)",)),
    ("{op: low_rank, model: base, modules: [self_attn.qkv_proj, self_attn.k_proj], rank: 1}",
     ("steps[0].modules: self_attn.qkv_proj and self_attn.k_proj are both in model.layers.0.self_attn.qkv_proj",)),
])
def test_unknown_or_overlapping_modules_are_located(phi3, tmp_path, capsys, step, words):
    recipe = write_recipe(tmp_path, f"recipe: 1\nmodels: {{base: {phi3}}}\nsteps:\n  - {step}\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{recipe}:4:") and err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "out").exists()


def test_a_config_that_does_not_describe_the_fused_rows_is_refused(phi3, tmp_path, capsys):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for file in phi3.iterdir():
        (wrong / file.name).write_bytes(file.read_bytes())
    config = read_config(phi3)
    (wrong / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))
    assert main(["analyze", str(wrong), "--metric", "snr", "--module", "self_attn.v_proj"]) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.qkv_proj.weight has 64 rows, but its config makes self_attn.qkv_proj " \
           "32 (q_proj) + 32 (k_proj) + 32 (v_proj)" in err, err


def test_a_super_weight_named_in_a_fused_module_is_kept_by_low_rank(phi3, tmp_path):
    """Row 3 of mlp.up_proj is row INTERMEDIATE + 3 of gate_up_proj: protected there, low_rank keeps it exactly."""
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{base: {phi3}}}
        steps:
          - {{id: safe, op: protect_super_weights, model: base,
              coordinates: [{{layer: 1, row: 3, column: 5, module: mlp.up_proj}}]}}
          - {{op: low_rank, model: safe, modules: [mlp.up_proj], rank: 1}}
        """)
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0
    before, after = tensors_of(phi3), tensors_of(tmp_path / "out")
    name = "model.layers.1.mlp.gate_up_proj.weight"
    expected = torch.cat([before[name][:INTERMEDIATE], rank_k(before[name][INTERMEDIATE:], 1)])
    expected[INTERMEDIATE + 3, 5] = before[name][INTERMEDIATE + 3, 5]
    assert torch.equal(after[name], expected)
    assert not torch.equal(after[name][INTERMEDIATE + 3], before[name][INTERMEDIATE + 3])
    assert "super weights kept exactly" in (tmp_path / "out" / "README.md").read_text()
