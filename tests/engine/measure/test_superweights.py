"""What `analyze --metric super-weights` reports beyond the weights (tests/ops/weights/test_super_weights.py has
those): every layer's peak ratios, in the JSON and the plot, against transformers; and tables whose columns stay
aligned however long a name."""
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
from recipekit.engine.measure.superweights import DEFAULT_PROMPT, LayerPeaks, Search, SuperWeight
from tests.tiny import DEMO, load_causal_lm, make_model

PLANTED = DEMO / "models" / "tiny-story-sw"  # a super weight planted in layer 1 (recipes/demo/plant_super_weight.py)


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
    assert main(["analyze", str(PLANTED), "--metric", "super-weights", "--json", "--plot", plot]) == 0
    report = json.loads(capsys.readouterr().out)

    expected = _peak_ratios(PLANTED)
    assert [row["layer"] for row in report["layers"]] == list(range(len(expected))) == drawn["xs"]
    for row, (out_ratio, in_ratio) in zip(report["layers"], expected):
        assert math.isclose(row["out_ratio"], out_ratio, rel_tol=1e-3)
        assert math.isclose(row["in_ratio"], in_ratio, rel_tol=1e-3)
    assert drawn["ys"] == [row["out_ratio"] for row in report["layers"]]
    assert min(drawn["ys"]) > 1  # every layer's own ratio, not 0 where no weight was found
    assert [w["layer"] for w in report["weights"]] == [1]


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
    monkeypatch.setattr(superweights, "verify", lambda model, name, found, text, **kwargs: (
        2.5, [SuperWeight(**{**vars(w), "perplexity_zeroed": 10.0 ** k}) for k, w in enumerate(found)]))
    heldout = str(DEMO / "heldout.txt")
    for verify in ([], ["--verify"]):
        assert main(["analyze", str(PLANTED), "--metric", "super-weights", "--text", heldout, *verify]) == 0
        lines = capsys.readouterr().out.splitlines()[1:]
        assert len(lines) == 3 and long in lines[2]
        _assert_aligned(lines, left={1, 7})


def test_the_snr_table_stays_aligned_for_long_module_names(tmp_path, capsys):
    model = make_model(tmp_path / "moe", family="qwen2_moe", layers=2, num_experts=2, num_experts_per_tok=1)
    assert main(["analyze", str(model), "--metric", "snr", "--module", "mlp.shared_expert.down_proj",
                 "--module", "self_attn.v_proj", "--module", "mlp.experts.1.up_proj"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert lines[0].split() == ["layer", "mlp.shared_expert.down_proj", "self_attn.v_proj", "mlp.experts.1.up_proj"]
    assert len(lines) == 3
    _assert_aligned(lines, left=set())
