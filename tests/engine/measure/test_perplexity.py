"""Perplexity with the streamed forward equals the same computation with transformers."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from recipekit.engine.cli import main
from recipekit.engine.core.graph import LazyModel
from recipekit.engine.errors import SourceError
from recipekit.engine.forward.tokenize import TextTokenizer
from recipekit.engine.io.source import open_model
from recipekit.engine.measure.perplexity import perplexity, windows
from tests.tiny import DEMO as DEMO_DIR
from tests.tiny import load_causal_lm, make_model, write_recipe

DEMO = DEMO_DIR / "models" / "llama-a"
TEXT = "The quick brown fox jumps over the lazy dog. " * 12


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    """A tiny fp32 Llama whose vocabulary fits the demo byte-level tokenizer, with BOS added."""
    path = make_model(tmp_path_factory.mktemp("ppl") / "m", layers=3, vocab_size=258, seed=4)
    shutil.copy(DEMO / "tokenizer.json", path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text('{"bos_token": "<s>", "add_bos_token": true}')
    return path


@pytest.mark.parametrize("bos", [None, 256])
@pytest.mark.parametrize("length, seq_len, stride", [(100, 20, 20), (100, 20, 7), (37, 10, 10), (9, 10, 10)])
def test_windows_score_every_token_once(bos, length, seq_len, stride):
    ids = list(range(length))
    body = seq_len - (bos is not None)
    if length < body:
        return
    scored = []
    for tokens, first in windows(ids, bos, seq_len, min(stride, body if bos is not None else body - 1)):
        assert len(tokens) == seq_len and first >= 1
        assert bos is None or tokens[0] == bos
        scored += tokens[first:]
    assert scored == ids[(0 if bos is not None else 1):]


@pytest.mark.parametrize("add_bos", [True, False])
def test_default_stride_and_what_is_scored_are_as_documented(with_tokenizer, tmp_path, add_bos):
    """docs/cli.md: the stride is at most and by default --seq-len - 1; without BOS the first token is not scored."""
    model_dir = tmp_path / "m"
    shutil.copytree(with_tokenizer, model_dir)
    (model_dir / "tokenizer_config.json").write_text(f'{{"bos_token": "<s>", "add_bos_token": {json.dumps(add_bos)}}}')
    model = LazyModel.from_source("m", open_model(str(model_dir), base_dir=Path("/")))
    ids = TextTokenizer.of(model.side_files).encode_plain(TEXT)

    result = perplexity(model, TEXT, text_name="t", seq_len=48)
    assert result.stride == 47
    assert result.tokens == (len(ids) if add_bos else len(ids) - 1)
    assert perplexity(model, TEXT, text_name="t", seq_len=48, stride=47).perplexity == result.perplexity
    with pytest.raises(SourceError, match="at most 47 with --seq-len 48"):
        perplexity(model, TEXT, text_name="t", seq_len=48, stride=48)


def test_perplexity_equals_transformers(with_tokenizer):
    model = LazyModel.from_source("m", open_model(str(with_tokenizer), base_dir=Path("/")))
    tokenizer = TextTokenizer.of(model.side_files)
    assert tokenizer.bos_id == 256
    result = perplexity(model, TEXT, text_name="t", seq_len=48, stride=16)

    reference = load_causal_lm(with_tokenizer)
    total, count = 0.0, 0
    for tokens, first in windows(tokenizer.encode_plain(TEXT), 256, 48, 16):
        with torch.no_grad():
            logits = reference(torch.tensor([tokens])).logits[0]
        total += float(F.cross_entropy(logits[first - 1:-1], torch.tensor(tokens[first:]), reduction="sum"))
        count += len(tokens) - first
    assert result.tokens == count == len(tokenizer.encode_plain(TEXT))
    assert math.isclose(result.perplexity, math.exp(total / count), rel_tol=1e-5)


def test_eval_of_a_recipe_equals_eval_of_its_output(with_tokenizer, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{m: {with_tokenizer}}}
        steps: [{{op: drop_layers, model: m, layers: [1]}}]
        output: {{dtype: bfloat16}}
        """)
    assert main(["eval", str(recipe), "--text", str(text), "--seq-len", "64", "--json"]) == 0
    planned = capsys.readouterr().out
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "out"), "--text", str(text), "--seq-len", "64", "--json"]) == 0

    assert json.loads(planned)["perplexity"] == json.loads(capsys.readouterr().out)["perplexity"]


def _eval_error(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["eval", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err.strip()


def test_eval_bad_inputs(with_tokenizer, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    no_tokenizer = tmp_path / "no-tok"
    shutil.copytree(with_tokenizer, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    granite = make_model(tmp_path / "granite", family="granite", layers=2, vocab_size=258)
    shutil.copy(DEMO / "tokenizer.json", granite / "tokenizer.json")

    assert _eval_error(capsys, with_tokenizer, "--text", empty) == f"{empty}: the text file is empty"
    assert _eval_error(capsys, with_tokenizer, "--text", short) == (
        f"{short}: the text has 9 tokens, fewer than one window of --seq-len 512: use a longer text or a smaller "
        "--seq-len")
    assert _eval_error(capsys, with_tokenizer, "--text", tmp_path / "nope.txt") == f"{tmp_path / 'nope.txt'}: text file not found"
    assert _eval_error(capsys, no_tokenizer, "--text", text, "--seq-len", "32") == (
        f"{no_tokenizer}: model '{no_tokenizer}' has no tokenizer.json (needed to turn text into tokens)")
    assert ("supports model types llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe, phi3, olmo2, gemma2, "
            "gemma3_text; this model is 'granite'") in _eval_error(
        capsys, granite, "--text", text, "--seq-len", "32")
    assert "longer than --seq-len" in _eval_error(capsys, with_tokenizer, "--text", text, "--seq-len", "32",
                                                  "--stride", "64")
    assert "not found" in _eval_error(capsys, tmp_path / "missing-model", "--text", text)


def test_a_text_too_large_is_refused_without_reading_it(tmp_path, capsys):
    from recipekit.engine.cli import main

    assert main(["eval", str(DEMO), "--text", "/dev/zero"]) == 2
    assert capsys.readouterr().err.strip() == ("/dev/zero: the text file is larger than 64 MiB: give an excerpt "
                                               "(measurements use the first texts or tokens only)")


def test_eval_of_a_model_whose_config_the_rules_cannot_use_is_one_line(tmp_path, capsys):
    import json
    import shutil

    from recipekit.engine.cli import main

    model = tmp_path / "m"
    shutil.copytree(DEMO, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="gemma2", sliding_window_pattern=0)
    (model / "config.json").write_text(json.dumps(config))
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 10)
    assert main(["eval", str(model), "--text", str(text), "--seq-len", "4"]) == 2
    assert capsys.readouterr().err.strip() == (f"{model}: config.json: sliding_window_pattern should be a positive "
                                               "integer, got 0")


def test_eval_says_when_max_tokens_cut_the_text(with_tokenizer, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    whole = len(TEXT.encode())  # the byte-level tokenizer: one token per byte

    assert main(["eval", str(with_tokenizer), "--text", str(text), "--seq-len", "64", "--max-tokens", "200"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("perplexity ") and " over 200 tokens (4 windows of 64, stride 63)" in printed.out
    assert printed.err == f"recipe: --max-tokens 200 cut the text: scored the first 200 of its {whole} tokens\n"

    assert main(["eval", str(with_tokenizer), "--text", str(text), "--seq-len", "64", "--json"]) == 0
    printed = capsys.readouterr()
    assert printed.err == ""  # nothing was cut
    assert json.loads(printed.out)["text_tokens"] == json.loads(printed.out)["tokens"] == whole

    assert main(["eval", str(with_tokenizer), "--text", str(text), "--seq-len", "64", "--max-tokens", "63"]) == 0
    assert " over 63 tokens (1 window of 64, stride 63)" in capsys.readouterr().out
