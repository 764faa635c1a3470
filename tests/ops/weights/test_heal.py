"""heal: the trained modules change and bring the student closer to what it should compute, nothing else
changes, the same recipe gives the same bytes (on any thread count), and bad steps are refused before anything
runs."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import yaml

from recipekit.engine import load_recipe
from recipekit.engine.cli import main
from recipekit.engine.recipe.shared import untrusted_problems
from tests.bad_inputs.checks import assert_recipe_refused, line
from tests.terminal import stderr_on_a_terminal
from tests.tiny import add_char_tokenizer, load_causal_lm, make_model, tensors_of, write_recipe

SENTENCES = ["the cat sat on the mat.", "a dog ran to the park.", "the sun is warm today.", "we ate bread and jam.",
             "my hat is red and blue.", "the bird sang a song."]
TRAINED = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def _text(seed: int, count: int) -> str:
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(SENTENCES), (count,), generator=generator).tolist()
    return " ".join(SENTENCES[i] for i in picks)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("heal")
    add_char_tokenizer(make_model(root / "base", layers=4, seed=3))
    (root / "train.txt").write_text(_text(0, 60))
    (root / "held.txt").write_text(_text(1, 20))
    return root


def _recipe(work, mode: str = "blockwise", extra: str = "", name: str = "recipe.yaml", teacher: str = "base"):
    teacher_line = f"    teacher: {teacher}\n" if teacher else ""
    return write_recipe(work, f"""
recipe: 1
models:
  base: ./base
steps:
  - id: pruned
    op: drop_layers
    model: base
    layers: [2]
  - op: heal
    model: pruned
{teacher_line}    text: train.txt
    held_out: held.txt
    mode: {mode}
    steps: 15
    lr: 3e-3
    seq_len: 48
    batch_size: 4
{extra}""", name)


def _run(recipe, out, *extra) -> None:
    assert main(["run", str(recipe), "-o", str(out), "-q", *extra]) == 0


def _hidden(path, text: str) -> torch.Tensor:
    """The last hidden states (after the final norm) transformers computes for the text's characters."""
    from tokenizers import Tokenizer

    ids = [0] + Tokenizer.from_file(str(path / "tokenizer.json")).encode(text[:60], add_special_tokens=False).ids
    with torch.no_grad():
        return load_causal_lm(path)(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]


@pytest.fixture(scope="module")
def healed(work):
    """The blockwise heal and the plain drop it started from."""
    _run(_recipe(work), work / "healed")
    drop = write_recipe(work, "recipe: 1\nmodels:\n  base: ./base\nsteps:\n  - op: drop_layers\n    model: base\n"
                              "    layers: [2]\n", "drop.yaml")
    _run(drop, work / "dropped")
    return work / "healed"


def test_blockwise_trains_only_the_named_modules_of_layers_after_the_cut(work, healed):
    out, dropped = tensors_of(healed), tensors_of(work / "dropped")
    assert out.keys() == dropped.keys()
    changed = {name for name in out if not torch.equal(out[name], dropped[name])}
    # layers 0 and 1 are teacher layers 0 and 1; layer 0 already computes the stream entering teacher layer 1,
    # its target: nothing to learn. Layer 1 must produce what teacher layer 2 (removed) produced, layer 2 (teacher
    # layer 3) the teacher's last stream.
    assert changed == {f"model.layers.{j}.{rest}" for j in (1, 2) for rest in TRAINED}
    card = (healed / "README.md").read_text()
    assert "`heal` trained mlp.gate_proj, mlp.up_proj and mlp.down_proj of 2 layers of `pruned`" in card
    assert "layer 0 is left unchanged" in card
    assert "nothing was trained" not in card
    assert yaml.safe_load(card.split("---\n")[1])["tags"] == ["recipekit", "pruned", "healed"]


def test_blockwise_brings_the_student_closer_to_the_teacher(work, healed):
    text = (work / "held.txt").read_text()
    teacher = _hidden(work / "base", text)
    before = (_hidden(work / "dropped", text) - teacher).pow(2).mean()
    after = (_hidden(healed, text) - teacher).pow(2).mean()
    assert after < 0.7 * before, (before, after)


def test_the_lock_holds_the_texts_and_the_loss_curve_lies_beside_the_card(work, healed):
    lock = json.loads((healed / "recipe.lock").read_text())
    assert {str((work / name).resolve()) for name in ("train.txt", "held.txt")} <= set(lock["files"])
    pytest.importorskip("matplotlib")
    assert (healed / "heal-loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "loss curve: heal-loss.png" in (healed / "README.md").read_text()


def test_held_out_perplexities_on_the_card_are_what_eval_measures(work, healed, capsys):
    card = (healed / "README.md").read_text()
    before, after = (float(x) for x in card.split("held-out perplexity on held.txt: ")[1].split(";")[0].split(" -> "))
    measured = []
    for target in (work / "dropped", healed):
        capsys.readouterr()
        assert main(["eval", str(target), "--text", str(work / "held.txt"), "--seq-len", "48", "--json"]) == 0
        measured.append(json.loads(capsys.readouterr().out)["perplexity"])
    assert measured[0] == pytest.approx(before, abs=6e-5) and measured[1] == pytest.approx(after, abs=6e-5)
    assert after < before


def test_the_same_recipe_gives_the_same_bytes_on_one_thread_or_two(work, healed):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads != 1 else 2)
        _run(_recipe(work), work / "again")
    finally:
        torch.set_num_threads(threads)
    for name in ("model-00001-of-00001.safetensors", "README.md", "heal-loss.png"):
        if (healed / name).exists():
            assert (work / "again" / name).read_bytes() == (healed / name).read_bytes(), name


def test_trained_tensors_are_written_in_the_output_dtype(work, healed):
    recipe = _recipe(work, extra="output:\n  dtype: bfloat16\n", name="bf16.yaml")
    _run(recipe, work / "bf16")
    out, full = tensors_of(work / "bf16"), tensors_of(healed)
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], full["model.layers.1.mlp.up_proj.weight"].bfloat16())


@pytest.mark.parametrize("teacher", ["base", None])
def test_end_to_end_lowers_the_loss_training_only_the_named_modules(work, healed, teacher):
    out = work / f"e2e-{teacher}"
    recipe = _recipe(work, "end_to_end", extra="    train: [mlp.down_proj]\n    layers: [[1, 3]]\n",
                     name=f"e2e-{teacher}.yaml", teacher=teacher)
    recipe.write_text(recipe.read_text().replace("text: train.txt", "text: [train.txt]"))  # a list of files
    _run(recipe, out)
    got, dropped = tensors_of(out), tensors_of(work / "dropped")
    changed = {name for name in got if not torch.equal(got[name], dropped[name])}
    assert changed == {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    card = (out / "README.md").read_text()
    before, after = (float(x) for x in card.split("held-out perplexity on held.txt: ")[1].split(";")[0].split(" -> "))
    assert after < before


@pytest.mark.parametrize("mode, teacher", [("blockwise", "base"), ("end_to_end", "base"), ("end_to_end", None)])
def test_healing_with_device_cuda_trains_on_the_device(work, mode, teacher):
    """On the stand-in device of tests/simulated_cuda.py (it computes on the CPU and refuses a host tensor mixed
    into device work), training, its optimiser and the perplexities run on the device, and the bytes are the
    CPU run's."""
    from tests.simulated_cuda import simulated_cuda

    recipe = _recipe(work, mode, name=f"device-{mode}-{teacher}.yaml", teacher=teacher)
    _run(recipe, work / f"device-{mode}-{teacher}-cpu")
    with simulated_cuda() as placed:
        _run(recipe, work / f"device-{mode}-{teacher}-cuda", "--device", "cuda")
    assert placed.count > 0
    on_cpu, on_device = (tensors_of(work / f"device-{mode}-{teacher}-{d}") for d in ("cpu", "cuda"))
    assert on_device.keys() == on_cpu.keys()
    assert all(torch.equal(on_device[name], on_cpu[name]) for name in on_cpu)
    card = (work / f"device-{mode}-{teacher}-cuda" / "README.md").read_text()
    assert card == (work / f"device-{mode}-{teacher}-cpu" / "README.md").read_text()


def test_a_shared_recipe_may_not_read_heal_texts_unless_allowed(work):
    loaded = load_recipe(_recipe(work, name="shared.yaml"))
    problems = untrusted_problems(loaded.recipe, loaded.locator, allow_local_paths=False)
    texts = [p for p in problems if "a shared recipe may not read local files" in p.message]
    assert [p.path for p in texts] == [("steps", 1, "text"), ("steps", 1, "held_out")]
    assert not [p for p in untrusted_problems(loaded.recipe, loaded.locator, allow_local_paths=True)
                if "local file" in p.message]


# (what the step says instead, where the error points, its path, words it must hold)
BAD = {
    "unknown module": (("    steps: 15\n", "    steps: 15\n    train: [mlp.gate_prj]\n"), "train: [^mlp.gate_prj]",
                       "steps[1].train[0]", ("no module 'mlp.gate_prj'", "did you mean 'mlp.gate_proj'?")),
    "no steps": (("    steps: 15\n", "    steps: 0\n"), "steps: ^0", "steps[1].steps", ("greater than or equal to 1",)),
    "nothing to learn": (("    steps: 15\n", "    steps: 15\n    layers: [0]\n"), "layers: ^[0]", "steps[1].layers",
                         ("in 'pruned', layer 0 is the teacher's own", "nothing to heal")),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("command", ["run", "validate"])
def test_bad_heal_steps_are_refused_located_before_anything_runs(work, tmp_path, capsys, case, command):
    (old, new), marker, path, words = BAD[case]
    (tmp_path / "base").symlink_to(work / "base")
    for name in ("train.txt", "held.txt"):
        (tmp_path / name).write_text((work / name).read_text())
    text = _recipe(tmp_path).read_text().replace(old, new)
    (tmp_path / "recipe.yaml").unlink()
    assert_recipe_refused(tmp_path, capsys, command, text, [line(marker, path, *words)])


def test_a_teacher_of_another_width_and_an_empty_text_are_refused(work, tmp_path, capsys):
    add_char_tokenizer(make_model(tmp_path / "wide", layers=4, hidden_size=48, head_dim=12))
    (tmp_path / "base").symlink_to(work / "base")
    (tmp_path / "held.txt").write_text((work / "held.txt").read_text())
    (tmp_path / "train.txt").write_text((work / "train.txt").read_text())
    text = _recipe(tmp_path, teacher="wide").read_text().replace("  base: ./base\n", "  base: ./base\n  wide: ./wide\n")
    (tmp_path / "recipe.yaml").unlink()
    assert_recipe_refused(tmp_path, capsys, "run", text,
                          [line("teacher: ^wide", "steps[1].teacher", "hidden size 48", "student 'pruned' 32")])
    text = _recipe(tmp_path).read_text()
    (tmp_path / "recipe.yaml").unlink()
    (tmp_path / "train.txt").write_text("  \n")
    for command in ("run", "validate"):
        assert_recipe_refused(tmp_path, capsys, command, text,
                              [line("text: ^train.txt", "steps[1].text", "train.txt: the text file is empty")])


def test_validate_no_measure_checks_a_heal_without_torch(work):
    script = ("import sys\nfrom recipekit.engine.cli import main\n"
              "rc = main(['validate', sys.argv[1], '--no-measure'])\nprint('torch' in sys.modules, rc)\n")
    result = subprocess.run([sys.executable, "-c", script, str(_recipe(work, name="no-measure.yaml"))],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False 0"
    assert "steps[1] heal: not measured: healing: training 2 layers of 'pruned'" in result.stdout


def test_a_student_pruned_elsewhere_heals_alike_given_its_teacher_layers(work, healed, tmp_path, capsys):
    """The output of a plain drop, healed in a recipe of its own: the layer correspondence cannot be known, so it
    is required (located); given, the bytes equal those of the heal inside the pruning recipe."""
    text = f"""recipe: 1
models:
  base: {work / 'base'}
  pruned: {work / 'dropped'}
steps:
  - op: heal
    model: pruned
    teacher: base
    text: {work / 'train.txt'}
    held_out: {work / 'held.txt'}
    steps: 15
    lr: 3e-3
    seq_len: 48
    batch_size: 4
"""
    assert_recipe_refused(tmp_path, capsys, "run", text, [
        line("teacher: ^base", "steps[0].teacher", "does not come from a layer of the teacher", "teacher_layers")])
    recipe = write_recipe(tmp_path, text + "    teacher_layers: [0, 1, 3]\n", "elsewhere.yaml")
    _run(recipe, tmp_path / "out")
    ours, theirs = tensors_of(tmp_path / "out"), tensors_of(healed)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)


@pytest.mark.parametrize("family", ["qwen3", "mistral", "gemma2", "gemma3_text"])
def test_blockwise_heals_other_families_the_forward_runs(tmp_path, family):
    add_char_tokenizer(make_model(tmp_path / "base", family=family, layers=4, seed=1))
    (tmp_path / "train.txt").write_text(_text(0, 60))
    (tmp_path / "held.txt").write_text(_text(1, 20))
    _run(_recipe(tmp_path), tmp_path / "healed")
    drop = write_recipe(tmp_path, "recipe: 1\nmodels:\n  base: ./base\nsteps:\n  - op: drop_layers\n    model: base\n"
                                  "    layers: [2]\n", "drop.yaml")
    _run(drop, tmp_path / "dropped")
    text = (tmp_path / "held.txt").read_text()
    teacher = _hidden(tmp_path / "base", text)
    before = (_hidden(tmp_path / "dropped", text) - teacher).pow(2).mean()
    assert (_hidden(tmp_path / "healed", text) - teacher).pow(2).mean() < 0.7 * before


def test_a_terminal_shows_steps_loss_and_tokens_per_second(work, tmp_path):
    shown = stderr_on_a_terminal("run", str(_recipe(work, name="bar.yaml")), "-o", str(tmp_path / "out"),
                                 columns=140)
    bars = [ln for ln in shown.replace("\r", "\n").splitlines() if ln.startswith("heal (blockwise):")]
    # 2 trained layers x 15 steps; tqdm redraws at most every 0.1 s, so which steps show depends on the speed
    drawn = [ln for ln in bars if re.search(r"\| \d+/30 \[.*(step/s|s/step), loss [\d.e-]+, [\d,]+ tok/s\]", ln)]
    assert drawn, bars
