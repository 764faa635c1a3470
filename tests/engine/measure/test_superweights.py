"""What `analyze --metric super-weights` reports beyond the weights (tests/ops/weights/test_super_weights.py has
those): every layer's peak ratios, in the JSON and the plot, against transformers; candidates ranked by what
zeroing each costs (`--verify`), against transformers; and tables whose columns stay aligned however long a
name."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from recipekit.engine.cli import main
from recipekit.engine.forward.tokenize import TextTokenizer
from recipekit.engine.io.source import open_model
from recipekit.engine.measure import superweights
from recipekit.engine.measure.superweights import (
    CALIBRATION_TEXT,
    DEFAULT_PROMPT,
    LayerPeaks,
    Search,
    SuperWeight,
    Verification,
)
from tests.tiny import DEMO, HARMLESS_SPIKES, PLANTED_WEIGHT, load_causal_lm, make_model

STORY_SW = DEMO / "models" / "tiny-story-sw"  # a super weight planted in layer 1 (recipes/demo/plant_super_weight.py)
TEXT = "The cat sat on the mat. A dog ran past it, and the cat looked up at the sky. Then it slept."


def _peak_ratios(model_dir) -> list[tuple[float, float]]:
    """(largest |down_proj output| / median, the same of its input) per layer over the default prompt, with
    transformers' own forward and hooks."""
    model = load_causal_lm(model_dir)
    ids = TextTokenizer.of(open_model(str(model_dir), base_dir=Path("/"))).encode(DEFAULT_PROMPT)
    seen = {}

    def keep(layer):
        def hook(module, inputs, output):
            seen[layer] = (output[0].abs().amax(0), inputs[0][0].abs().amax(0))
        return hook

    for i, layer in enumerate(model.model.layers):
        layer.mlp.down_proj.register_forward_hook(keep(i))
    with torch.no_grad():
        model(torch.tensor([ids]))
    return [tuple(float(p.max() / p.median()) for p in seen[i]) for i in range(len(seen))]


def test_every_layers_ratio_is_reported_and_plotted(tmp_path, capsys, monkeypatch):
    drawn = {}
    monkeypatch.setattr("recipekit.engine.measure.plot.curve",
                        lambda path, xs, ys, **labels: drawn.update(xs=xs, ys=ys))
    plot = str(tmp_path / "p.png")
    assert main(["analyze", str(STORY_SW), "--metric", "super-weights", "--json", "--plot", plot]) == 0
    report = json.loads(capsys.readouterr().out)

    expected = _peak_ratios(STORY_SW)
    assert [row["layer"] for row in report["layers"]] == list(range(len(expected))) == drawn["xs"]
    for row, (out_ratio, in_ratio) in zip(report["layers"], expected):
        assert math.isclose(row["out_ratio"], out_ratio, rel_tol=1e-3)
        assert math.isclose(row["in_ratio"], in_ratio, rel_tol=1e-3)
    assert drawn["ys"] == [row["out_ratio"] for row in report["layers"]]
    assert min(drawn["ys"]) > 1  # every layer's own ratio, not 0 where no weight was found
    assert [w["layer"] for w in report["weights"]] == [1]


def _perplexity(model_dir: Path, text: str, zeroed: tuple[int, int, int] | None = None) -> float:
    """Perplexity of `text` (BOS first, one window) under transformers' forward, with the down_proj entry
    (layer, row, column) zeroed when given."""
    model = load_causal_lm(model_dir)
    if zeroed is not None:
        layer, row, column = zeroed
        with torch.no_grad():
            model.model.layers[layer].mlp.down_proj.weight[row, column] = 0.0
    ids = torch.tensor([TextTokenizer.of(open_model(str(model_dir), base_dir=Path("/"))).encode(text)])
    with torch.no_grad():
        return math.exp(float(model(ids, labels=ids).loss))


def test_verify_ranks_the_candidates_by_what_zeroing_each_costs(spiky, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert main(["analyze", str(spiky), "--metric", "super-weights", "--text", str(text), "--verify",
                 "--seq-len", "128", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    found = [(w["layer"], w["row"], w["column"]) for w in report["weights"]]
    assert found[0] == PLANTED_WEIGHT and sorted(found[1:]) == sorted(HARMLESS_SPIKES)
    effects = [w["effect"] for w in report["weights"]]
    assert effects == sorted(effects, reverse=True)
    assert effects[0] > 10 and all(abs(e) < 0.01 for e in effects[1:]), effects
    assert report["calibration"] == str(text) and report["calibration_tokens"] == len(TEXT)  # one per character

    own = _perplexity(spiky, TEXT)
    assert math.isclose(report["baseline_perplexity"], own, rel_tol=1e-4)
    for w, where in zip(report["weights"], found):
        zeroed = _perplexity(spiky, TEXT, where)
        assert math.isclose(w["perplexity_zeroed"], zeroed, rel_tol=1e-4), where
        assert math.isclose(w["effect"], zeroed / own - 1, rel_tol=1e-3, abs_tol=1e-4), where


def test_verify_without_a_text_scores_the_built_in_calibration_text(spiky, capsys):
    assert main(["analyze", str(spiky), "--metric", "super-weights", "--verify"]) == 0
    lines = capsys.readouterr().out.splitlines()
    tokens = len(TextTokenizer.of(open_model(str(spiky), base_dir=Path("/"))).encode_plain(CALIBRATION_TEXT))
    assert re.search(r"by what zeroing each on its own does to the perplexity of the built-in calibration text "
                     rf"\({tokens} tokens; [\d.]+ as it is\)$", lines[0]), lines[0]
    assert lines[1].split() == ["layer", "tensor", "row", "column", "value", "out/median", "in/median",
                                "perplexity", "zeroed", "effect"]
    rows = [line.split() for line in lines[2:5]]
    assert int(rows[0][0]) == PLANTED_WEIGHT[0]
    assert sorted(int(r[0]) for r in rows[1:]) == [layer for layer, _, _ in HARMLESS_SPIKES]
    assert all(re.fullmatch(r"\+[\d.e+]+%", r[-1]) for r in rows), rows
    assert lines[5] == ("protect_super_weights protects those whose effect is at least min_effect (default +10%): "
                        "1 of 3 here; verify: false protects all 3")


def _cells(line: str) -> list[tuple[int, int]]:
    """(start, end) of each cell of a table line: cells are two or more spaces apart."""
    return [m.span() for m in re.finditer(r"\S+(?: \S+)*", line)]


def _assert_aligned(lines: list[str], left: set[int]) -> None:
    """Every row's cells line up with the header's: by their starts in the `left` columns, by their ends elsewhere."""
    header = _cells(lines[0])
    for line in lines[1:]:
        cells = _cells(line)
        assert len(cells) == len(header), line
        for c, ((start, end), (head_start, head_end)) in enumerate(zip(cells, header)):
            assert (start == head_start) if c in left else (end == head_end), (c, lines)


def test_the_super_weight_table_stays_aligned_for_long_tensor_names(capsys, monkeypatch):
    long = "model.language_model.layers.12.mlp.down_proj.weight"
    weights = [SuperWeight(2, 7, 1301, -3.25, "model.layers.2.mlp.down_proj.weight", 1, 812.5, 91.0),
               SuperWeight(12, 1024, 5, 0.5, long, 2, 60.25, 1234.5)]
    monkeypatch.setattr(superweights, "find_super_weights",
                        lambda *args, **kwargs: Search(weights, [LayerPeaks(w.layer, w.out_ratio, w.in_ratio)
                                                                 for w in weights]))
    monkeypatch.setattr(superweights, "verify", lambda model, name, found, text, **kwargs: Verification(
        2.5, 100, [SuperWeight(**{**vars(w), "perplexity_zeroed": 10.0 ** k, "effect": 10.0 ** k / 2.5 - 1})
                   for k, w in enumerate(found)]))
    heldout = str(DEMO / "heldout.txt")
    for verify in ([], ["--verify"]):
        assert main(["analyze", str(STORY_SW), "--metric", "super-weights", "--text", heldout, *verify]) == 0
        lines = capsys.readouterr().out.splitlines()[1:4]
        assert len(lines) == 3 and long in lines[2]
        _assert_aligned(lines, left={1})


def test_the_snr_table_stays_aligned_for_long_module_names(tmp_path, capsys):
    model = make_model(tmp_path / "moe", family="qwen2_moe", layers=2, num_experts=2, num_experts_per_tok=1)
    assert main(["analyze", str(model), "--metric", "snr", "--module", "mlp.shared_expert.down_proj",
                 "--module", "self_attn.v_proj", "--module", "mlp.experts.1.up_proj"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert lines[0].split() == ["layer", "mlp.shared_expert.down_proj", "self_attn.v_proj", "mlp.experts.1.up_proj"]
    assert len(lines) == 3
    _assert_aligned(lines, left=set())
