"""Steps that measure the model while a recipe is built (metric selectors, prompt gates): they say what they
measure before they start, show progress bars on a terminal, can be left out of `validate`, and the plan's peak
memory counts what they hold."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from recipekit.engine import load_recipe
from recipekit.engine.cli import main
from tests.terminal import stderr_on_a_terminal
from tests.tiny import add_char_tokenizer, make_model, write_recipe

STEPS = {
    "angular": "- {op: drop_layers, model: m, select: {metric: angular, n: 1, text: texts.txt}}",
    "bi": "- {op: drop_layers, model: m, select: {metric: bi, count: 1, text: texts.txt}}",
    "snr": "- {op: drop_layers, model: m, select: {metric: snr, module: self_attn.v_proj, lowest: 1}}",
    "hidden gates": ("- {id: moe, op: stack_experts, base: m, experts: [{model: m, positive: [the cat]}, "
                     "{model: m, positive: ['0123']}]}\n  - {op: init_gates, model: moe, mode: hidden}"),
}
# what each says before it starts, and the progress bar it shows (tqdm's description)
ANNOUNCED = {
    "angular": ("recipe: steps[0] drop_layers: measuring angular distance and block influence of 'm': a streamed "
                "forward of 4 layers over 2 texts of texts.txt (35 B), at most 256 tokens each", "forward"),
    "bi": ("recipe: steps[0] drop_layers: measuring angular distance and block influence of 'm'", "forward"),
    "snr": ("recipe: steps[0] drop_layers: measuring the SNR of self_attn.v_proj in 4 layers of 'm' (one matrix at "
            "a time, no forward pass)", "snr"),
    "hidden gates": ("recipe: steps[1] init_gates: measuring router rows from the hidden states of 'm': a streamed "
                     "forward of 4 layers over 2 prompts", "forward"),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A 4-layer Llama with a character tokenizer at m/, and two texts beside it."""
    folder = tmp_path_factory.mktemp("measuring")
    add_char_tokenizer(make_model(folder / "m", layers=4, seed=5))
    (folder / "texts.txt").write_text("The cat sat on the mat.\n\nA dog, 0123.\n")
    return folder


def _recipe(folder: Path, kind: str, name: str | None = None) -> Path:
    return write_recipe(folder, f"recipe: 1\nmodels: {{m: m}}\nsteps:\n  {STEPS[kind]}\n",
                        name or f"{kind.replace(' ', '-')}.yaml")


@pytest.fixture
def bars(monkeypatch, capsys) -> list[tuple[str, bool, str]]:
    """Every progress bar the forward and the SNR table open: (description, shown, stderr printed before it)."""
    from recipekit.engine.forward import streamed
    from recipekit.engine.measure import snr
    from recipekit.engine.progress import progress_bar

    opened = []

    def recording(total, enabled, *, unit, desc):
        opened.append((desc, enabled, capsys.readouterr().err))
        return progress_bar(total, False, unit=unit, desc=desc)

    monkeypatch.setattr(streamed, "progress_bar", recording)
    monkeypatch.setattr(snr, "progress_bar", recording)
    return opened


@pytest.mark.parametrize("command", ["run", "plan", "validate"])
@pytest.mark.parametrize("kind", list(STEPS))
def test_a_measuring_step_says_what_it_measures_then_shows_a_bar_on_a_terminal(folder, tmp_path, bars, capsys,
                                                                              monkeypatch, kind, command):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    args = [command, str(_recipe(folder, kind))] + (["-o", str(tmp_path / "out")] if command == "run" else [])
    capsys.readouterr()
    assert main(args) == 0
    line, desc = ANNOUNCED[kind]
    assert bars, "no progress bar"
    shown, before = bars[0][1], bars[0][2]
    assert bars[0][0] == desc and shown
    assert before.count(": measuring ") == 1 and before.splitlines()[-1].startswith(line), before


@pytest.mark.parametrize("command", ["run", "plan", "validate"])
def test_no_bar_with_q_or_off_a_terminal_but_the_line_still_says_what_is_measured(folder, tmp_path, bars, capsys,
                                                                                  monkeypatch, command):
    recipe = _recipe(folder, "angular")
    out = ["-o", str(tmp_path / "out")] if command == "run" else []
    assert main([command, str(recipe), *out]) == 0  # capsys's stderr is no terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main([command, str(recipe), *(["-o", str(tmp_path / "again")] if out else []), "-q"]) == 0
    assert [shown for _, shown, _ in bars] == [False, False]
    assert all(ANNOUNCED["angular"][0] in before for _, _, before in bars)


def test_the_api_passes_progress_and_announce_down_to_the_measurement(folder, tmp_path, bars):
    recipe = load_recipe(_recipe(folder, "hidden gates"))
    heard = []
    recipe.plan(progress=True, announce=heard.append)
    recipe.run(tmp_path / "out", announce=heard.append)
    assert [shown for _, shown, _ in bars] == [True, False]
    assert heard == [ANNOUNCED["hidden gates"][0].removeprefix("recipe: ")] * 2


def test_a_terminal_shows_the_forward_bar(folder):
    """End to end: stderr a real terminal (a pty), `plan` draws tqdm's bar for the forward; `-q` draws none."""
    recipe = _recipe(folder, "angular")

    def stderr_of(*extra: str) -> str:
        return stderr_on_a_terminal("plan", str(recipe), *extra)

    shown = stderr_of()
    assert "forward:" in shown and "/4 [" in shown, shown  # tqdm's count of 4 layers
    quiet = stderr_of("-q")
    assert "forward:" not in quiet and ANNOUNCED["angular"][0] in quiet


NO_TORCH = """
import sys
from recipekit.engine.cli import main
rc = main(["validate", sys.argv[1], "--no-measure"])
print("torch" in sys.modules, rc)
"""


def test_validate_no_measure_checks_the_recipe_and_headers_but_runs_no_measurement(folder, tmp_path):
    recipe = write_recipe(folder, """
        recipe: 1
        models: {m: m}
        steps:
          - {id: pruned, op: drop_layers, model: m, select: {metric: angular, n: 1, text: texts.txt}}
          - {id: small, op: low_rank, model: pruned, modules: [mlp.down_proj], rank: 2}
          - {id: other, op: drop_layers, model: m, layers: [0]}
          - op: slice_layers
            slices: [{model: small, range: [0, 2]}, {model: other, range: [0, 1]}]
        """, "no-measure.yaml")
    result = subprocess.run([sys.executable, "-c", NO_TORCH, str(recipe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "False 0"  # no torch, exit 0
    assert lines[:-1] == [
        f"{recipe}: ok (recipe and its inputs: 1 model(s), 4 step(s), 3 of them not run (--no-measure))",
        "steps[0] drop_layers: not measured: angular distance and block influence of 'm': a streamed forward of 4 "
        "layers over 2 texts of texts.txt (35 B), at most 256 tokens each",
        "steps[1] low_rank: not checked: it reads 'pruned', which was not measured",
        "steps[3] slice_layers: not checked: it reads 'small', which was not measured",
    ]
    assert ": measuring " not in result.stderr


def test_validate_measures_unless_told_not_to(folder, capsys):
    """The check above can fail: a plain `validate` of the same kind of recipe does run the forward."""
    assert main(["validate", str(_recipe(folder, "angular"))]) == 0
    captured = capsys.readouterr()
    assert ANNOUNCED["angular"][0] in captured.err and "not measured" not in captured.out


@pytest.mark.parametrize("case", ["missing text", "unsupported family", "unknown module"])
def test_no_measure_still_checks_what_a_measurement_would_read(folder, tmp_path, capsys, case):
    """What the measurement would read is checked without measuring: exit 2, located at the step."""
    if case == "unsupported family":
        add_char_tokenizer(make_model(tmp_path / "m", family="granite", layers=4, seed=5))
        (tmp_path / "texts.txt").write_text("A text.\n")
    else:
        (tmp_path / "m").symlink_to(folder / "m")  # and no texts.txt
    select = {"missing text": "{metric: angular, n: 1, text: texts.txt}",
              "unsupported family": "{metric: bi, count: 1, text: texts.txt}",
              "unknown module": "{metric: snr, module: self_attn.w_proj, lowest: 1}"}[case]
    recipe = write_recipe(tmp_path, f"recipe: 1\nmodels: {{m: m}}\nsteps:\n"
                                    f"  - {{op: drop_layers, model: m, select: {select}}}\n")
    expected = {"missing text": f"{tmp_path / 'texts.txt'}: steps[0]: text file not found",
                "unsupported family": f"{recipe}:4:5: steps[0]: the streamed forward supports model types llama",
                "unknown module": f"{recipe}:4:63: steps[0].select.module: model 'm' has no module "
                                  "'self_attn.w_proj' in its layers (did you mean 'self_attn.v_proj'?)"}[case]
    capsys.readouterr()
    rc = main(["validate", str(recipe), "--no-measure"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(expected) and err.count("\n") == 1, err


def test_plan_json_splits_peak_memory_into_measuring_and_writing(folder, capsys):
    assert main(["plan", str(_recipe(folder, "angular")), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["peak_memory_measuring"] > plan["peak_memory_writing"] > 0
    assert plan["peak_memory"] == plan["peak_memory_measuring"]
    assert main(["plan", str(write_recipe(folder, "recipe: 1\nmodels: {m: m}\nsteps:\n"
                                                  "  - {op: drop_layers, model: m, layers: [0]}\n", "index.yaml")),
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["peak_memory_measuring"] == 0 and plan["peak_memory"] == plan["peak_memory_writing"]


# The estimate is held within this factor of the measured peak (both ways).
FACTOR = 1.5
# The process's own peak RSS: VmHWM starts afresh at exec (getrusage's ru_maxrss of a child would start from the
# pytest process's size at fork).
PEAK_RSS = """
import re, sys
from recipekit.engine.cli import main
assert main(sys.argv[1:]) == 0
with open("/proc/self/status") as status:
    print(int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read())[1]) * 1024)
"""


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """A model whose forward over 64 texts of 256 tokens holds several hundred MB (a wide MLP: gate, up and their
    product are [64, 256, 2048] floats each) yet computes in seconds (hidden size 64), beside 64 such texts."""
    folder = tmp_path_factory.mktemp("wide")
    add_char_tokenizer(make_model(folder / "m", layers=4, hidden_size=64, intermediate_size=2048,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=512))
    words = "the quick brown fox jumps over a lazy dog and runs far away into the night".split()
    texts = [" ".join(words[(k + i) % len(words)] for i in range(70)) for k in range(64)]
    (folder / "texts.txt").write_text("\n\n".join(texts))
    return folder


def _peak_rss(*argv: str) -> int:
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, *argv], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


def test_the_peak_memory_estimate_of_a_measuring_step_is_what_a_run_peaks_at(wide, tmp_path, capsys):
    """`recipe plan`'s estimate against the peak RSS of `recipe run`, in a fresh process: for a run whose angular
    selection dominates, and for the increment over a run that imports torch but measures nothing."""
    angular = write_recipe(wide, "recipe: 1\nmodels: {m: m}\nsteps:\n"
                                 "  - {op: drop_layers, model: m, select: {metric: angular, n: 1, text: texts.txt}}\n",
                           "angular.yaml")
    plain = write_recipe(wide, "recipe: 1\nmodels: {m: m}\nsteps:\n  - {op: drop_layers, model: m, layers: [0]}\n"
                               "output: {dtype: bfloat16}\n", "plain.yaml")
    estimated = {}
    for name, recipe in (("angular", angular), ("plain", plain)):
        capsys.readouterr()
        assert main(["plan", str(recipe), "--json"]) == 0
        estimated[name] = json.loads(capsys.readouterr().out)["peak_memory"]
    measured = {name: _peak_rss("run", str(recipe), "-o", str(tmp_path / name), "-q")
                for name, recipe in (("angular", angular), ("plain", plain))}
    figures = f"estimated {estimated}, measured {measured}"
    assert measured["angular"] > 2 * measured["plain"], figures  # the forward dominates
    assert 1 / FACTOR < estimated["angular"] / measured["angular"] < FACTOR, figures
    forward = estimated["angular"] - estimated["plain"], measured["angular"] - measured["plain"]
    assert 1 / FACTOR < forward[0] / forward[1] < FACTOR, figures


def test_the_peak_memory_estimate_counts_the_super_weight_search(wide, tmp_path, capsys):
    """A protect step's search runs forwards over the texts as a selector does; the plan counts them."""
    recipe = write_recipe(wide, "recipe: 1\nmodels: {m: m}\nsteps:\n"
                                "  - {id: p, op: protect_super_weights, model: m, text: texts.txt, rounds: 1}\n"
                                "  - {op: drop_layers, model: p, layers: [0]}\n", "protect.yaml")
    capsys.readouterr()
    assert main(["plan", str(recipe), "--json"]) == 0
    estimated = json.loads(capsys.readouterr().out)["peak_memory"]
    measured = _peak_rss("run", str(recipe), "-o", str(tmp_path / "out"), "-q")
    assert 1 / FACTOR < estimated / measured < FACTOR, f"estimated {estimated}, measured {measured}"
