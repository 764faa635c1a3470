"""`recipe plan`'s peak memory for a merge over a vocabulary union against the peak RSS of `recipe run`: the rows
each input gathers (`take_rows`) hold the kernel's declared working copies, not the default's."""
from __future__ import annotations

import json

from recipekit.engine.cli import main
from tests.engine.run.test_measuring import FACTOR, _peak_rss
from tests.tiny import add_word_tokenizer, make_model, write_recipe

WORDS = [f"w{i}" for i in range(30000)]
SHAPE = dict(layers=2, hidden_size=512, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             head_dim=128, dtype="bfloat16")


def test_the_peak_memory_estimate_of_a_union_merge_is_what_a_run_peaks_at(tmp_path, capsys):
    """A TIES merge of two bf16 models whose vocabularies share 29500 tokens and differ by 1500 (a union of 31001
    rows of 512: 32 MB per matrix, each input gathering rows from both): the estimate within FACTOR of the measured
    peak, and so is its increment over a plain copy. Measured: 750 MB estimated, 568 MB peak (the default
    working copies for `take_rows` and a sum over the whole graph gave 1.25 GB)."""
    add_word_tokenizer(make_model(tmp_path / "a", vocab_size=30001, seed=1, **SHAPE), WORDS)
    add_word_tokenizer(make_model(tmp_path / "b", vocab_size=30501, seed=2, **SHAPE),
                       [*WORDS[500:], *(f"x{i}" for i in range(1000))])
    union = write_recipe(tmp_path, "recipe: 1\nmodels: {a: ./a, b: ./b}\nsteps:\n  - {op: merge, method: ties, "
                                   "base: a, models: [{model: b, weight: 1, density: 0.5}]}\n"
                                   "output: {tokenizer: {source: union}}\n", "union.yaml")
    plain = write_recipe(tmp_path, "recipe: 1\nmodels: {a: ./a}\nsteps:\n  - {op: drop_layers, model: a, "
                                   "layers: [0]}\n", "plain.yaml")
    estimated = {}
    for name, recipe in (("union", union), ("plain", plain)):
        capsys.readouterr()
        assert main(["plan", str(recipe), "--json"]) == 0
        estimated[name] = json.loads(capsys.readouterr().out)["peak_memory"]
    measured = {name: _peak_rss("run", str(recipe), "-o", str(tmp_path / name), "-q")
                for name, recipe in (("union", union), ("plain", plain))}
    figures = f"estimated {estimated}, measured {measured}"
    assert 1 / FACTOR < estimated["union"] / measured["union"] < FACTOR, figures
    merge = estimated["union"] - estimated["plain"], measured["union"] - measured["plain"]
    assert 1 / FACTOR < merge[0] / merge[1] < FACTOR, figures
