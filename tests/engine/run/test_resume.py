"""`recipe run --resume`: a run killed with SIGKILL at any moment is finished by the same command with --resume,
keeping the shards its journal records (rehashed), and the output is byte-identical to an uninterrupted run."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recipekit.engine.cli import main
from recipekit.engine.core.sizes import human
from tests.tiny import make_model, write_recipe

KILLER = textwrap.dedent("""
    import os, signal, sys
    from recipekit.engine.run import journal, shards
    from recipekit.engine.cli import main

    mode, n, recipe, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    count = [0]

    def kill_at_the_nth(real):
        def wrapped(*args, **kwargs):
            result = real(*args, **kwargs)
            if mode != "journal" or "shard" in args[1]:
                count[0] += 1
                if count[0] == n:
                    os.kill(os.getpid(), signal.SIGKILL)
            return result
        return wrapped

    if mode == "copy":  # after the n-th tensor copied: shards half written, some journaled, some being hashed
        shards._copy_range = kill_at_the_nth(shards._copy_range)
    elif mode == "cast":  # the same for tensors computed in Python (a dtype conversion)
        from recipekit.engine.run import evaluate
        evaluate.cast_stream = kill_at_the_nth(evaluate.cast_stream)
    else:  # right after the journal records its n-th finished shard (recorded at once, not in the background,
        # so that the run cannot finish first)
        journal.Journal.finished = lambda self, name: self._record(name)
        journal.Journal._append = kill_at_the_nth(journal.Journal._append)
    sys.exit(main(["run", recipe, "-o", out, "-q"]))
""")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("resume") / "base", layers=8, seed=5, shard_size="40KB")


def _recipe(folder: Path, model: Path, dtype: str | None = None) -> Path:
    return write_recipe(folder, f"""
        recipe: 1
        models: {{base: {model}}}
        steps:
          - op: drop_layers
            model: base
            layers: [3]
        output:
          shard_size: 20KB
          {f"dtype: {dtype}" if dtype else ""}
        """)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _kill(mode: str, n: int, recipe: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLER, mode, str(n), str(recipe), str(out)], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("mode, dtype", [("copy", None), ("cast", "bfloat16")])
def test_a_run_killed_at_random_moments_resumes_to_the_same_bytes(tmp_path, model, capsys, mode, dtype):
    recipe = _recipe(tmp_path, model, dtype)
    reference = tmp_path / "reference"
    assert main(["run", str(recipe), "-o", str(reference), "-q"]) == 0
    expected = _files(reference)
    assert len(list(reference.glob("*.safetensors"))) >= 5
    tensors = len(json.loads((reference / "model.safetensors.index.json").read_text())["weight_map"])
    points = sorted(random.Random(1234).sample(range(1, tensors), 4))
    for n in points:
        out = tmp_path / f"out-{n}"
        killed = _kill(mode, n, recipe, out)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert not out.exists()
        partial = tmp_path / f".{out.name}.recipekit-partial"
        assert partial.is_dir() and not (partial / "config.json").exists()  # never mistaken for a model
        capsys.readouterr()
        assert main(["run", str(recipe), "-o", str(out), "-q", "--resume"]) == 0
        # what is kept depends on how far the background hashing got (test_resume_keeps_exactly_... pins it)
        assert "recipe: --resume: kept" in capsys.readouterr().err
        assert _files(out) == expected, f"killed after {n} tensors"
        assert not partial.exists()


def test_resume_keeps_exactly_the_journaled_shards(tmp_path, model, capsys):
    recipe = _recipe(tmp_path, model)
    reference = tmp_path / "reference"
    assert main(["run", str(recipe), "-o", str(reference), "-q"]) == 0
    sizes = sorted((p.name, p.stat().st_size) for p in reference.glob("*.safetensors"))
    out = tmp_path / "out"
    assert _kill("journal", 3, recipe, out).returncode == -signal.SIGKILL
    journal = (tmp_path / ".out.recipekit-partial" / ".recipekit-journal").read_text().splitlines()
    recorded = [json.loads(line)["shard"] for line in journal[1:]]
    assert len(recorded) >= 3  # a second writer thread may record one more before the kill lands
    capsys.readouterr()
    assert main(["run", str(recipe), "-o", str(out), "-q", "--resume"]) == 0
    kept = sum(size for name, size in sizes if name in recorded)
    assert f"recipe: --resume: kept {human(kept)} of finished shards from the killed run" in capsys.readouterr().err
    assert _files(out) == _files(reference)


def test_a_journaled_shard_that_changed_is_written_again(tmp_path, model, capsys):
    recipe = _recipe(tmp_path, model)
    reference = tmp_path / "reference"
    assert main(["run", str(recipe), "-o", str(reference), "-q"]) == 0
    out = tmp_path / "out"
    assert _kill("journal", 2, recipe, out).returncode == -signal.SIGKILL
    partial = tmp_path / ".out.recipekit-partial"
    first = json.loads((partial / ".recipekit-journal").read_text().splitlines()[1])["shard"]
    data = bytearray((partial / first).read_bytes())
    data[-1] ^= 0xFF  # what a power loss or a stray write may leave
    (partial / first).write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["run", str(recipe), "-o", str(out), "-q", "--resume"]) == 0
    assert "1 journaled shard(s) no longer match their digest and are written again" in capsys.readouterr().err
    assert _files(out) == _files(reference)


def test_resume_after_the_inputs_changed_starts_from_the_beginning(tmp_path, model, capsys):
    import shutil

    local = tmp_path / "model"
    shutil.copytree(model, local)
    recipe = _recipe(tmp_path, local)
    out = tmp_path / "out"
    assert _kill("journal", 2, recipe, out).returncode == -signal.SIGKILL
    config = local / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    shard = sorted(local.glob("*.safetensors"))[0]
    shard.touch()  # a new mtime: another input as far as a resume can tell
    capsys.readouterr()
    assert main(["run", str(recipe), "-o", str(out), "-q", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "recipe: --resume: kept nothing; the partial output was written for other inputs" in err
    reference = tmp_path / "reference"
    assert main(["run", str(recipe), "-o", str(reference), "-q"]) == 0
    assert _files(out) == _files(reference)


def test_resume_with_nothing_to_resume_writes_from_the_start(tmp_path, model, capsys):
    recipe = _recipe(tmp_path, model)
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q", "--resume"]) == 0
    assert "recipe: --resume: kept nothing; no partial output to resume" in capsys.readouterr().err


def test_sigterm_after_finished_shards_keeps_them_for_resume(tmp_path, model):
    recipe = _recipe(tmp_path, model)
    out = tmp_path / "out"
    script = KILLER.replace("signal.SIGKILL", "signal.SIGTERM")
    stopped = subprocess.run([sys.executable, "-c", script, "journal", "2", str(recipe), str(out)],
                             capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 128 + signal.SIGTERM
    partial = tmp_path / ".out.recipekit-partial"
    assert stopped.stderr.strip().startswith("recipe: stopped by SIGTERM; no output was written, but ")
    shards = len(list(partial.glob("*.safetensors")))
    assert f"finished shard(s) of {shards} are kept in {partial}: the same command with --resume" in stopped.stderr
    assert partial.is_dir() and not out.exists()
    assert main(["run", str(recipe), "-o", str(out), "-q", "--resume"]) == 0
    assert main(["run", str(recipe), "-o", str(tmp_path / "reference"), "-q"]) == 0
    assert _files(out) == _files(tmp_path / "reference")
