"""Everything built on the streamed forward works for Phi-3, OLMo 2, Gemma 2, Gemma 3 (text and multimodal):
`recipe eval`, `recipe analyze --metric angular|bi|super-weights --verify`, `drop_layers` metric selectors and
`protect_super_weights`, each checked against transformers on a tiny model with a planted super weight."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from recipekit.engine.cli import main
from recipekit.engine.forward.tokenize import TextTokenizer
from recipekit.engine.io.source import open_model
from tests.bad_inputs.checks import assert_refused, cli, mark
from tests.tiny import (
    add_char_tokenizer,
    assert_layers_from,
    load_causal_lm,
    make_model,
    make_multimodal_gemma3,
    read_config,
    write_recipe,
)

FAMILIES = ["phi3", "olmo2", "gemma2", "gemma3_text", "gemma3"]  # gemma3: Gemma3ForConditionalGeneration
# layer surgery on a multimodal checkpoint is tested with that surgery, so recipes here drop layers of the others
TEXT_ONLY = pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma3"], indirect=True)
TEXT = "The quick brown fox jumps over the lazy dog. A second sentence follows, and a third one ends it."
PARAGRAPHS = "The cat sat on the mat.\n\nA much longer second text, to pad the batch.\n\nThird."
LAYERS = 4
PLANTED = (1, 5, 7)  # (layer, row, column) of the down_proj entry planted as a super weight


def _plant(path: Path) -> None:
    """Intermediate channel `column` of layer `layer` reads residual channel 0 through gate and up, so it fires
    on many tokens, and writes only into residual channel `row` through down_proj: a massive activation on both
    sides of one down_proj entry, whatever the family's gated MLP (SwiGLU, GeGLU, Phi-3's fused gate_up)."""
    model = load_causal_lm(path)
    layer, row, column = PLANTED
    mlp = model.get_decoder().layers[layer].mlp
    unit = torch.zeros(mlp.down_proj.weight.shape[0])
    unit[0] = 4.0
    with torch.no_grad():
        if hasattr(mlp, "gate_up_proj"):  # Phi-3: the gate's rows, then the up projection's
            inner = mlp.down_proj.weight.shape[1]
            mlp.gate_up_proj.weight[column] = unit
            mlp.gate_up_proj.weight[inner + column] = unit
        else:
            mlp.gate_proj.weight[column] = unit
            mlp.up_proj.weight[column] = unit
        mlp.down_proj.weight[:, column] = 0.0
        mlp.down_proj.weight[row, column] = 2.0
    model.save_pretrained(path)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "gemma3":
        path = make_multimodal_gemma3(folder / "m", layers=LAYERS, seed=6, max_position_embeddings=256,
                                      sliding_window=5, sliding_window_pattern=2)
    else:
        path = make_model(folder / "m", family=request.param, layers=LAYERS, seed=7, max_position_embeddings=256,
                          **({"sliding_window": 5} if request.param.startswith("gemma") else {}))
    _plant(path)
    add_char_tokenizer(path)
    (folder / "t.txt").write_text(TEXT)
    (folder / "p.txt").write_text(PARAGRAPHS)
    return request.param, path


def _ids(path: Path, text: str) -> list[int]:
    return TextTokenizer.of(open_model(str(path), base_dir=Path("/"))).encode(text)


def _perplexity(path: Path, text: str, zero: tuple[int, int, int] | None = None) -> float:
    """transformers' perplexity of the whole text as one sequence (BOS first), with one down_proj entry zeroed."""
    model = load_causal_lm(path)
    if zero is not None:
        with torch.no_grad():
            model.get_decoder().layers[zero[0]].mlp.down_proj.weight[zero[1], zero[2]] = 0.0
    ids = torch.tensor([_ids(path, text)])
    with torch.no_grad():
        logits = model(ids).logits[0]
    return math.exp(float(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])))


def _json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main([*map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_equals_transformers(family, capsys):
    _, path = family
    seq_len = len(_ids(path, TEXT))  # one window: BOS and every character
    ours = _json(capsys, "eval", path, "--text", path.parent / "t.txt", "--seq-len", seq_len)
    assert math.isclose(ours["perplexity"], _perplexity(path, TEXT), rel_tol=1e-5)


@TEXT_ONLY
def test_eval_of_a_recipe_equals_eval_of_its_output_and_transformers(family, tmp_path, capsys):
    _, path = family
    text = path.parent / "t.txt"
    seq_len = len(_ids(path, TEXT))
    recipe = write_recipe(tmp_path, f"recipe: 1\nmodels: {{m: {path}}}\nsteps: [{{op: drop_layers, model: m, "
                                    "layers: [2]}]\n")
    planned = _json(capsys, "eval", recipe, "--text", text, "--seq-len", seq_len)
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0
    written = _json(capsys, "eval", tmp_path / "out", "--text", text, "--seq-len", seq_len)
    assert planned["perplexity"] == written["perplexity"]
    assert math.isclose(written["perplexity"], _perplexity(tmp_path / "out", TEXT), rel_tol=1e-5)


def _residuals(path: Path, texts: list[str]) -> list[list[torch.Tensor]]:
    """Per text, from transformers: the residual stream entering every layer and after the last (pre-norm)."""
    model = load_causal_lm(path)
    out = []
    for text in texts:
        captured = {}
        hook = model.get_decoder().norm.register_forward_hook(lambda m, a, r: captured.setdefault("pre", a[0]))
        with torch.no_grad():
            states = model(torch.tensor([_ids(path, text)]), output_hidden_states=True).hidden_states
        hook.remove()
        out.append([s[0] for s in states[:-1]] + [captured["pre"][0]])
    return out


def test_angular_and_bi_equal_transformers(family, capsys):
    _, path = family
    texts = PARAGRAPHS.split("\n\n")
    ref = _residuals(path, texts)
    rows = _json(capsys, "analyze", path, "--metric", "angular", "--n", 1, "--text", path.parent / "p.txt")["rows"]
    expected = [sum(float(torch.arccos(torch.cosine_similarity(r[i][-1], r[i + 1][-1], dim=0).clamp(-1, 1)))
                    for r in ref) / math.pi / len(ref) for i in range(LAYERS)]
    assert [row["distance"] for row in rows] == pytest.approx(expected, abs=1e-5)
    rows = _json(capsys, "analyze", path, "--metric", "bi", "--text", path.parent / "p.txt")["rows"]
    tokens = sum(len(r[0]) for r in ref)
    expected = [1 - sum(float(torch.cosine_similarity(r[i], r[i + 1], dim=-1).sum()) for r in ref) / tokens
                for i in range(LAYERS)]
    assert [row["bi"] for row in rows] == pytest.approx(expected, abs=1e-5)


def test_super_weights_are_found_where_planted_and_verified_against_transformers(family, capsys):
    """The search reads `down_in` (the gated product feeding down_proj) and `down_out`: the planted entry is
    found at its exact coordinates in every family, and what zeroing it costs is what transformers computes."""
    _, path = family
    report = _json(capsys, "analyze", path, "--metric", "super-weights", "--text", path.parent / "t.txt",
                   "--verify", "--seq-len", 128)
    found = {(w["layer"], w["row"], w["column"]): w for w in report["weights"]}
    assert PLANTED in found, report
    assert math.isclose(report["baseline_perplexity"], _perplexity(path, TEXT), rel_tol=1e-4)
    assert math.isclose(found[PLANTED]["perplexity_zeroed"], _perplexity(path, TEXT, PLANTED), rel_tol=1e-4)


@TEXT_ONLY
@pytest.mark.parametrize("select", ["{metric: angular, n: 1, text: p.txt}", "{metric: bi, count: 1, text: p.txt}"])
def test_drop_layers_by_a_metric_drops_the_layer_analyze_ranks_first(family, select, tmp_path, capsys):
    _, path = family
    metric = "angular" if "angular" in select else "bi"
    rows = _json(capsys, "analyze", path, "--metric", metric, *(["--n", 1] if metric == "angular" else []),
                 "--text", path.parent / "p.txt")["rows"]
    chosen = min(range(LAYERS), key=lambda i: rows[i]["distance" if metric == "angular" else "bi"])
    (tmp_path / "p.txt").write_text(PARAGRAPHS)
    recipe = write_recipe(tmp_path, f"recipe: 1\nmodels: {{m: {path}}}\nsteps:\n"
                                    f"  - {{op: drop_layers, model: m, select: {select}}}\n")
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert read_config(tmp_path / "out")["num_hidden_layers"] == LAYERS - 1
    assert_layers_from(tmp_path / "out", [(path, i) for i in range(LAYERS) if i != chosen], path)
    load_causal_lm(tmp_path / "out")


@TEXT_ONLY
def test_protect_super_weights_refuses_dropping_the_planted_layer(family, tmp_path, capsys):
    _, path = family
    (tmp_path / "t.txt").write_text(TEXT)
    recipe = write_recipe(tmp_path, f"recipe: 1\nmodels: {{m: {path}}}\nsteps:\n"
                                    "  - {id: safe, op: protect_super_weights, model: m, text: t.txt, verify: false}\n"
                                    f"  - {{op: drop_layers, model: safe, layers: [{PLANTED[0]}]}}\n")
    assert_refused(cli(capsys, "plan", recipe), [(
        f"{recipe}:{mark(recipe.read_text(), '  - ^{op: drop_layers')}: steps[1]: ",
        (f"removes or changes super weight mlp.down_proj.weight[{PLANTED[1]}, {PLANTED[2]}] of layer m:{PLANTED[0]}",
         "allow_super_weight_loss: true"))])
    keep = write_recipe(tmp_path, recipe.read_text().replace(f"layers: [{PLANTED[0]}]", "layers: [3]"), "keep.yaml")
    assert main(["run", str(keep), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert torch.equal(load_causal_lm(tmp_path / "out").model.layers[PLANTED[0]].mlp.down_proj.weight,
                       load_causal_lm(path).model.layers[PLANTED[0]].mlp.down_proj.weight)


@pytest.mark.parametrize("no_measure", [False, True], ids=["measuring", "no-measure"])
def test_an_unsupported_family_is_refused_at_validate_where_the_step_is(tmp_path, capsys, no_measure):
    path = add_char_tokenizer(make_model(tmp_path / "m", family="granite", layers=4))
    (tmp_path / "p.txt").write_text(PARAGRAPHS)
    recipe = write_recipe(tmp_path, "recipe: 1\nmodels: {m: m}\nsteps:\n"
                                    "  - {op: drop_layers, model: m, select: {metric: angular, n: 1, text: p.txt}}\n")
    assert path.exists()
    capsys.readouterr()
    assert main(["validate", str(recipe), *(["--no-measure"] if no_measure else [])]) == 2
    err = capsys.readouterr().err
    assert err == (f"{recipe}:4:5: steps[0]: the streamed forward supports model types llama, mistral, qwen2, qwen3, "
                   "mixtral, qwen2_moe, qwen3_moe, phi3, olmo2, gemma2, gemma3_text; this model is 'granite'\n"), err


NO_MEASURE = """
import sys
from recipekit.engine.cli import main
assert main(["validate", sys.argv[1], "--no-measure"]) == 2
print("torch" in sys.modules)
"""


@pytest.mark.parametrize("family, changes, words", [
    ("phi3", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
     "RoPE type 'dynamic' is not supported by the streamed forward for model type 'phi3' (supported RoPE types: "
     "default, longrope)"),
    ("gemma2", {"hidden_activation": "silu"}, "hidden_activation 'silu' is not supported by the streamed forward "
                                              "for 'gemma2' (supported: gelu_pytorch_tanh, gelu)"),
    ("gemma3_text", {"rope_local_base_freq": "ten thousand"},
     "config.json: rope_local_base_freq should be a number, got 'ten thousand'"),
])
def test_what_a_family_cannot_compute_is_refused_by_validate_no_measure_without_torch(tmp_path, family, changes,
                                                                                       words):
    import subprocess
    import sys

    path = add_char_tokenizer(make_model(tmp_path / "m", family=family, layers=2))
    config = read_config(path) | changes
    (path / "config.json").write_text(json.dumps(config))
    (tmp_path / "p.txt").write_text(PARAGRAPHS)
    recipe = write_recipe(tmp_path, "recipe: 1\nmodels: {m: m}\nsteps:\n"
                                    "  - {op: drop_layers, model: m, select: {metric: bi, count: 1, text: p.txt}}\n")
    result = subprocess.run([sys.executable, "-c", NO_MEASURE, str(recipe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert result.stderr == f"{recipe}:4:5: steps[0]: {words}\n", result.stderr
