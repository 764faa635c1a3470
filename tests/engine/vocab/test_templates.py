"""The built-in chat templates render each format exactly, through transformers' `apply_chat_template`."""
from __future__ import annotations

import json

import pytest
import transformers

from recipekit.engine.vocab.templates import TEMPLATES
from tests.tiny import add_word_tokenizer, make_model

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello "}, {"role": "user", "content": "Bye"}]
# (the text without a generation prompt, what add_generation_prompt appends)
EXPECTED = {
    "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               "<|im_start|>assistant\nHello <|im_end|>\n<|im_start|>user\nBye<|im_end|>\n",
               "<|im_start|>assistant\n"),
    "llama3": ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "alpaca": ("Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello </s>\n\n### Instruction:\nBye\n\n",
               "### Response:\n"),
    "mistral": ("<s>[INST] Be brief.\n\nHi [/INST]Hello </s>[INST] Bye [/INST]", ""),
    "exaone": ("[|system|]Be brief.[|endofturn|]\n[|user|]Hi\n[|assistant|]Hello [|endofturn|]\n[|user|]Bye\n",
               "[|assistant|]"),
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = add_word_tokenizer(make_model(tmp_path_factory.mktemp("m"), layers=1, vocab_size=8), ["w"],
                              [("<s>", {"special": True}), ("</s>", {"special": True})])
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<s>", "eos_token": "</s>"}))
    return transformers.AutoTokenizer.from_pretrained(path)


def test_every_template_is_tested():
    assert set(EXPECTED) == set(TEMPLATES)


@pytest.mark.parametrize("name", EXPECTED)
def test_template_renders_the_format(tokenizer, name):
    text, prompt = EXPECTED[name]
    for generation, expected in ((False, text), (True, text + prompt)):
        got = tokenizer.apply_chat_template(CHAT, chat_template=TEMPLATES[name], tokenize=False,
                                            add_generation_prompt=generation)
        assert got == expected, (name, generation)


@pytest.mark.parametrize("name", ["chatml", "mistral", "exaone"])
def test_template_without_a_system_message(tokenizer, name):
    """The first message may be the user's: no system part appears."""
    got = tokenizer.apply_chat_template(CHAT[1:], chat_template=TEMPLATES[name], tokenize=False)
    assert got == {"chatml": EXPECTED["chatml"][0].split("<|im_end|>\n", 1)[1],
                   "mistral": "<s>[INST] Hi [/INST]Hello </s>[INST] Bye [/INST]",
                   "exaone": EXPECTED["exaone"][0].split("\n", 1)[1]}[name]
