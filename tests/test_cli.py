"""The `recipe` command and the Python API, as a user drives them."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recipekit.engine import load_recipe
from recipekit.engine.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_two_runs_are_byte_identical_from_any_working_directory(tmp_path, monkeypatch):
    recipe = tmp_path / "recipes" / "frankenmerge.yaml"
    recipe.parent.mkdir()
    recipe.write_text((DEMO / "frankenmerge.yaml").read_text().replace("models/", f"{DEMO}/models/"))
    monkeypatch.chdir(tmp_path)
    assert main(["run", "recipes/frankenmerge.yaml", "-o", "one", "-q"]) == 0
    monkeypatch.chdir(recipe.parent)
    assert main(["run", "frankenmerge.yaml", "-o", str(tmp_path / "two"), "-q"]) == 0
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert one.keys() == two.keys() and one == two


def test_relative_model_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(DEMO / "drop-layers.yaml"), "-o", "out", "-q"]) == 0
    assert (tmp_path / "out" / "config.json").is_file()


TORCH_FREE = """
import sys
from recipekit.engine.cli import main
args = sys.argv[1:]
for command in (["validate", args[0]], ["plan", args[0], "--json"], ["inspect", args[1]], ["schema"],
                ["run", args[0], "-o", args[2], "-q"], ["inspect", args[2]]):
    rc = main(command)
    assert rc == 0, (command, rc)
print("torch" in sys.modules)
"""


def test_validate_plan_inspect_schema_and_a_pure_drop_never_import_torch(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", TORCH_FREE, str(DEMO / "drop-layers.yaml"),
                             str(DEMO / "models" / "llama-a"), str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"
    assert (out / "config.json").is_file()


def test_a_dtype_change_does_import_torch(tmp_path):
    """The guard above can fail: a conversion needs torch and imports it."""
    script = ("import sys\nfrom recipekit.engine.cli import main\n"
              "assert main(['run', sys.argv[1], '-o', sys.argv[2], '-q']) == 0\nprint('torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script, str(DEMO / "frankenmerge.yaml"), str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "True"


def test_failure_mid_run_leaves_nothing(tmp_path, monkeypatch):
    from recipekit.engine.run import evaluate

    calls = []

    def failing_cast(*args):
        calls.append(args)
        if len(calls) == 3:
            raise OSError("disk on fire")
        return original(*args)

    original = evaluate.cast_stream
    monkeypatch.setattr(evaluate, "cast_stream", failing_cast)
    rc = main(["run", str(DEMO / "frankenmerge.yaml"), "-o", str(tmp_path / "out"), "-q"])
    assert rc == 1
    assert list(tmp_path.iterdir()) == []


def test_interrupted_run_leaves_nothing_and_says_so(tmp_path, monkeypatch, capsys):
    from recipekit.engine.run import evaluate

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "cast_stream", interrupt)
    assert main(["run", str(DEMO / "frankenmerge.yaml"), "-o", str(tmp_path / "out"), "-q"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_and_stale_partials_are_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old-file").write_text("x")
    stale = tmp_path / ".out.recipekit-partial-999999999"
    stale.mkdir()
    assert main(["run", str(DEMO / "drop-layers.yaml"), "-o", str(out), "--overwrite", "-q"]) == 0
    assert not (out / "old-file").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_plan_json_and_text(capsys):
    assert main(["plan", str(DEMO / "frankenmerge.yaml"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layers"] == 10
    assert plan["layer_runs"] == [{"output": "0-3", "from": "a 0-3"}, {"output": "4-8", "from": "b 3-7"},
                                  {"output": "9", "from": "b 7"}]
    assert plan["computed"] == plan["tensors"] and plan["copied"] == 0
    assert plan["output_bytes"] == sum(s["bytes"] for s in plan["shards"])
    assert main(["plan", str(DEMO / "drop-layers.yaml")]) == 0
    text = capsys.readouterr().out
    assert "5-7  <- base 6-7" not in text and "4  <- base 7" in text and "copied as bytes" in text


def test_plan_sizes_match_what_run_writes(tmp_path):
    loaded = load_recipe(DEMO / "drop-layers.yaml")
    plan = loaded.plan()
    out = loaded.run(tmp_path / "out").out
    for shard in plan.shards:
        assert (out / shard.filename).stat().st_size == shard.size


def test_inspect_json(capsys):
    assert main(["inspect", str(DEMO / "models" / "llama-b"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 8 and info["tied_embeddings"] is True
    assert info["files"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert "model.embed_tokens.weight" in info["non_layer_tensors"]


def _properties(schema: dict):
    for name, definition in schema.get("$defs", {}).items():
        for key, prop in definition.get("properties", {}).items():
            yield f"{name}.{key}", prop
    for key, prop in schema["properties"].items():
        yield key, prop


def test_schema_has_a_description_on_every_field(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    missing = [name for name, prop in _properties(schema) if "description" not in prop]
    assert missing == []
    ops = schema["$defs"]
    assert {"DropLayers", "SliceLayers"} <= set(ops)


def test_model_card_front_matter(tmp_path):
    out = load_recipe(DEMO / "frankenmerge.yaml").run(tmp_path / "out").out
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "transformers"
    assert front["tags"][0] == "recipekit" and "merge" in front["tags"]
    assert (DEMO / "frankenmerge.yaml").read_text() in text


def test_api_accepts_a_dict(tmp_path):
    recipe = load_recipe({"recipe": 1, "models": {"m": "llama-a"},
                          "steps": [{"op": "drop_layers", "model": "m", "layers": [[0, 6]]}]},
                         base_dir=DEMO / "models")
    result = recipe.run(tmp_path / "out")
    assert json.loads((result.out / "config.json").read_text())["num_hidden_layers"] == 2
    assert yaml.safe_load((result.out / "recipe.yaml").read_text())["steps"][0]["layers"] == [[0, 6]]


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on CI, even where a GPU is lent
    rc = main(["run", str(DEMO / "frankenmerge.yaml"), "-o", str(tmp_path / "out"), "--device", "cuda"])
    assert rc == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("metric", ["snr", "angular", "super-weights"])
def test_analyze_takes_a_device_like_eval(capsys, monkeypatch, metric):
    """`--device cpu` gives what the default gives; `--device cuda` without a GPU is refused before any work."""
    import torch

    model = str(DEMO / "models" / "tiny-story")
    args = ["analyze", model, "--metric", metric, "--json", "-q"]
    if metric == "angular":
        args += ["--text", str(DEMO / "heldout.txt"), "--max-texts", "4"]
    assert main(args) == 0
    default = capsys.readouterr().out
    assert main(args + ["--device", "cpu"]) == 0
    assert capsys.readouterr().out == default

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(args + ["--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == "--device cuda: no CUDA device is available here"


TEXT = str(DEMO / "heldout.txt")
MEASURES = {
    "snr": ["analyze", "{model}", "--metric", "snr"],
    "angular": ["analyze", "{model}", "--metric", "angular", "--text", TEXT, "--max-texts", "4"],
    "angular-mean": ["analyze", "{model}", "--metric", "angular", "--token", "mean", "--n", "2", "--text", TEXT,
                     "--max-texts", "4"],
    "bi": ["analyze", "{model}", "--metric", "bi", "--text", TEXT, "--max-texts", "4"],
    "super-weights": ["analyze", "{model}", "--metric", "super-weights", "--verify", "--text", TEXT],
    "eval": ["eval", "{model}", "--text", TEXT, "--seq-len", "64"],
    "eval-recipe": ["eval", str(DEMO / "story-merge-ties.yaml"), "--text", TEXT, "--seq-len", "64"],
    "analyze-routing": ["analyze-routing", "{moe}", "--text", TEXT, "--max-texts", "4"],
}


@pytest.fixture(scope="module")
def demo_moe(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe") / "moe"
    assert main(["run", str(DEMO / "moe-from-prompts.yaml"), "-o", str(out), "-q"]) == 0
    return out


@pytest.mark.parametrize("measure", sorted(MEASURES))
def test_measurements_with_device_cuda_are_the_cpus(capsys, demo_moe, measure):
    """On the stand-in device of tests/simulated_cuda.py (it computes on the CPU and refuses a host tensor mixed
    into device work), every command that runs the model puts it on the device and prints what the CPU prints
    (SNR's eigenvalues to float64 rounding)."""
    from tests.simulated_cuda import simulated_cuda

    args = [a.format(model=DEMO / "models" / "tiny-story", moe=demo_moe) for a in MEASURES[measure]]
    assert main([*args, "--json", "-q"]) == 0
    on_cpu = json.loads(capsys.readouterr().out)
    with simulated_cuda() as placed:
        assert main([*args, "--json", "-q", "--device", "cuda"]) == 0
    on_device = json.loads(capsys.readouterr().out)
    assert placed.count > 0
    if measure == "snr":
        assert [r["signal_values"] for r in on_device["rows"]] == [r["signal_values"] for r in on_cpu["rows"]]
        assert [r["snr"] for r in on_device["rows"]] == pytest.approx([r["snr"] for r in on_cpu["rows"]], rel=1e-12)
    else:
        assert on_device == on_cpu


def _help(capsys, monkeypatch, *command: str) -> str:
    """What `recipe COMMAND --help` prints, each option's help on one line (argparse wraps to $COLUMNS)."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    return capsys.readouterr().out


def test_analyze_help_names_every_metric_that_reads_text(capsys, monkeypatch):
    text_help = next(line for line in _help(capsys, monkeypatch, "analyze").splitlines()
                     if line.lstrip().startswith("--text"))
    assert all(metric in text_help for metric in ("angular", "bi", "super-weights")), text_help


OPTION = re.compile(r"(?<![\w-])--?[a-z][a-z-]*")  # -q, --max-tokens; not the hyphen inside super-weights


def _documented_options() -> dict[str, set[str]]:
    """The options that docs/cli.md's synopsis block names, by command ("" for lines of `recipe` itself)."""
    block = re.search(r"^```\n(recipe .*?)^```", (ROOT / "docs" / "cli.md").read_text(), re.DOTALL | re.MULTILINE)[1]
    documented: dict[str, set[str]] = {}
    for line in block.splitlines():
        word = line.split()[1]
        documented.setdefault("" if word.startswith("-") else word, set()).update(OPTION.findall(line))
    return documented


def test_cli_md_synopses_name_exactly_each_commands_options(capsys, monkeypatch):
    documented = _documented_options()
    top = _help(capsys, monkeypatch)
    commands = re.findall(r"^    (\S+)", top, re.MULTILINE)  # the subcommands, as `recipe --help` lists them
    assert sorted(set(documented) - {""}) == sorted(commands)
    for command in commands:
        usage = _help(capsys, monkeypatch, command).split("\n\n")[0]
        assert documented[command] == set(OPTION.findall(usage)) - {"-h"}, command
    assert documented[""] <= set(OPTION.findall(top.split("\n\n")[0]))


def test_version_comes_from_package_metadata(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"recipekit {version('recipekit')}"


def test_console_script_is_installed(tmp_path):
    script = Path(sys.executable).parent / "recipe"
    result = subprocess.run([str(script), "validate", str(DEMO / "drop-layers.yaml")], capture_output=True,
                            text=True, env={**os.environ})
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_ctrl_c_while_starting_up_is_one_line_not_a_traceback(tmp_path):
    """SIGINT arrives while the console script is still importing recipekit."""
    script = ("import builtins, sys\n"
              "real = builtins.__import__\n"
              "def slow(name, *args, **kwargs):\n"
              "    if name == 'recipekit.engine.cli':\n"
              "        raise KeyboardInterrupt\n"
              "    return real(name, *args, **kwargs)\n"
              "builtins.__import__ = slow\n"
              "sys.argv = ['recipe', 'validate', 'x.yaml']\n"
              "from recipekit.engine.entry import main\n"
              "main()\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 130, result.stderr
    assert result.stderr == "recipe: interrupted; no output was written\n"
