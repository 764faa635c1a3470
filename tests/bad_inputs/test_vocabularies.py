"""Vocabularies that cannot be combined as written: located, exit 2, nothing written (run, validate, plan)."""
from __future__ import annotations

import pytest

from tests.bad_inputs.checks import COMMANDS, assert_recipe_refused, line
from tests.tiny import add_word_tokenizer, make_model

WORDS = [f"w{i}" for i in range(20)]


@pytest.fixture
def work(tmp_path):
    add_word_tokenizer(make_model(tmp_path / "a", layers=2, vocab_size=24), WORDS, [("<s>", {"special": True})])
    add_word_tokenizer(make_model(tmp_path / "b", layers=2, seed=1, vocab_size=32), [*WORDS, "x", "y"])
    make_model(tmp_path / "bare", layers=2, seed=2, vocab_size=24)  # no tokenizer.json
    # as many rows as a, the same words at other ids
    add_word_tokenizer(make_model(tmp_path / "shuffled", layers=2, seed=3, vocab_size=24), WORDS[::-1],
                       [("<s>", {"special": True})])
    return tmp_path


def _recipe(second: str, output: str) -> str:
    """A linear merge of `a` and the model of the `models` entry `second`, then `output` (YAML lines)."""
    other = second.split(":")[0]
    return (f"recipe: 1\nmodels:\n  a: ./a\n  {second}\nsteps:\n  - op: merge\n    method: linear\n"
            f"    models: [{{model: a, weight: 1}}, {{model: {other}, weight: 1}}]\n{output}")


OVERRIDE = 'output:\n  tokenizer:\n    source: union\n    tokens:\n      "{token}": {{source: b}}\n'
CASES = {
    "different sizes need a tokenizer setting": ("b: ./b", "", line(
        "{model: ^b, weight", "steps[0].models[1].model", "[32, 32] in 'b' but [24, 32] in 'a'",
        "different vocabularies", "set output.tokenizer")),
    "the same size, other ids": ("shuffled: ./shuffled", "", line(
        "shuffled: ^./shuffled", "models.shuffled", "'a' (24 embedding rows, 22 tokens) and 'shuffled' (24 "
        "embedding rows, 22 tokens)", "different vocabularies", "tokenizer: {source: union}")),
    "an override naming a token no tokenizer has": ("b: ./b", OVERRIDE.format(token="<tool>"), line(
        '"<tool>": ^{source', "output.tokenizer.tokens.<tool>", "'<tool>' is in no input's tokenizer")),
    "an override row the model lacks": ("b: ./b", OVERRIDE.format(token="<s>"), line(
        '"<s>": {source: ^b}', "output.tokenizer.tokens.<s>.source", "model 'b' has no row for token '<s>'")),
    "a model without tokenizer.json under union": ("bare: ./bare", "output:\n  tokenizer: {source: union}\n", line(
        "bare: ^./bare", "models.bare", "model 'bare' has no tokenizer.json")),
    "an unknown source": ("b: ./b", "output:\n  tokenizer: {source: chat}\n", line(
        "{source: ^chat}", "output.tokenizer.source", "unknown model 'chat'", "one of: a, b")),
    "a chat template from a model that has none": ("b: ./b", "output:\n  tokenizer: {source: union}\n  "
                                                   "chat_template: b\n", line(
        "chat_template: ^b", "output.chat_template", "model 'b' has no chat template")),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", CASES)
def test_refused(work, capsys, command, case):
    second, output, expected = CASES[case]
    assert_recipe_refused(work, capsys, command, _recipe(second, output), [expected])
