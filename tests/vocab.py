"""Three tiny Llamas whose tokenizers differ, and the rows a vocabulary alignment must give them.

`a` (the base) has added special tokens; `b` orders the shared words differently, adds its own and is a padded
checkpoint (40 rows for 30 tokens); `c` has b's tokenizer plus one token of its own. Expected rows follow the rule in
docs/architecture.md, looking every token up through each model's own tokenizer with transformers.
"""
from __future__ import annotations

import torch
import transformers

from tests.tiny import add_word_tokenizer, make_model, tensors_of

COMMON = [f"c{i}" for i in range(20)]
A_ADDED = [("<s>", {"special": True}), ("<|im_start|>", {"special": True}), ("<|im_end|>", {"special": True}),
           ("<tool>", {"lstrip": True})]
B_ADDED = [("<s>", {"special": True}), ("<|im_end|>", {"special": True}), ("<think>", {"special": True})]
# the union, as documented: a's ids, then b's new tokens in b's id order, then c's
UNION = (["<unk>", *COMMON, *[f"a{i}" for i in range(5)], "<s>", "<|im_start|>", "<|im_end|>", "<tool>"]
         + [f"b{i}" for i in range(6)] + ["<think>"] + ["<extra>"])


def vocab_models(tmp_path, tied=False):
    a = add_word_tokenizer(make_model(tmp_path / "a", layers=2, seed=1, vocab_size=30, tied=tied),
                           [*COMMON, *[f"a{i}" for i in range(5)]], A_ADDED)
    b_words = [*[f"b{i}" for i in range(6)], *reversed(COMMON)]
    b = add_word_tokenizer(make_model(tmp_path / "b", layers=2, seed=2, vocab_size=40, tied=tied), b_words, B_ADDED)
    c = add_word_tokenizer(make_model(tmp_path / "c", layers=2, seed=3, vocab_size=31, tied=tied), b_words,
                           [*B_ADDED, ("<extra>", {})])
    return a, b, c


def token_rows(path):
    """token -> (embedding row, lm_head row) of a model, through its own tokenizer (only tokens with a row)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tensors = tensors_of(path)
    embed = tensors["model.embed_tokens.weight"]
    head = tensors.get("lm_head.weight", embed)
    return {t: (embed[i], head[i]) for t, i in tokenizer.get_vocab().items() if i < embed.shape[0]}


def expected_rows(token, models, base, weights):
    """The merged (embedding, lm_head) rows of `token`: each model's own row, else the documented fallback."""
    holders = [m for m in models if token in m]
    if token in base:
        fallback = base[token]
    elif len(holders) == 1:
        fallback = holders[0][token]
    else:
        fallback = tuple(torch.stack([m[token][k] for m in holders]).mean(0) for k in (0, 1))
    per_model = [m.get(token, fallback) for m in models]
    return tuple(sum(w * rows[k] for w, rows in zip(weights, per_model)) / sum(weights) for k in (0, 1))
