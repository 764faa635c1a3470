"""`recipe analyze`: SNR against the kernel on the stored weights; angular distance and block influence against transformers."""
from __future__ import annotations

import json
import math

import pytest

from recipekit.engine.cli import main
from recipekit.engine.core.rmt import snr
from tests.tiny import DEMO, make_model, tensors_of


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
    assert "has no module 'mlp.nope' in its layers; its weight matrices: mlp.down_proj" in capsys.readouterr().err


def _reference_residuals(path, sequences):
    """Per text: the residual stream entering every layer, and after the last (pre-norm), from transformers."""
    import torch

    from tests.tiny import load_causal_lm

    model = load_causal_lm(path)
    out = []
    for seq in sequences:
        captured = {}
        hook = model.model.norm.register_forward_hook(lambda m, args, result: captured.setdefault("pre", args[0]))
        with torch.no_grad():
            states = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
        hook.remove()
        out.append([s[0] for s in states[:-1]] + [captured["pre"][0]])
    return out


def test_angular_and_bi_equal_a_direct_computation_with_transformers(tmp_path, capsys):
    import shutil

    import torch

    from recipekit.engine.core.graph import LazyModel
    from recipekit.engine.forward.tokenize import TextTokenizer
    from recipekit.engine.io.source import open_model
    from recipekit.engine.measure.similarity import similarity
    from recipekit.engine.measure.texts import paragraphs

    demo = DEMO / "models" / "llama-a"
    path = make_model(tmp_path / "m", layers=4, vocab_size=258, seed=9)
    shutil.copy(demo / "tokenizer.json", path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text('{"bos_token": "<s>", "add_bos_token": true}')
    texts = paragraphs("The cat sat on the mat.\n\nA much longer second text, to pad the batch.\n\nThird.")
    model = LazyModel.from_source("m", open_model(str(path), base_dir=tmp_path))
    result = similarity(model, "m", texts)

    sequences = [TextTokenizer.of(model.side_files).encode(t) for t in texts]
    ref = _reference_residuals(path, sequences)
    for n in (1, 2, 4):
        expected = []
        for start in range(4 - n + 1):
            cos = torch.stack([torch.nn.functional.cosine_similarity(r[start][-1], r[start + n][-1], dim=0)
                               for r in ref])
            expected.append(float((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean()))
        assert result.angular(n) == pytest.approx(expected, abs=1e-5)
        # --token mean: the distance averaged over every token of every text
        per_token = similarity(model, "m", texts, mean_n=n).angular(n, "mean")
        count = sum(len(s) for s in sequences)
        expected_mean = [sum(float((torch.arccos(torch.nn.functional.cosine_similarity(
            r[start], r[start + n], dim=-1).clamp(-1, 1)) / math.pi).sum()) for r in ref) / count
            for start in range(4 - n + 1)]
        assert per_token == pytest.approx(expected_mean, abs=1e-5)
    tokens = sum(len(s) for s in sequences)
    bi = [1 - sum(float(torch.nn.functional.cosine_similarity(r[i], r[i + 1], dim=-1).sum()) for r in ref) / tokens
          for i in range(4)]
    assert result.bi == pytest.approx(bi, abs=1e-5)
    assert result.tokens == tokens and result.texts == 3

    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(texts))
    assert main(["analyze", str(path), "--metric", "angular", "--n", "2", "--text", str(text), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["distance"] for r in rows] == pytest.approx(result.angular(2), abs=1e-6)
    assert main(["analyze", str(path), "--metric", "bi"]) == 2
    assert "needs --text FILE" in capsys.readouterr().err
