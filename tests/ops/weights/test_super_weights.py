"""Super weights on the demo model with a planted one (recipes/demo/plant_super_weight.py): found at its exact
coordinates, the model depends on it, and no step loses it unless the recipe says so; verification, on a model
with a planted super weight and harmless spikes (tests/tiny.py), protects only what the model depends on and
records every candidate's effect; low_rank (LASER)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from recipekit.engine import load_recipe
from recipekit.engine.cli import main
from recipekit.engine.core.rmt import snr
from recipekit.engine.measure.probe import EngineProbe
from recipekit.engine.measure.superweights import find_super_weights
from tests.bad_inputs.checks import assert_no_output, assert_refused, cli, mark
from tests.tiny import DEMO, HARMLESS_SPIKES, PLANTED_WEIGHT, tensors_of, write_recipe

PLANTED = DEMO / "models" / "tiny-story-sw"
LAYER, ROW, COLUMN, VALUE = 1, 77, 301, 3.0  # as plant_super_weight.py plants it
DOWN = f"model.layers.{LAYER}.mlp.down_proj.weight"


@pytest.fixture
def work(tmp_path: Path) -> Path:
    shutil.copy(DEMO / "heldout.txt", tmp_path / "heldout.txt")
    return tmp_path


def test_found_at_its_exact_coordinates_and_the_model_depends_on_it(tmp_path: Path, capsys) -> None:
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join((DEMO / "heldout.txt").read_text().split("\n\n")[:12]))
    assert main(["analyze", str(PLANTED), "--metric", "super-weights", "--text", str(text), "--verify",
                 "--seq-len", "128", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(w["layer"], w["row"], w["column"], w["value"]) for w in report["weights"]] == [(LAYER, ROW, COLUMN, VALUE)]
    found = report["weights"][0]
    assert found["out_ratio"] > 50 and found["in_ratio"] > 50
    assert found["perplexity_zeroed"] > 2.5 * report["baseline_perplexity"], report


def test_the_unplanted_model_has_none(capsys) -> None:
    assert main(["analyze", str(DEMO / "models" / "tiny-story"), "--metric", "super-weights"]) == 0
    assert capsys.readouterr().out.startswith("no super weight")


def _recipe(folder: Path, *steps: str) -> Path:
    body = "\n".join(f"  - {s}" for s in steps)
    return write_recipe(folder, f"recipe: 1\nmodels: {{story: {PLANTED}}}\nsteps:\n{body}\n")


PROTECT_FOUND = "{id: safe, op: protect_super_weights, model: story, text: heldout.txt, max_texts: 4}"
PROTECT_GIVEN = f"{{id: safe, op: protect_super_weights, model: story, coordinates: [{{layer: {LAYER}, row: {ROW}, " \
                f"column: {COLUMN}}}]}}"


@pytest.mark.parametrize("protect", [PROTECT_FOUND, PROTECT_GIVEN], ids=["found", "given"])
def test_dropping_its_layer_is_refused_where_the_drop_is(work: Path, capsys, protect: str) -> None:
    recipe = _recipe(work, protect, "{op: drop_layers, model: safe, layers: [0, 1]}")
    text = recipe.read_text()
    result = cli(capsys, "run", recipe, "-o", work / "OUT")
    assert_refused(result, [(f"{recipe}:{mark(text, '  - ^{op: drop_layers')}: steps[1]: ",
                             (f"removes or changes super weight mlp.down_proj.weight[{ROW}, {COLUMN}] of layer story:1",
                              "allow_super_weight_loss: true"))])
    assert_no_output(work / "OUT")


def test_a_recipe_may_allow_the_loss(work: Path) -> None:
    recipe = _recipe(work, PROTECT_GIVEN, "{op: drop_layers, model: safe, layers: [1], allow_super_weight_loss: true}")
    out = work / "out"
    load_recipe(recipe).run(out)
    card = (out / "README.md").read_text()
    assert f"super weight mlp.down_proj.weight[{ROW}, {COLUMN}] of layer story:1 given up" in card


def test_other_layers_may_go_and_the_weight_moves_with_its_layer(work: Path) -> None:
    recipe = _recipe(work, PROTECT_GIVEN, "{op: drop_layers, model: safe, layers: [0]}")
    out = work / "out"
    load_recipe(recipe).run(out)
    assert float(tensors_of(out)["model.layers.0.mlp.down_proj.weight"][ROW, COLUMN]) == VALUE
    assert f"protect_super_weights: mlp.down_proj.weight[{ROW}, {COLUMN}] of layer story:1 (given)" in \
        (out / "README.md").read_text()


def test_low_rank_keeps_a_protected_weight_exactly(work: Path) -> None:
    recipe = _recipe(work, PROTECT_FOUND, f"{{op: low_rank, model: safe, modules: [mlp.down_proj], layers: [{LAYER}], "
                                          "rank: 8}")
    out = work / "out"
    load_recipe(recipe).run(out)
    got, source = tensors_of(out)[DOWN], tensors_of(PLANTED)[DOWN]
    assert float(got[ROW, COLUMN]) == VALUE
    u, s, vh = torch.linalg.svd(source.double(), full_matrices=False)
    rank8 = ((u[:, :8] * s[:8]) @ vh[:8]).float()
    rank8[ROW, COLUMN] = VALUE
    assert torch.allclose(got, rank8, atol=1e-5)
    assert "super weights kept exactly: mlp.down_proj.weight[77, 301] of layer story:1" in (out / "README.md").read_text()


def test_low_rank_by_the_noise_edge_and_lowest_snr(work: Path) -> None:
    recipe = _recipe(work, "{op: low_rank, model: story, modules: [mlp.up_proj, self_attn.v_proj], lowest_snr: 2}")
    out = work / "out"
    load_recipe(recipe).run(out)
    got, source = tensors_of(out), tensors_of(PLANTED)
    values = {(i, m): snr(source[f"model.layers.{i}.{m}.weight"]).snr for i in range(8)
              for m in ("mlp.up_proj", "self_attn.v_proj")}
    lowest = sorted(values, key=lambda k: (values[k], k))[:2]
    for (i, m) in values:
        name = f"model.layers.{i}.{m}.weight"
        if (i, m) in lowest:
            kept = snr(source[name]).signal_values
            assert torch.linalg.matrix_rank(got[name].double(), rtol=1e-5) == kept, name
            assert not torch.equal(got[name], source[name])
        else:
            assert torch.equal(got[name], source[name]), name


@pytest.mark.parametrize("layers, count", [("[1]", "1 matrix"), ("[1, 2]", "2 matrices")])
def test_the_low_rank_note_counts_its_matrices(work: Path, layers: str, count: str) -> None:
    recipe = _recipe(work, f"{{op: low_rank, model: story, modules: [mlp.down_proj], layers: {layers}, rank: 8}}")
    assert f"step 1: low_rank: {count} to rank 8" in load_recipe(recipe).plan().model.notes


def test_without_protection_low_rank_changes_the_weight(work: Path) -> None:
    recipe = _recipe(work, f"{{op: low_rank, model: story, modules: [mlp.down_proj], layers: [{LAYER}], rank: 8}}")
    out = work / "out"
    load_recipe(recipe).run(out)
    assert float(tensors_of(out)[DOWN][ROW, COLUMN]) != VALUE


@pytest.mark.parametrize("step, marker, words", [
    ("{op: protect_super_weights, model: story, coordinates: [{layer: 9, row: 0, column: 0}]}",
     "coordinates: [{layer: ^9", ("steps[0].coordinates[0].layer", "layer 9 is out of range", "8 layers")),
    ("{op: protect_super_weights, model: story, coordinates: [{layer: 1, row: 900, column: 0}]}",
     "coordinates: [^{layer: 1", ("steps[0].coordinates[0]", "[900, 0] is outside", "[128, 384]")),
    ("{op: low_rank, model: story, modules: [mlp.down], rank: 4}",
     "modules: [^mlp.down]", ("steps[0].modules[0]", "has no module 'mlp.down'", "did you mean 'mlp.down_proj'?")),
    ("{op: low_rank, model: story, modules: [mlp.down_proj], rank: 500}",
     "rank: ^500", ("steps[0].rank", "rank 500 is more than")),
])
def test_mistakes_are_located(work: Path, capsys, step: str, marker: str, words: tuple[str, ...]) -> None:
    recipe = _recipe(work, step)
    result = cli(capsys, "plan", recipe)
    assert_refused(result, [(f"{recipe}:{mark(recipe.read_text(), marker)}: ", words)])


def test_stack_experts_keeps_the_experts_super_weights(work: Path, capsys) -> None:
    """An expert's protected super weight moves into its expert's down_proj, and the guard keeps watching it."""
    stack = "{op: stack_experts, base: story, experts: [{model: safe}], experts_per_token: 1}"
    gates = "{op: init_gates, model: moe, mode: random}"
    model = load_recipe(_recipe(work, PROTECT_GIVEN, stack.replace("{op:", "{id: moe, op:"), gates)).build()
    (weight,) = model.protected
    assert (weight.row, weight.column) == (ROW, COLUMN)
    expert_down = model.tensors[f"model.layers.{LAYER}.block_sparse_moe.experts.0.w2.weight"]
    assert expert_down == weight.node  # the expert's down_proj is the protected tensor, still a byte copy

    noisy = stack.replace("{model: safe}", "{model: safe, noise_scale: 0.01}")
    recipe = _recipe(work, PROTECT_GIVEN, noisy)
    result = cli(capsys, "validate", recipe)
    assert_refused(result, [(f"{recipe}:{mark(recipe.read_text(), '^{op: stack_experts')}: steps[1]: ",
                             ("super weight", "mlp.down_proj.weight[77, 301] of layer story:1", "allow_super_weight_loss"))])


# --------------------------------------------------------------------------- verification, on tests/tiny.py's model


def _label(layer: int, row: int, column: int) -> str:
    return f"mlp.down_proj.weight[{row}, {column}] of layer m:{layer}"


def _spiky_recipe(folder: Path, spiky: Path, *steps: str) -> Path:
    body = "\n".join(f"  - {s}" for s in steps)
    return write_recipe(folder, f"recipe: 1\nmodels: {{m: {spiky}}}\nsteps:\n{body}\n")


def test_verification_protects_the_planted_weight_and_the_card_lists_every_candidate(spiky, tmp_path) -> None:
    recipe = _spiky_recipe(tmp_path, spiky, "{id: safe, op: protect_super_weights, model: m}",
                           "{op: drop_layers, model: safe, layers: [0]}")
    plan = load_recipe(recipe).plan()
    assert [w.label for w in plan.model.protected] == ["mlp.down_proj.weight[5, 7] of layer m:1"]
    load_recipe(recipe).run(tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    prefix = "- step 1 (`safe`): "  # the card numbers each step's notes
    steps = [line[len(prefix):] for line in card.splitlines() if line.startswith(prefix + "protect_super_weights: ")]
    assert steps[0].startswith("protect_super_weights: 3 spikes found, each zeroed on its own on the built-in "
                               "calibration text (")
    assert steps[0].endswith("); protected when perplexity rises by at least 10%")
    assert steps[1].startswith(f"protect_super_weights: {_label(*PLANTED_WEIGHT)} (found, value 3.125, output ")
    assert "; zeroed: perplexity " in steps[1]
    rejected = sorted(steps[2:])
    assert len(rejected) == 2
    for line, spike in zip(rejected, sorted(HARMLESS_SPIKES)):
        assert line.startswith(f"protect_super_weights: {_label(*spike)} not protected (found, value 0.03125, ")
        assert line.endswith(", under min_effect 10%)")
        effect = float(line.rsplit(", ", 2)[1].rstrip("%")) / 100
        assert 0 < effect < 0.01, line
    planted_effect = float(steps[1].rsplit(", ", 1)[1].rstrip("%)")) / 100
    assert planted_effect > 10, steps[1]


def test_a_layer_holding_only_a_harmless_spike_may_be_dropped_the_planted_ones_may_not(spiky, tmp_path,
                                                                                      capsys) -> None:
    protect = "{id: safe, op: protect_super_weights, model: m}"
    drop = "{{op: drop_layers, model: safe, layers: [{}]}}"
    assert cli(capsys, "plan", _spiky_recipe(tmp_path, spiky, protect, drop.format(HARMLESS_SPIKES[1][0]))).rc == 0

    planted = _spiky_recipe(tmp_path, spiky, protect, drop.format(PLANTED_WEIGHT[0]))
    assert_refused(cli(capsys, "plan", planted), [(
        f"{planted}:{mark(planted.read_text(), '  - ^{op: drop_layers')}: steps[1]: ",
        (f"removes or changes super weight {_label(*PLANTED_WEIGHT)}", "allow_super_weight_loss: true"))])


def test_verify_false_protects_every_spike_as_the_paper_does(spiky, tmp_path, capsys) -> None:
    layer = HARMLESS_SPIKES[1][0]
    recipe = _spiky_recipe(tmp_path, spiky, "{id: safe, op: protect_super_weights, model: m, verify: false}",
                           f"{{op: drop_layers, model: safe, layers: [{layer}]}}")
    assert_refused(cli(capsys, "plan", recipe), [(
        f"{recipe}:{mark(recipe.read_text(), '  - ^{op: drop_layers')}: steps[1]: ",
        (f"removes or changes super weight {_label(*HARMLESS_SPIKES[1])}",))])
    protected = [w.label for w in load_recipe(_spiky_recipe(
        tmp_path, spiky, "{op: protect_super_weights, model: m, verify: false}")).build().protected]
    assert sorted(protected) == sorted(_label(*w) for w in (PLANTED_WEIGHT, *HARMLESS_SPIKES))


def test_min_effect_sets_the_bar_and_a_bar_none_clears_is_a_warning(spiky, tmp_path, capsys) -> None:
    everything = _spiky_recipe(tmp_path, spiky, "{op: protect_super_weights, model: m, min_effect: 0}")
    assert len(load_recipe(everything).build().protected) == 3  # every harmless spike raises perplexity a little

    recipe = _spiky_recipe(tmp_path, spiky, "{id: safe, op: protect_super_weights, model: m, min_effect: 1000000}",
                           f"{{op: drop_layers, model: safe, layers: [{PLANTED_WEIGHT[0]}]}}")
    result = cli(capsys, "plan", recipe)
    assert result.rc == 0
    assert ("warning: protect_super_weights: zeroing any of the 3 spikes found in 'm' raises perplexity by less "
            "than 1e+08% (at most +") in result.err
    assert "nothing is protected (verify: false protects every spike)" in result.err


def test_the_verification_text_is_the_recipes_and_what_verification_reads_is_locked(spiky, tmp_path) -> None:
    (tmp_path / "calib.txt").write_text("The cat sat on the mat, and the dog slept by the door all afternoon.")
    recipe = _spiky_recipe(tmp_path, spiky, "{id: safe, op: protect_super_weights, model: m, "
                                            "verify_text: calib.txt}", "{op: drop_layers, model: safe, layers: [0]}")
    model = load_recipe(recipe).build()
    assert "each zeroed on its own on calib.txt (68 tokens, perplexity " in model.notes[0]
    load_recipe(recipe).run(tmp_path / "out")
    lock = json.loads((tmp_path / "out" / "recipe.lock").read_text())
    assert set(lock["files"]) == {str((tmp_path / "calib.txt").resolve())}  # texts by absolute path


def test_verification_records_every_file_it_reads(spiky, tmp_path) -> None:
    """The probe names the text, the tokenizer files and the model's shards: the lock hashes them."""
    from recipekit.engine.core.graph import LazyModel
    from recipekit.engine.io.source import open_model

    model = LazyModel.from_source("m", open_model(str(spiky), base_dir=tmp_path))
    weights = find_super_weights(model, "m", []).weights
    (tmp_path / "calib.txt").write_text("A short text to score.")
    probe = EngineProbe(tmp_path)
    check = probe.verify_super_weights(model, "m", weights, "calib.txt", seq_len=64, max_tokens=64)
    assert [(w.layer, w.row, w.column) for w in check.weights][0] == PLANTED_WEIGHT
    assert set(probe.read) == {tmp_path / "calib.txt", spiky / "tokenizer.json", spiky / "tokenizer_config.json",
                               *spiky.glob("*.safetensors")}


def test_the_verification_fields_are_in_the_schema(capsys) -> None:
    assert main(["schema"]) == 0
    fields = json.loads(capsys.readouterr().out)["$defs"]["ProtectSuperWeights"]["properties"]
    assert fields["verify"]["default"] is True and fields["verify"]["type"] == "boolean"
    assert fields["min_effect"]["default"] == 0.1 and fields["min_effect"]["minimum"] == 0
    assert fields["verify_tokens"]["default"] == 4096 and fields["verify_tokens"]["minimum"] == 2
    assert {"type": "string"} in fields["verify_text"]["anyOf"]
    assert all(fields[name]["description"] for name in ("verify", "min_effect", "verify_text", "verify_tokens"))


def test_a_verification_text_counts_as_a_local_path() -> None:
    """So a shared recipe may name one only when the user allows local paths, as it may a search text."""
    from recipekit.ops.weights.super_weights import ProtectSuperWeights

    step = ProtectSuperWeights(op="protect_super_weights", model="m", text="a.txt", verify_text="b.txt")
    assert step.local_paths() == [(("text",), "a.txt"), (("verify_text",), "b.txt")]


def test_verification_says_what_it_scores_and_shows_one_bar_over_the_candidates(spiky, tmp_path, capsys,
                                                                                monkeypatch) -> None:
    import sys

    from recipekit.engine.measure import superweights
    from recipekit.engine.progress import progress_bar

    bars = []

    def recording(total, enabled, *, unit, desc):
        bars.append((desc, total, enabled, capsys.readouterr().err))
        return progress_bar(total, False, unit=unit, desc=desc)

    monkeypatch.setattr(superweights, "progress_bar", recording)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    recipe = write_recipe(tmp_path, "recipe: 1\nmodels: {m: " + str(spiky) + "}\nsteps:\n"
                                    "  - {id: p, op: protect_super_weights, model: m}\n"
                                    "  - {op: drop_layers, model: p, layers: [0]}\n")
    capsys.readouterr()
    assert main(["plan", str(recipe)]) == 0
    assert [(desc, total, enabled) for desc, total, enabled, _ in bars] == [("verifying", 4, True)]
    assert bars[0][3].splitlines()[-1] == (
        "recipe: steps[0] protect_super_weights: measuring the effect of each of 3 super-weight candidates of 'm': "
        "the perplexity of a built-in calibration text (at most 4096 tokens) with each zeroed, 4 streamed forwards")
