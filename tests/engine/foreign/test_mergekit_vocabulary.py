"""mergekit-yaml configs that merge models with different tokenizers (`tokenizer_source: union`, the `tokenizer:`
form, `chat_template`) run unchanged, and every embedding and lm_head row is the token's (tests/vocab.py)."""
from __future__ import annotations

import json

import torch
import transformers
import yaml

from recipekit.engine.cli import main
from tests.tiny import tensors_of
from tests.vocab import UNION, expected_rows, token_rows, vocab_models

MODELS = """\
merge_method: linear
models:
  - {model: ./a, parameters: {weight: 0.5}}
  - {model: ./b, parameters: {weight: 0.3}}
  - {model: ./c, parameters: {weight: 0.2}}
dtype: float32
"""


def _run(tmp_path, capsys, text):
    config = tmp_path / "merge.yml"
    config.write_text(text)
    assert main(["run", str(config), "-o", str(tmp_path / "out"), "-q"]) == 0
    capsys.readouterr()
    assert main(["convert", str(config)]) == 0
    return tmp_path / "out", yaml.safe_load(capsys.readouterr().out)


def test_tokenizer_source_union(tmp_path, capsys):
    models = vocab_models(tmp_path)
    out, recipe = _run(tmp_path, capsys, MODELS + "tokenizer_source: union\n")
    assert recipe["output"]["tokenizer"] == {"source": "union"}
    got = tensors_of(out)
    rows = [token_rows(p) for p in models]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get) == UNION
    for i, token in enumerate(UNION):
        embed, head = expected_rows(token, rows, rows[0], (0.5, 0.3, 0.2))
        torch.testing.assert_close(got["model.embed_tokens.weight"][i], embed, msg=token)
        torch.testing.assert_close(got["lm_head.weight"][i], head, msg=token)


def test_tokenizer_settings_and_chat_template(tmp_path, capsys):
    models = vocab_models(tmp_path)
    text = MODELS + """\
tokenizer:
  pad_to_multiple_of: 16
  tokens:
    "<think>": {source: {kind: model_token, model: ./a, token: "<|im_end|>"}}
    c5: {source: {kind: zero}, force: true}
    "<tool>": {source: ./a}
chat_template: "{% for m in messages %}{{ m['content'] }}{% endfor %}"
"""
    out, recipe = _run(tmp_path, capsys, text)
    assert recipe["output"]["tokenizer"] == {
        "source": "union", "pad_to_multiple_of": 16,
        "tokens": {"<think>": {"source": {"model": "a", "token": "<|im_end|>"}}, "c5": {"source": "zero", "force": True},
                   "<tool>": {"source": "a"}}}
    got = tensors_of(out)["model.embed_tokens.weight"]
    assert got.shape == (48, 32) and torch.count_nonzero(got[len(UNION):]) == 0
    rows = [token_rows(p) for p in models]
    weights = (0.5, 0.3, 0.2)
    think = [rows[0]["<|im_end|>"][0], rows[1]["<think>"][0], rows[2]["<think>"][0]]
    torch.testing.assert_close(got[UNION.index("<think>")], sum(w * r for w, r in zip(weights, think)))
    assert torch.count_nonzero(got[UNION.index("c5")]) == 0
    # not forced: b and c lack <tool>, so a's row is theirs too, which the default rule (the base's row) also gives
    torch.testing.assert_close(got[UNION.index("<tool>")], expected_rows("<tool>", rows, rows[0], weights)[0])
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
