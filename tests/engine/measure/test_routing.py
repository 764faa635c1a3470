"""`recipe analyze-routing`: the counts equal transformers' own router choices; starved experts are named;
`--plot` pictures for routing and `analyze`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from recipekit.engine.cli import main
from tests.bad_inputs.checks import assert_refused, cli
from tests.tiny import add_char_tokenizer, load_causal_lm, make_model, write_recipe

TEXTS = ["the cat sat on the mat", "0123 4567 89", "HELLO WORLD! STOP.", "a dog ran far away from 42 cats"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "texts.txt"
    path.write_text("\n\n".join(TEXTS) + "\n")
    return path


@pytest.mark.parametrize("family, settings", [
    ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 1, "moe_intermediate_size": 48,
                   "shared_expert_intermediate_size": 40}),
])
def test_counts_equal_transformers_router_choices(tmp_path: Path, texts: Path, capsys, family, settings) -> None:
    model = add_char_tokenizer(make_model(tmp_path / family, family=family, layers=3, seed=2, **settings))
    assert main(["analyze-routing", str(model), "--text", str(texts), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)

    reference = load_causal_lm(model)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    k = report["experts_per_token"]
    counts = torch.zeros(3, 4, dtype=torch.long)
    for text in TEXTS:
        ids = torch.tensor([[0, *tokenizer.encode(text).ids]])
        with torch.no_grad():
            router_logits = reference(ids, output_router_logits=True).router_logits
        for layer, logits in enumerate(router_logits):
            counts[layer] += torch.bincount(logits.topk(k, dim=-1).indices.reshape(-1), minlength=4)
    assert [entry["slots"] for entry in report["layers"]] == counts.tolist()
    assert report["tokens"] == sum(len(t) + 1 for t in TEXTS) and report["texts"] == 4
    for entry in report["layers"]:
        assert sum(entry["share"]) == pytest.approx(1.0)


def test_starved_experts_are_named_and_the_table_printed(tmp_path: Path, texts: Path, capsys) -> None:
    """Uniform (all-zero) routers send every token to the same two experts (top-k ties): the others starve."""
    add_char_tokenizer(make_model(tmp_path / "base", seed=1))
    recipe = write_recipe(tmp_path, """
        recipe: 1
        models: {base: ./base}
        steps:
          - id: moe
            op: stack_experts
            base: base
            experts: [{model: base}, {model: base}, {model: base}, {model: base}]
          - {op: init_gates, model: moe, mode: uniform}
        """)
    assert main(["analyze-routing", str(recipe), "--text", str(texts)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("share of routing slots per expert (top-2 of 4")
    row = lines[2].split()
    assert row[0] == "0" and sorted(row[1:]) == ["0.0%", "0.0%", "50.0%", "50.0%"]
    starved = [e for e in range(4) if row[1 + e] == "0.0%"]
    warnings = captured.err.splitlines()
    for e in starved:
        assert f"recipe: warning: expert {e} receives under 2.5% of the routing in 4 of 4 MoE layers (0, 1, 2, 3)" \
            in warnings


def test_a_dense_model_is_refused(tmp_path: Path, texts: Path, capsys) -> None:
    model = add_char_tokenizer(make_model(tmp_path / "dense", seed=1))
    assert_refused(cli(capsys, "analyze-routing", model, "--text", texts),
                   [("", ("is not a Mixture of Experts (model type 'llama')",))])


def test_plots_are_pngs_and_the_same_every_time(tmp_path: Path, texts: Path, capsys) -> None:
    pytest.importorskip("matplotlib")
    moe = add_char_tokenizer(make_model(tmp_path / "moe", family="mixtral", layers=2, num_local_experts=3))
    dense = add_char_tokenizer(make_model(tmp_path / "dense", layers=3))
    runs = [["analyze-routing", moe, "--text", texts], ["analyze", dense, "--metric", "snr"],
            ["analyze", dense, "--metric", "bi", "--text", texts],
            ["analyze", dense, "--metric", "angular", "--n", "2", "--text", texts]]
    for k, argv in enumerate(runs):
        pictures = [tmp_path / f"{k}-{attempt}.png" for attempt in range(2)]
        for picture in pictures:
            assert main([str(a) for a in argv] + ["--plot", str(picture)]) == 0
        assert pictures[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert pictures[0].read_bytes() == pictures[1].read_bytes()


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path: Path, capsys, monkeypatch) -> None:
    dense = make_model(tmp_path / "dense", layers=2)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert_refused(cli(capsys, "analyze", dense, "--metric", "snr", "--plot", tmp_path / "x.png"),
                   [("", ("--plot needs matplotlib: pip install 'recipekit[plot]'",))])
    assert not (tmp_path / "x.png").exists()
