"""Merging, stacking and slicing models whose tokenizers differ: the output tokenizer and every embedding and
lm_head row (the models and the expected rows: tests/vocab.py)."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from recipekit.engine import load_recipe
from tests.tiny import load_causal_lm, make_model, tensors_of, write_recipe
from tests.vocab import A_ADDED, B_ADDED, UNION, expected_rows, token_rows, vocab_models


def _linear(tmp_path, output: str, models=("a", "b", "c"), weights=(0.5, 0.3, 0.2)):
    """A linear merge of `models` whose `output` mapping is `output` (YAML flow style)."""
    entries = ", ".join(f"{{model: {m}, weight: {w}}}" for m, w in zip(models, weights))
    listed = ", ".join(f"{m}: ./{m}" for m in models)
    return write_recipe(tmp_path, f"recipe: 1\nmodels: {{{listed}}}\nsteps:\n  - {{op: merge, method: linear, "
                                  f"models: [{entries}]}}\noutput: {output}\n")


def test_union_merge_gives_every_token_itstoken_rows(tmp_path):
    a, b, c = vocab_models(tmp_path)
    out = tmp_path / "out"
    load_recipe(_linear(tmp_path, "{tokenizer: {source: union}}")).run(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])] == UNION
    got = tensors_of(out)
    assert got["model.embed_tokens.weight"].shape == (len(UNION), 32)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(UNION)
    rows = [token_rows(p) for p in (a, b, c)]
    for i, token in enumerate(UNION):
        embed, head = expected_rows(token, rows, rows[0], (0.5, 0.3, 0.2))
        torch.testing.assert_close(got["model.embed_tokens.weight"][i], embed, msg=token)
        torch.testing.assert_close(got["lm_head.weight"][i], head, msg=token)
    load_causal_lm(out)  # transformers loads the model


def test_union_tokenizer_encodes_every_added_token_with_its_flags(tmp_path):
    vocab_models(tmp_path)
    out = tmp_path / "out"
    load_recipe(_linear(tmp_path, "{tokenizer: {source: union}}")).run(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "<s> c3 <|im_start|> a1 b2 <think> c19 <tool> <extra> <|im_end|>"
    assert tokenizer.encode(text, add_special_tokens=False) == [UNION.index(t) for t in text.split()]
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    sources = [transformers.AutoTokenizer.from_pretrained(tmp_path / m).added_tokens_decoder for m in "abc"]
    special = {t.content for decoder in sources for t in decoder.values() if t.special}
    assert {"<s>", "<|im_start|>", "<|im_end|>", "<think>"} <= special
    assert {name for name, t in added.items() if t.special} == special
    assert added["<tool>"].lstrip and not added["<tool>"].special
    assert not (out / "vocab.json").exists()
    config = json.loads((out / "tokenizer_config.json").read_text())
    decoder = {v["content"]: (int(i), v["special"]) for i, v in config["added_tokens_decoder"].items()}
    assert decoder == {t: (UNION.index(t), flags.get("special", False))
                       for t, flags in [*A_ADDED, *B_ADDED, ("<extra>", {})]}


def test_plan_shows_sizes_and_where_rows_came_from(tmp_path):
    vocab_models(tmp_path)
    plan = load_recipe(_linear(tmp_path, "{tokenizer: {source: union, pad_to_multiple_of: 16}}")).plan()
    report = plan.model.vocabulary
    assert (report.tokens, report.rows) == (len(UNION), 48)
    assert report.inputs == (("a", 30, 30), ("b", 30, 40), ("c", 31, 31))
    counts = dict(report.counts)
    # a lacks b0..b5 and <think> (b and c have them: averaged) and <extra> (c's only)
    assert counts["a"] == {"own": 30, "mean": 7, "only": 1, "padding": 10}
    assert counts["b"] == {"own": 30, "base": 7, "only": 1, "padding": 10}
    assert report.rowless == ()
    assert any(m.startswith("vocabulary (union): a (30 tokens, 30 rows)") for m in plan.model.messages)


def test_overrides_zero_and_padding(tmp_path):
    a, b, c = vocab_models(tmp_path)
    out = tmp_path / "out"
    overrides = ('{"<think>": {source: {model: a, token: "<|im_end|>"}}, c5: {source: zero, force: true}, '
                 '"<tool>": {source: a, force: true}}')
    load_recipe(_linear(tmp_path, f"{{tokenizer: {{source: union, pad_to_multiple_of: 16, tokens: {overrides}}}}}"
                        )).run(out)
    got = tensors_of(out)["model.embed_tokens.weight"]
    assert got.shape == (48, 32) and json.loads((out / "config.json").read_text())["vocab_size"] == 48
    assert torch.count_nonzero(got[len(UNION):]) == 0  # padding rows
    rows = [token_rows(p) for p in (a, b, c)]
    weights = (0.5, 0.3, 0.2)

    def merged(per_model):
        return sum(w * r for w, r in zip(weights, per_model)) / sum(weights)

    # a lacks <think>: its row is a's <|im_end|>; b and c keep their own
    think = merged([rows[0]["<|im_end|>"][0], rows[1]["<think>"][0], rows[2]["<think>"][0]])
    torch.testing.assert_close(got[UNION.index("<think>")], think)
    assert torch.count_nonzero(got[UNION.index("c5")]) == 0  # forced zero in every model
    torch.testing.assert_close(got[UNION.index("<tool>")], rows[0]["<tool>"][0])  # forced: a's row in every model
    for token in ("c0", "b3", "a2"):  # the others as before
        torch.testing.assert_close(got[UNION.index(token)], expected_rows(token, rows, rows[0], weights)[0])
    load_causal_lm(out)


def test_tied_embeddings_stay_tied(tmp_path):
    a, b, c = vocab_models(tmp_path, tied=True)
    out = tmp_path / "out"
    load_recipe(_linear(tmp_path, "{tokenizer: {source: union}}")).run(out)
    got = tensors_of(out)
    assert "lm_head.weight" not in got
    rows = [token_rows(p) for p in (a, b, c)]
    for i, token in enumerate(UNION):
        torch.testing.assert_close(got["model.embed_tokens.weight"][i], expected_rows(token, rows, rows[0],
                                                                                  (0.5, 0.3, 0.2))[0])
    model = load_causal_lm(out)
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_another_models_padded_vocabulary(tmp_path):
    """source: b keeps b's tokenizer and its 40 rows (a padded checkpoint); a's rows move to b's ids, and the
    config's special token ids follow."""
    a, b, _ = vocab_models(tmp_path)
    config = json.loads((a / "config.json").read_text())
    (a / "config.json").write_text(json.dumps({**config, "bos_token_id": 26, "eos_token_id": [28, 25],
                                               "sep_token_id": 28, "decoder_start_token_id": 26}))
    (a / "generation_config.json").write_text(json.dumps({"bos_token_id": 26, "eos_token_id": 28}))
    (b / "generation_config.json").write_text(json.dumps({"bos_token_id": 27, "eos_token_id": [28, 29]}))
    out = tmp_path / "out"
    load_recipe(_linear(tmp_path, "{tokenizer: {source: b}}", models=("a", "b"), weights=(0.5, 0.5))).run(out)
    assert (out / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    got = tensors_of(out)
    assert got["model.embed_tokens.weight"].shape == (40, 32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    rows = [token_rows(a), token_rows(b)]
    for token, i in tokenizer.get_vocab().items():
        embed, head = expected_rows(token, rows, rows[1], (0.5, 0.5))
        torch.testing.assert_close(got["model.embed_tokens.weight"][i], embed, msg=token)
        torch.testing.assert_close(got["lm_head.weight"][i], head, msg=token)
    assert torch.count_nonzero(got["model.embed_tokens.weight"][30:]) == 0
    config = json.loads((out / "config.json").read_text())
    # a's <s> (26) is b's 27, <|im_end|> (28) is b's 28, a4 (25) is not in b's vocabulary
    assert (config["vocab_size"], config["bos_token_id"], config["eos_token_id"]) == (40, 27, [28])
    assert (config["sep_token_id"], config["decoder_start_token_id"]) == (28, 27)
    # the generation config is the vocabulary source's own, so its ids are already the output's: b's <s>, ...
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert tokenizer.convert_ids_to_tokens([generation.bos_token_id, *generation.eos_token_id]) == \
        ["<s>", "<|im_end|>", "<think>"]


def test_chat_template_from_a_model(tmp_path):
    _, b, _ = vocab_models(tmp_path)
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    config = json.loads((b / "tokenizer_config.json").read_text())
    (b / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    (tmp_path / "a" / "chat_template.jinja").write_text("{{ 'a template' }}")
    out = tmp_path / "out"
    load_recipe(_linear(tmp_path, "{tokenizer: {source: union}, chat_template: b}")).run(out)
    assert not (out / "chat_template.jinja").exists()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == template
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "c1 b2"}], tokenize=False)
    assert chat == "<|im_start|>c1 b2<|im_end|>"
    lock = json.loads((out / "recipe.lock").read_text())
    assert "tokenizer_config.json" in lock["inputs"]["b"]["files"] and "tokenizer.json" in lock["inputs"]["c"]["files"]


def test_union_special_tokens_map_has_every_models_extra_special_tokens(tmp_path):
    """The base's special tokens map, plus the others' additional special tokens the union has, after the base's;
    and the config model's token ids where the union keeps the base's ids."""
    a, b, c = vocab_models(tmp_path)
    (a / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}))
    (b / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": [{"content": "<think>", "special": True}, "<|im_end|>", "<ghost>"]}))
    config = json.loads((c / "tokenizer_config.json").read_text())
    (c / "tokenizer_config.json").write_text(json.dumps({**config, "extra_special_tokens": ["<extra>"]}))
    (a / "generation_config.json").write_text(json.dumps({"bos_token_id": 26, "eos_token_id": 28}))
    out = tmp_path / "out"
    load_recipe(_linear(tmp_path, "{tokenizer: {source: union}}")).run(out)
    written = json.loads((out / "special_tokens_map.json").read_text())
    assert written["bos_token"] == "<s>"
    assert written["additional_special_tokens"] == [  # <ghost> is in no tokenizer, so not in the union
        "<|im_start|>", "<|im_end|>", {"content": "<think>", "special": True}, "<extra>"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.extra_special_tokens == ["<|im_start|>", "<|im_end|>", "<think>", "<extra>"]
    assert tokenizer.bos_token == "<s>"
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert tokenizer.convert_ids_to_tokens([generation.bos_token_id, generation.eos_token_id]) == ["<s>", "<|im_end|>"]


def test_chat_template_by_name(tmp_path):
    """A built-in name is the format's template; a model of the recipe with that name comes first."""
    vocab_models(tmp_path)
    out = tmp_path / "out"
    load_recipe(_linear(tmp_path, "{tokenizer: {source: union}, chat_template: llama3}")).run(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    tokenizer.bos_token = "<s>"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "c1"}], tokenize=False)
    assert chat == "<s><|start_header_id|>user<|end_header_id|>\n\nc1<|eot_id|>"
    (tmp_path / "chatml").symlink_to(tmp_path / "b")
    (tmp_path / "b" / "chat_template.jinja").write_text("{{ 'the model called chatml' }}")
    recipe = write_recipe(tmp_path, "recipe: 1\nmodels: {a: ./a, chatml: ./chatml}\nsteps:\n  - {op: merge, "
                                    "method: linear, models: [{model: a, weight: 1}, {model: chatml, weight: 1}]}\n"
                                    "output: {tokenizer: {source: union}, chat_template: chatml}\n", "named.yaml")
    load_recipe(recipe).run(tmp_path / "named")
    named = transformers.AutoTokenizer.from_pretrained(tmp_path / "named")
    assert named.apply_chat_template([{"role": "user", "content": "c1"}], tokenize=False) == "the model called chatml"


def test_frankenmerge_takes_embeddings_from_one_and_head_from_another(tmp_path):
    a, b, _ = vocab_models(tmp_path)
    recipe = write_recipe(tmp_path, """
        recipe: 1
        models: {a: ./a, b: ./b}
        steps:
          - op: slice_layers
            slices: [{model: a, range: [0, 2]}, {model: b, range: [0, 2]}]
            head: b
        output: {tokenizer: {source: union}}
        """)
    out = tmp_path / "out"
    load_recipe(recipe).run(out)
    got = tensors_of(out)
    rows = [token_rows(a), token_rows(b)]
    union = UNION[:-1]  # c is not an input
    assert got["model.embed_tokens.weight"].shape[0] == got["lm_head.weight"].shape[0] == len(union)
    for i, token in enumerate(union):
        torch.testing.assert_close(got["model.embed_tokens.weight"][i], expected_rows(token, rows, rows[0], (1, 0))[0])
        torch.testing.assert_close(got["lm_head.weight"][i], expected_rows(token, rows, rows[0], (0, 1))[1])
    load_causal_lm(out)


STACK = """\
recipe: 1
models: {a: ./a, b: ./b}
steps:
  - {id: moe, op: stack_experts, base: a, experts: [{model: a}, {model: b}]}
  - {op: init_gates, model: moe, mode: random}
"""


def test_stacked_experts_share_the_base_embeddings(tmp_path):
    a, b, _ = vocab_models(tmp_path)
    out = tmp_path / "out"
    load_recipe(write_recipe(tmp_path, STACK + "output: {tokenizer: {source: union}}\n")).run(out)
    got = tensors_of(out)
    rows = [token_rows(a), token_rows(b)]
    for i, token in enumerate(UNION[:-1]):
        embed, head = expected_rows(token, rows, rows[0], (1, 0))
        torch.testing.assert_close(got["model.embed_tokens.weight"][i], embed)
        torch.testing.assert_close(got["lm_head.weight"][i], head)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("c1 b2 <think>", return_tensors="pt").input_ids
    assert ids.tolist() == [[UNION.index(t) for t in ("c1", "b2", "<think>")]]
    assert load_causal_lm(out)(ids).logits.shape == (1, 3, len(UNION) - 1)


def test_measuring_an_aligned_model_tokenises_as_it_was_trained(tmp_path):
    """With b as the base, a's ids move; a's text is tokenised with a's own tokenizer, then each id moved to the
    row the union gave that token (what a measuring step on `a` reads)."""
    from recipekit.engine.forward.tokenize import TextTokenizer
    from recipekit.engine.measure.perplexity import perplexity
    from recipekit.engine.run.build import open_inputs
    from recipekit.engine.vocab.align import align

    _, b, _ = vocab_models(tmp_path)
    recipe = load_recipe(write_recipe(tmp_path, """
        recipe: 1
        models: {a: ./a, b: ./b}
        steps:
          - {op: merge, method: linear, base: b, models: [{model: b, weight: 1}, {model: a, weight: 1}]}
        output: {tokenizer: {source: union}}
        """))
    a = align(recipe.recipe, open_inputs(recipe.recipe, recipe.locator, recipe.base_dir)).models["a"]
    theirs = transformers.AutoTokenizer.from_pretrained(b).get_vocab()
    union = [*sorted(theirs, key=theirs.get), *[f"a{i}" for i in range(5)], "<|im_start|>", "<tool>"]
    text = "<s> c19 a0 <tool> c3"
    assert TextTokenizer.of(a.side_files, a.token_rows).encode(text) == [union.index(t) for t in text.split()]
    assert perplexity(a, text, text_name="t", seq_len=4).perplexity > 1


def test_aligned_rows_stream_from_the_files(tmp_path, monkeypatch):
    """A linear merge of aligned inputs, and rows gathered for one model, are written a block of rows at a time
    straight from the input files, never as whole tensors."""
    from recipekit.engine.run import evaluate

    a, b, c = vocab_models(tmp_path)
    recipe = load_recipe(_linear(tmp_path, "{tokenizer: {source: union, pad_to_multiple_of: 16}}"))
    assert all(t.is_rowwise for t in recipe.plan().tensors if "embed" in t.name or "lm_head" in t.name)
    monkeypatch.setattr(evaluate, "CAST_CHUNK_BYTES", 512)  # blocks of a row or two

    class NoWholeTensors:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a vocabulary tensor went through the whole-tensor evaluator")

    monkeypatch.setattr(evaluate, "Evaluator", NoWholeTensors)
    got = tensors_of(recipe.run(tmp_path / "out").out)
    rows = [token_rows(p) for p in (a, b, c)]
    for i, token in enumerate(UNION):
        embed, head = expected_rows(token, rows, rows[0], (0.5, 0.3, 0.2))
        torch.testing.assert_close(got["model.embed_tokens.weight"][i], embed, msg=token)
        torch.testing.assert_close(got["lm_head.weight"][i], head, msg=token)
    assert torch.count_nonzero(got["lm_head.weight"][len(UNION):]) == 0


def test_tokens_without_a_row_anywhere(tmp_path):
    """d has a's tokenizer but only 25 rows, so a4, <|im_start|> and <tool> have a row in no input: the plan names
    them, and `missing: mean` gives each model the mean of its rows up to its last token."""
    _, b, _ = vocab_models(tmp_path)
    d = make_model(tmp_path / "d", layers=2, seed=4, vocab_size=25)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).write_bytes((tmp_path / "a" / name).read_bytes())
    recipe = load_recipe(_linear(tmp_path, "{tokenizer: {source: union, missing: mean}}", models=("d", "b"),
                                 weights=(0.5, 0.5)))
    plan = recipe.plan()
    assert plan.model.vocabulary.rowless == ("a4", "<|im_start|>", "<tool>")
    assert any("no input has a row for 3 tokens: 'a4', '<|im_start|>', '<tool>'" in m for m in plan.model.messages)
    out = recipe.run(tmp_path / "out").out
    got, ours, theirs = tensors_of(out), tensors_of(d), tensors_of(b)
    ids = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        want = (ours[name][:25].double().mean(0).float() + theirs[name][:30].double().mean(0).float()) / 2
        for token in ("a4", "<|im_start|>", "<tool>"):
            torch.testing.assert_close(got[name][ids[token]], want, msg=token)


def test_chat_template_auto_takes_the_one_most_inputs_share(tmp_path):
    a, b, c = vocab_models(tmp_path)
    (a / "chat_template.jinja").write_text("{{ 'only a' }}")
    shared = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    for model in (b, c):
        config = json.loads((model / "tokenizer_config.json").read_text())
        (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": shared}))
    out = tmp_path / "out"
    load_recipe(_linear(tmp_path, "{tokenizer: {source: union}, chat_template: auto}")).run(out)
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == shared


def test_a_ties_merge_of_aligned_inputs_is_the_merge_of_those_rows(tmp_path):
    """TIES ranks whole tensors, so it goes through the whole-tensor evaluator: its union merge equals the TIES
    merge of copies of the models whose rows were put in the union's order beforehand."""
    import shutil

    from safetensors.torch import save_file

    models = vocab_models(tmp_path)[:2]
    text = ("recipe: 1\nmodels: {{a: ./{0}a, b: ./{0}b}}\nsteps:\n  - {{op: merge, method: ties, base: a, "
            "models: [{{model: b, weight: 1, density: 0.5}}]}}\noutput: {1}\n")
    union = UNION[:-1]
    out = load_recipe(write_recipe(tmp_path, text.format("", "{tokenizer: {source: union}}"))).run(
        tmp_path / "out").out
    rows = [token_rows(p) for p in models]
    for k, path in enumerate(models):  # the same models, already in the union's vocabulary
        copy = shutil.copytree(path, tmp_path / f"aligned-{path.name}")
        tensors = tensors_of(path)
        for kind, name in enumerate(("model.embed_tokens.weight", "lm_head.weight")):
            tensors[name] = torch.stack([rows[k][t][kind] if t in rows[k] else rows[0].get(t, rows[1].get(t))[kind]
                                         for t in union])
        for file in copy.glob("*.safetensors*"):
            file.unlink()
        save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, "vocab_size": len(union)}))
        shutil.copy(out / "tokenizer.json", copy / "tokenizer.json")
    again = load_recipe(write_recipe(tmp_path, text.format("aligned-", "{}"), "again.yaml")).run(
        tmp_path / "again").out
    got, want = tensors_of(out), tensors_of(again)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_a_byte_level_bpe_union(tmp_path):
    """The demo model's byte-level BPE tokenizer, and a fine-tune's copy with two new words and an added token:
    the union tokenises plain text as the base did, and gives the new tokens the next ids."""
    import shutil

    from tests.tiny import DEMO

    source = DEMO / "models" / "tiny-story"
    base = make_model(tmp_path / "a", layers=2, vocab_size=1849)
    tuned = make_model(tmp_path / "b", layers=2, seed=1, vocab_size=1852)
    for model in (base, tuned):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(source / name, model / name)
    data = json.loads((tuned / "tokenizer.json").read_text())
    data["model"]["vocab"].update({"Ġqqqz": 1849, "Ġzzzq": 1850})
    data["added_tokens"].append({"id": 1851, "content": "<|tool|>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    (tuned / "tokenizer.json").write_text(json.dumps(data))
    out = tmp_path / "out"
    load_recipe(_linear(tmp_path, "{tokenizer: {source: union}}", models=("a", "b"), weights=(0.5, 0.5))).run(out)
    union, original = (transformers.AutoTokenizer.from_pretrained(p) for p in (out, source))
    text = "Once upon a time, there was a little girl named Lily."
    assert union(text).input_ids == original(text).input_ids
    assert union.convert_tokens_to_ids(["Ġqqqz", "Ġzzzq", "<|tool|>"]) == [1849, 1850, 1851]
    assert union.decode([1849, 1851]) == " qqqz<|tool|>"
    assert union("Hi<|tool|>", add_special_tokens=False).input_ids[-1] == 1851
    assert tensors_of(out)["model.embed_tokens.weight"].shape == (1852, 32)
    load_causal_lm(out)


def test_a_model_name_is_short_for_its_source(tmp_path):
    """`tokenizer: b` with vocabularies that differ is `tokenizer: {source: b}`: the same bytes."""
    vocab_models(tmp_path)
    outs = []
    for k, output in enumerate(("{tokenizer: b}", "{tokenizer: {source: b}}")):
        recipe = _linear(tmp_path, output, models=("a", "b"), weights=(0.5, 0.5))
        outs.append(load_recipe(recipe).run(tmp_path / f"out{k}").out)
    first, second = ((o / "model-00001-of-00001.safetensors").read_bytes() for o in outs)
    assert first == second


def test_validating_and_planning_a_union_import_no_torch(tmp_path):
    import subprocess
    import sys

    vocab_models(tmp_path)
    recipe = _linear(tmp_path, "{tokenizer: {source: union}, chat_template: auto}")
    script = ("import sys\nfrom recipekit.engine.cli import main\n"
              "assert main(['validate', '--no-measure', sys.argv[1]]) == 0\n"
              "assert main(['plan', sys.argv[1], '--json']) == 0\nprint('torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script, str(recipe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_experts_with_other_vocabularies_need_no_setting(tmp_path):
    """stack_experts takes only the experts' MLPs: without a tokenizer setting the base's rows stay as they are."""
    a, b, _ = vocab_models(tmp_path)
    out = load_recipe(write_recipe(tmp_path, STACK)).run(tmp_path / "out").out
    got, base = tensors_of(out), tensors_of(a)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(got[name], base[name])
    assert (out / "tokenizer.json").read_bytes() == (a / "tokenizer.json").read_bytes()


def test_a_head_from_a_model_with_another_vocabulary_needs_a_setting(tmp_path):
    from recipekit.engine.errors import PlanError

    vocab_models(tmp_path)
    recipe = write_recipe(tmp_path, """
        recipe: 1
        models: {a: ./a, b: ./b}
        steps:
          - {op: slice_layers, slices: [{model: a, range: [0, 2]}], head: b}
        """)
    with pytest.raises(PlanError) as error:
        load_recipe(recipe).plan()
    (problem,) = error.value.problems
    assert problem.path == ("steps", 0, "head") and "set output.tokenizer" in problem.message


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_a_union_merge_with_device_cuda_gathers_its_rows_on_the_device(tmp_path, method):
    """On the stand-in device of tests/simulated_cuda.py (it computes on the CPU and refuses a host tensor mixed
    into device work): the rows a union gathers, zero rows, forced rows and padding included, are gathered on the
    device (the CPU streams them from the files instead), and the bytes are the CPU run's."""
    from tests.simulated_cuda import simulated_cuda

    vocab_models(tmp_path)
    overrides = '{"<think>": {source: {model: a, token: "<|im_end|>"}}, c5: {source: zero, force: true}}'
    output = f"{{tokenizer: {{source: union, pad_to_multiple_of: 16, tokens: {overrides}}}}}"
    recipe = load_recipe(_linear(tmp_path, output) if method == "linear" else write_recipe(
        tmp_path, "recipe: 1\nmodels: {a: ./a, b: ./b}\nsteps:\n  - {op: merge, method: ties, base: a, models: "
                  f"[{{model: b, weight: 1, density: 0.5}}]}}\noutput: {output}\n"))
    on_cpu = recipe.run(tmp_path / "cpu").out
    with simulated_cuda() as placed:
        on_device = recipe.run(tmp_path / "cuda", device="cuda").out
    assert placed.count > 0
    assert [p.read_bytes() for p in sorted(on_device.glob("*.safetensors"))] == \
        [p.read_bytes() for p in sorted(on_cpu.glob("*.safetensors"))]
    assert (on_device / "tokenizer.json").read_bytes() == (on_cpu / "tokenizer.json").read_bytes()
