"""recipe.lock: complete (every file the build read or copied), hashed while the writer copies, equal to a lock
hashed file by file, checked by --locked, skipped by --no-lock, and remembered between runs."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading

import pytest
from blake3 import blake3

from recipekit.engine.api import load_recipe
from recipekit.engine.cli import main
from recipekit.engine.run import digest, hash_cache, lock, shards
from tests.tiny import add_char_tokenizer, make_model, write_recipe

TEXT = "The cat sat on the mat.\n\nA second paragraph of text, for the measurement.\n"


@pytest.fixture
def project(tmp_path):
    """Two sharded models with tokenizers and a generation config, a text, and a recipe that measures angular
    distance over the text on one model and writes layers of both."""
    for name, seed in (("a", 1), ("b", 2)):
        add_char_tokenizer(make_model(tmp_path / name, layers=4, seed=seed, shard_size="40KB"))
    (tmp_path / "calib.txt").write_text(TEXT)
    recipe = write_recipe(tmp_path, """
        recipe: 1
        models: {a: a, b: b}
        steps:
          - op: drop_layers
            id: pruned
            model: a
            select: {metric: angular, n: 1, text: calib.txt, max_texts: 2, seq_len: 16}
          - op: slice_layers
            slices: [{model: pruned, range: [0, 2]}, {model: b, range: [2, 4]}]
        """)
    return tmp_path, recipe


def b3(data: bytes) -> str:
    """The BLAKE3 of a file's bytes in one call (what `b3sum` prints), the reference for recipekit's streamed reads."""
    return blake3(data).hexdigest()


def _sequential_lock(tmp_path, recipe) -> dict:
    """The lock computed the plain way: every file the lock names, hashed one after the other."""
    loaded = load_recipe(recipe)
    groups = lock.lock_files(loaded.plan())
    def entries(files):
        return {key: {"size": path.stat().st_size, "blake3": b3(path.read_bytes())}
                for key, path in files.items()}
    return {name: entries(files) for name, files in groups.items()}


@pytest.mark.parametrize("read", [digest._READ, 4096])  # 4 KiB: every shard read in many pieces
def test_the_lock_covers_every_file_read_or_copied_and_equals_sequential_hashing(project, monkeypatch, read):
    tmp_path, recipe = project
    monkeypatch.setattr(digest, "_READ", read)
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0
    got = json.loads((tmp_path / "out" / "recipe.lock").read_text())
    assert got["recipekit_lock"] == lock.LOCK_VERSION
    expected = _sequential_lock(tmp_path, recipe)
    assert {name: entry["files"] for name, entry in got["inputs"].items()} == {"a": expected["a"],
                                                                                 "b": expected["b"]}
    text = str((tmp_path / "calib.txt").resolve())
    assert got["files"] == expected[None] == {text: expected[None][text]}

    a_files, b_files = set(got["inputs"]["a"]["files"]), set(got["inputs"]["b"]["files"])
    shards_a = {p.name for p in (tmp_path / "a").glob("*.safetensors")}
    # a: measured over the whole model, so every shard; its tokenizer turned the text into tokens; its side
    # files are copied into the output (the first model's, as the output tokenizer by default)
    assert a_files == {"config.json", "model.safetensors.index.json", "generation_config.json", "tokenizer.json",
                       "tokenizer_config.json"} | shards_a
    # b: only the shards of the layers the output takes, its config and index, and its tokenizer.json, read to
    # check that its vocabulary is a's (its other side files are not used)
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} < b_files
    assert not b_files & {"tokenizer_config.json", "generation_config.json"}
    for name in b_files - {"config.json", "model.safetensors.index.json", "tokenizer.json"}:
        assert name.endswith(".safetensors")


@pytest.mark.parametrize("change", ["tokenizer_config.json", "tokenizer.json", "generation_config.json",
                                    "calib.txt", "added chat template"])
def test_locked_refuses_a_changed_side_file_text_or_added_file(project, change, capsys):
    tmp_path, recipe = project
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0
    shutil.copy(tmp_path / "out" / "recipe.lock", tmp_path / "recipe.lock")
    if change == "calib.txt":
        (tmp_path / "calib.txt").write_text(TEXT + "\nOne more.\n")
    elif change == "added chat template":
        (tmp_path / "a" / "chat_template.jinja").write_text("{{ messages }}")
    else:
        path = tmp_path / "a" / change
        path.write_text(path.read_text() + "\n")  # the same JSON, other bytes
    capsys.readouterr()
    assert main(["run", str(recipe), "-o", str(tmp_path / "again"), "-q", "--locked"]) == 2
    err = capsys.readouterr().err
    if change == "added chat template":
        assert "input 'a': chat_template.jinja is read now but not in the lock" in err
    elif change == "calib.txt":
        assert "calib.txt changed (blake3" in err
    else:
        assert f"input 'a': {change} changed (blake3" in err
    assert not (tmp_path / "again").exists()


def test_locked_accepts_unchanged_inputs_and_refuses_a_lock_of_another_version(project, capsys):
    tmp_path, recipe = project
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0
    complete = json.loads((tmp_path / "out" / "recipe.lock").read_text())
    shutil.copy(tmp_path / "out" / "recipe.lock", tmp_path / "recipe.lock")
    assert main(["run", str(recipe), "-o", str(tmp_path / "again"), "-q", "--locked"]) == 0
    assert (tmp_path / "again" / "recipe.lock").read_bytes() == (tmp_path / "out" / "recipe.lock").read_bytes()

    (tmp_path / "recipe.lock").write_text(json.dumps({**complete, "recipekit_lock": 1}))
    capsys.readouterr()
    assert main(["run", str(recipe), "-o", str(tmp_path / "v1"), "-q", "--locked"]) == 2
    err = capsys.readouterr().err
    assert "this lock was written by another recipekit (lock version 1; this one writes and checks version 3" in err
    problems = [line for line in err.splitlines() if ": measuring " not in line]  # the selector says it measures
    assert len(problems) == 1 and not (tmp_path / "v1").exists()


def test_no_lock_hashes_nothing_and_the_card_says_unlocked(project, monkeypatch, capsys):
    tmp_path, recipe = project
    hashed = []
    monkeypatch.setattr(lock, "blake3_file", lambda path, stop=None: hashed.append(path))
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q", "--no-lock"]) == 0
    assert hashed == [] and not (tmp_path / "out" / "recipe.lock").exists()
    assert "This build is unlocked (`--no-lock`)" in (tmp_path / "out" / "README.md").read_text()
    with pytest.raises(SystemExit) as stop:
        main(["run", str(recipe), "-o", str(tmp_path / "both"), "-q", "--no-lock", "--locked"])
    assert stop.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_hashing_runs_while_the_shards_are_copied(project, monkeypatch):
    """A hash that can only finish once the writer has copied a tensor: a lock hashed before the write would
    time out here."""
    tmp_path, recipe = project
    copying = threading.Event()
    copy_range, blake3_file = shards._copy_range, lock.blake3_file

    def copy_and_signal(*args):
        copying.set()
        return copy_range(*args)

    def hash_after_a_copy(path, stop=None):
        assert copying.wait(timeout=20), "the lock was hashed before the writer copied anything"
        return blake3_file(path, stop)

    monkeypatch.setattr(shards, "_copy_range", copy_and_signal)
    monkeypatch.setattr(lock, "blake3_file", hash_after_a_copy)
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0
    got = json.loads((tmp_path / "out" / "recipe.lock").read_text())
    assert got["inputs"]["a"]["files"] == _sequential_lock(tmp_path, recipe)["a"]


def test_a_file_that_cannot_be_hashed_fails_the_run_and_leaves_nothing(project, monkeypatch, capsys):
    tmp_path, recipe = project
    blake3_file, config = lock.blake3_file, tmp_path / "a" / "config.json"

    def unreadable_config(path, stop=None):
        if path == config:  # chmod would not stop root, who runs the tests in CI
            raise PermissionError(13, "Permission denied", str(path))
        return blake3_file(path, stop)

    monkeypatch.setattr(lock, "blake3_file", unreadable_config)
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "cannot read this input to hash it for recipe.lock: Permission denied" in err
    assert str(tmp_path / "a" / "config.json") in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_local_hashes_are_remembered_and_invalidated(project, monkeypatch):
    tmp_path, recipe = project
    hashed = []
    blake3_file = lock.blake3_file
    monkeypatch.setattr(lock, "blake3_file",
                        lambda path, stop=None: hashed.append(path) or blake3_file(path, stop))
    plan = load_recipe(recipe).plan()
    first = lock.Hashing(plan).lock()
    count = len(hashed)
    assert count == len(set(hashed)) == sum(len(e["files"]) for e in first["inputs"].values()) + 1  # + the text
    assert lock.Hashing(plan).lock() == first and len(hashed) == count  # remembered
    config = tmp_path / "a" / "config.json"
    config.write_text(config.read_text() + " ")
    os.utime(config, ns=(1, 1))
    again = lock.Hashing(plan).lock()
    assert hashed[count:] == [config]
    assert again["inputs"]["a"]["files"]["config.json"]["blake3"] == b3(config.read_bytes())
    assert hash_cache.hash_cache_file().is_relative_to(tmp_path.parent)  # the test session's folder


def test_a_local_dir_download_keeps_the_sha256_huggingface_hub_recorded(project, monkeypatch):
    """`hf download --local-dir` writes `.cache/huggingface/download/<file>.metadata` (commit, etag, timestamp);
    an LFS file's etag is its sha256, so a model just downloaded that way is locked without reading it."""
    tmp_path, recipe = project
    shard = sorted((tmp_path / "b").glob("*.safetensors"))[-1]
    records = tmp_path / "b" / ".cache" / "huggingface" / "download"
    records.mkdir(parents=True)
    real = hashlib.sha256(shard.read_bytes()).hexdigest()
    record = records / f"{shard.name}.metadata"
    record.write_text(f"{'1' * 40}\n{real}\n{shard.stat().st_mtime + 5}\n")
    hashed = []
    blake3_file = lock.blake3_file
    monkeypatch.setattr(lock, "blake3_file",
                        lambda path, stop=None: hashed.append(path) or blake3_file(path, stop))
    plan = load_recipe(recipe).plan()
    assert lock.Hashing(plan).lock()["inputs"]["b"]["files"][shard.name] == {
        "size": shard.stat().st_size, "sha256": real}
    assert shard not in hashed

    record.write_text(f"{'1' * 40}\n{real}\n{shard.stat().st_mtime - 5}\n")  # the file changed after the download
    entry = lock.Hashing(plan).lock()["inputs"]["b"]["files"][shard.name]
    assert entry == {"size": shard.stat().st_size, "blake3": b3(shard.read_bytes())}
