"""The output location: OUT that exists, holds the user's work or an input, cannot be created; usage of -o."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recipekit.engine.cli import main
from tests.bad_inputs.checks import (
    assert_no_output,
    assert_refused,
    cli,
    snapshot,
    yaml_text,
)

# --------------------------------------------------------------------------- the output location

RUN_RECIPE = """
recipe: 1
models:
  a: {model}
steps:
  - op: drop_layers
    model: a
    layers: [1]
"""


def _model_copy(tmp_path: Path, llama: Path) -> tuple[Path, Path]:
    model = tmp_path / "models" / "llama"
    shutil.copytree(llama, model)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml_text(RUN_RECIPE.format(model="./models/llama")), encoding="utf-8")
    return model, recipe


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_out_already_exists(tmp_path: Path, llama: Path, capsys, kind: str) -> None:
    _, recipe = _model_copy(tmp_path, llama)
    out = tmp_path / "OUT"
    if kind == "directory":
        out.mkdir()
        (out / "notes.txt").write_text("my earlier work")
    else:
        out.write_text("my earlier work")
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", out)

    assert_refused(result, [(f"{out.resolve()} ", ("already exists", "--overwrite"))])
    assert snapshot(tmp_path) == before  # OUT untouched
    assert not list(tmp_path.glob(".OUT.recipekit-*"))


@pytest.mark.parametrize("where", [".", ".."])
def test_overwrite_never_replaces_the_recipes_folder(tmp_path: Path, llama: Path, capsys, where: str) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    _, recipe = _model_copy(folder, llama)
    (folder / "notes.txt").write_text("my notes")
    out = folder / where
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", out, "--overwrite")

    assert_refused(result, [
        ("", (f"the output {out.resolve()} would replace {folder}, the recipe's folder",)),
        ("", (f"the input model directory {folder / 'models' / 'llama'} is inside the output",)),
    ])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where", ["", " ", "."])
def test_an_empty_or_dot_out_never_replaces_the_current_directory(tmp_path: Path, llama: Path, capsys,
                                                                  monkeypatch, where: str, overwrite: bool) -> None:
    """`recipe run R -o "$OUT" --overwrite` with `$OUT` unset: the current directory is never replaced."""
    _, recipe = _model_copy(tmp_path / "recipe", llama)
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("two years of work")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", where, *(["--overwrite"] if overwrite else []))

    expected = ("the output path is empty",) if not where.strip() else (f"would replace {work}", "current directory")
    assert_refused(result, [("", expected)])
    assert snapshot(tmp_path) == before
    assert not list(tmp_path.glob(".*recipekit-*"))


@pytest.mark.parametrize("where", ["..", "/"])
def test_out_never_holds_the_current_directory(tmp_path: Path, llama: Path, capsys, monkeypatch,
                                               where: str) -> None:
    _, recipe = _model_copy(tmp_path / "recipe", llama)
    work = tmp_path / "projects" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", where, "--overwrite")

    if where == "/":
        assert_refused(result, [("", ("filesystem root",)), ("", ("the input model directory", "inside the output /"))])
    else:
        assert_refused(result, [("", (f"would replace {work}", "current directory"))])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["home", "parent of home"])
def test_out_never_replaces_home(tmp_path: Path, llama: Path, capsys, monkeypatch, where: str) -> None:
    _, recipe = _model_copy(tmp_path / "recipe", llama)
    home = tmp_path / "users" / "me"
    home.mkdir(parents=True)
    (home / ".bashrc").write_text("alias ll='ls -l'")
    monkeypatch.setenv("HOME", str(home))
    out = home if where == "home" else home.parent
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", out, "--overwrite")

    assert_refused(result, [("", (f"would replace {home}", "home directory"))])
    assert snapshot(tmp_path) == before


def test_overwrite_names_an_old_output_it_could_not_remove(tmp_path: Path, llama: Path, capsys,
                                                          monkeypatch) -> None:
    """The old OUT is deleted only after the new one is in place; a failed deletion is said, not hidden."""
    import recipekit.engine.run.write as execute

    _, recipe = _model_copy(tmp_path, llama)
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "old.txt").write_text("the previous model")
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if ".recipekit-old-" in str(path):
            raise PermissionError(13, "Permission denied", str(Path(path) / "old.txt"))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(execute.shutil, "rmtree", rmtree)
    result = cli(capsys, "run", recipe, "-o", out, "--overwrite", "-q")

    assert result.rc == 0, result.err
    (old,) = tmp_path.glob(".OUT.recipekit-old-*")
    assert (old / "old.txt").read_text() == "the previous model"
    assert (out / "config.json").exists() and not (out / "old.txt").exists()
    warning = [ln for ln in result.err.splitlines() if ln.startswith("recipe: warning:")]
    assert len(warning) == 1 and str(old) in warning[0] and "remove it yourself" in warning[0], result.err


def test_overwrite_puts_the_old_output_back_when_the_new_one_cannot_take_its_place(
        tmp_path: Path, llama: Path, capsys, monkeypatch) -> None:
    import recipekit.engine.run.write as execute

    _, recipe = _model_copy(tmp_path, llama)
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "old.txt").write_text("the previous model")
    real_rename = os.rename

    def rename(src, dst):
        if ".recipekit-partial" in str(src):
            raise OSError(errno.EIO, "Input/output error", str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(execute.os, "rename", rename)
    result = cli(capsys, "run", recipe, "-o", out, "--overwrite", "-q")

    assert result.rc == 1, result.err
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert not list(tmp_path.glob(".OUT.recipekit-*"))


def test_overwrite_refuses_a_file(tmp_path: Path, llama: Path, capsys) -> None:
    _, recipe = _model_copy(tmp_path, llama)
    out = tmp_path / "OUT"
    out.write_text("my earlier work")
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", out, "--overwrite")

    assert_refused(result, [(f"{out.resolve()} ", ("not a directory",))])
    assert snapshot(tmp_path) == before
    assert not list(tmp_path.glob(".OUT.recipekit-*"))


def test_out_inside_input_model(tmp_path: Path, llama: Path, capsys) -> None:
    model, recipe = _model_copy(tmp_path, llama)
    out = model / "pruned"
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", out)

    assert_refused(result, [(f"the output {out.resolve()} ", ("inside the input model directory", str(model.resolve())))])
    assert_no_output(out)
    assert snapshot(tmp_path) == before


def test_out_is_the_input_model_even_with_overwrite(tmp_path: Path, llama: Path, capsys) -> None:
    model, recipe = _model_copy(tmp_path, llama)
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", model, "--overwrite")

    assert_refused(result, [(f"the output {model.resolve()} ", ("inside the input model directory",))])
    assert snapshot(tmp_path) == before  # the input survives
    assert not list(model.parent.glob(".llama.recipekit-*"))


def test_out_contains_the_input_model_even_with_overwrite(tmp_path: Path, llama: Path, capsys) -> None:
    model, recipe = _model_copy(tmp_path, llama)
    out = tmp_path / "models"
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", out, "--overwrite")

    assert_refused(result, [(f"the input model directory {model.resolve()} ", (f"inside the output {out.resolve()}",))])
    assert snapshot(tmp_path) == before  # --overwrite did not delete the input
    assert not list(tmp_path.glob(".models.recipekit-*"))


def test_out_below_a_file(tmp_path: Path, llama: Path, capsys) -> None:
    """`-o notes.txt/OUT`: the output cannot be created, which is the user's mistake (exit 2), not a crash."""
    _, recipe = _model_copy(tmp_path, llama)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder")
    out = notes / "OUT"
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", out)

    assert_refused(result, [("", (str(notes.resolve()), "not a directory"))])
    assert snapshot(tmp_path) == before


def test_unknown_device(tmp_path: Path, llama: Path, capsys) -> None:
    model, _ = _model_copy(tmp_path, llama)
    recipe = tmp_path / "cast.yaml"
    recipe.write_text(yaml_text(RUN_RECIPE.format(model="./models/llama")) + "output:\n  dtype: bfloat16\n",
                      encoding="utf-8")
    out = tmp_path / "OUT"
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", out, "--device", "tpu")

    assert_refused(result, [("--device tpu: ", ("expected cpu or cuda",))])
    assert_no_output(out)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- usage


def test_run_without_out(tmp_path: Path, llama: Path, capsys) -> None:
    """Forgetting `-o OUT` is a usage error: exit 2 with argparse's one-line complaint, nothing written."""
    _, recipe = _model_copy(tmp_path, llama)
    before = snapshot(tmp_path)
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(recipe)])

    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    assert "error: the following arguments are required: -o/--out" in err
    assert snapshot(tmp_path) == before


def test_a_second_run_to_the_same_out_is_refused_naming_the_first(tmp_path: Path, llama: Path, capsys) -> None:
    import fcntl

    _, recipe = _model_copy(tmp_path, llama)
    out = tmp_path / "OUT"
    lock = tmp_path / ".OUT.recipekit-lock"
    with open(lock, "w") as held:  # as a running `recipe run` holds it
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = cli(capsys, "run", recipe, "-o", out)
    assert_refused(result, [("", ("another recipe run (pid 4242) is writing", str(out.resolve())))])
    assert not out.exists() and not list(tmp_path.glob(".OUT.recipekit-partial*"))


def test_a_run_leaves_no_lock_and_clears_partials_of_killed_runs(tmp_path: Path, llama: Path, capsys) -> None:
    _, recipe = _model_copy(tmp_path, llama)
    out = tmp_path / "OUT"
    stale = tmp_path / ".OUT.recipekit-partial-1"  # what a run killed with SIGKILL leaves (pid 1 is alive)
    stale.mkdir()
    (stale / "model-00001-of-00001.safetensors").write_bytes(b"half")
    assert cli(capsys, "run", recipe, "-o", out, "-q").rc == 0
    assert sorted(p.name for p in tmp_path.glob(".OUT*")) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_remove_the_partial_output(tmp_path: Path, llama: Path, signum: int) -> None:
    """The signal arrives while tensors are being written: one line, the conventional exit code, nothing left."""
    _, recipe = _model_copy(tmp_path, llama)
    recipe.write_text(recipe.read_text() + "output:\n  dtype: bfloat16\n")  # a conversion: tensors are computed
    out = tmp_path / "OUT"
    script = textwrap.dedent(f"""
        import os, signal, sys
        from recipekit.engine.run import evaluate
        from recipekit.engine.cli import main
        def cast_stream(*args, **kwargs):
            os.kill(os.getpid(), {int(signum)})
        evaluate.cast_stream = cast_stream
        sys.exit(main(["run", {str(recipe)!r}, "-o", {str(out)!r}, "-q"]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 128 + signum, result.stderr
    assert result.stderr.strip() == f"recipe: stopped by {signal.Signals(signum).name}; no output was written"
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.glob(".OUT*")) == []


def test_an_out_name_too_long_for_the_hidden_partial_name_is_refused(tmp_path: Path, llama: Path, capsys) -> None:
    _, recipe = _model_copy(tmp_path, llama)
    out = tmp_path / ("x" * 240)  # a legal name, but not with ".<name>.recipekit-old-<pid>" around it
    before = snapshot(tmp_path)
    result = cli(capsys, "run", recipe, "-o", out)
    assert_refused(result, [("", ("is too long", "hidden name", "at most 255 bytes"))])
    assert snapshot(tmp_path) == before


def test_overwrite_in_a_folder_that_is_not_writable_is_refused(tmp_path: Path, llama: Path, capsys,
                                                                monkeypatch) -> None:
    """(As root every folder is writable, so the check is exercised through os.access.)"""
    import recipekit.engine.run.write as write

    _, recipe = _model_copy(tmp_path, llama)
    out = tmp_path / "ro" / "OUT"
    out.mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(write.os, "access", lambda p, mode: False if Path(p) == out.parent else real_access(p, mode))
    before = snapshot(tmp_path)
    result = cli(capsys, "run", recipe, "-o", out, "--overwrite")
    assert_refused(result, [("", (f"cannot replace {out}", "not writable"))])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("lock, words", [
    ("{not json", ("not a readable recipe lock",)),
    ('["a list"]', ("not a recipe lock",)),
    ('{"inputs": {"a": {"files": {"model.safetensors": {"size": 1}}}}}', ("not a recipe lock",)),
    ("[" * 100_000 + "]" * 100_000, ("not a readable recipe lock",)),
])
def test_a_malformed_lock_is_refused_where_it_is(tmp_path: Path, llama: Path, capsys, lock: str,
                                                words: tuple[str, ...]) -> None:
    _, recipe = _model_copy(tmp_path, llama)
    lock_file = recipe.with_suffix(".lock")
    lock_file.write_text(lock)
    out = tmp_path / "OUT"
    result = cli(capsys, "run", recipe, "-o", out, "--locked")
    assert_refused(result, [(f"{lock_file}: ", words)])
    assert_no_output(out)


def test_a_disk_that_fills_up_mid_write_says_how_much_and_leaves_nothing(tmp_path: Path, llama: Path, capsys,
                                                                         monkeypatch) -> None:
    import recipekit.engine.run.shards as shards

    _, recipe = _model_copy(tmp_path, llama)
    out = tmp_path / "OUT"
    real_copy = shards._copy_range
    calls = []

    def copy_range(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # a few tensors in: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(shards, "_copy_range", copy_range)
    before = snapshot(tmp_path)
    result = cli(capsys, "run", recipe, "-o", out, "-q")
    assert result.rc == 1, result.err
    line = result.err.strip()
    assert line.startswith(f"recipe: failed: the disk filled up while writing {out.resolve()}: the output needs ")
    assert "is free now" in line and len(result.err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before  # no partial output, no lock, no OUT


def test_too_little_free_space_is_refused_before_writing(tmp_path: Path, llama: Path, capsys, monkeypatch) -> None:
    import collections

    import recipekit.engine.run.write as write

    _, recipe = _model_copy(tmp_path, llama)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(write.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    before = snapshot(tmp_path)
    result = cli(capsys, "run", recipe, "-o", tmp_path / "OUT")
    assert_refused(result, [("", ("not enough free disk", "1.0 KB is free"))])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["loop1", "loop1/sub"])
def test_an_out_in_a_symlink_loop_is_refused(tmp_path: Path, llama: Path, capsys, name: str) -> None:
    _, recipe = _model_copy(tmp_path, llama)
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    before = snapshot(tmp_path)
    result = cli(capsys, "run", recipe, "-o", tmp_path / name)
    assert_refused(result, [("the output path ", ("cannot be resolved", "Symlink loop"))])
    assert snapshot(tmp_path) == before
