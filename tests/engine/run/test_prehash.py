"""The early hashing the console script starts before recipekit has loaded (run/prehash.py): what it guesses from
the command line and the recipe, that the lock adopts its digests and equals a lock hashed file by file, that a
wrong guess is cancelled and a failed guess is no error, and that hashing threads yield the CPU to the run."""
from __future__ import annotations

import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from recipekit.engine import api, entry
from recipekit.engine.api import load_recipe
from recipekit.engine.run import digest, hash_cache, lock, prehash, shards
from tests.engine.run.test_lock import _sequential_lock
from tests.tiny import make_model, write_recipe


@pytest.fixture(autouse=True)
def no_early_hashing_left():
    yield
    prehash.stop()
    assert prehash._early is None


def run_console_script(monkeypatch, *args: str) -> int:
    """`recipe ARGS` through the console script's own entry point, in this process."""
    monkeypatch.setattr(sys, "argv", ["recipe", *args])
    with pytest.raises(SystemExit) as done:
        entry.main()
    return done.value.code


@pytest.fixture
def models(tmp_path):
    """Two models, each of several shards, and a recipe that reads one: `base` is named; `other` only in its
    description, a guess that must come to nothing."""
    make_model(tmp_path / "base", layers=4, seed=1, shard_size="40KB")
    make_model(tmp_path / "other", layers=4, seed=2, shard_size="40KB")
    recipe = write_recipe(tmp_path, """
        recipe: 1
        description: other
        models: {base: base}
        steps:
          - op: drop_layers
            model: base
            layers: [1]
        """)
    return tmp_path, recipe


def test_the_lock_adopts_the_early_digests_and_equals_sequential_hashing(models, monkeypatch):
    tmp_path, recipe = models
    adopted, cancelled = [], []
    adopt, end = prehash.adopt, prehash._Early.end

    def record_adopt(key):
        futures = adopt(key)
        adopted.append(futures is not None)
        return futures

    def record_end(self, *, stop_adopted):
        cancelled.extend(key for key in self.files)
        end(self, stop_adopted=stop_adopted)

    monkeypatch.setattr(prehash, "adopt", record_adopt)
    monkeypatch.setattr(prehash._Early, "end", record_end)
    interval = sys.getswitchinterval()
    assert run_console_script(monkeypatch, "run", str(recipe), "-o", str(tmp_path / "out"), "-q") == 0

    weights = sorted((tmp_path / "base").glob("*.safetensors"))
    assert len(weights) > 1 and adopted.count(True) == len(weights)  # every shard came from the early start
    # the folder the description names was guessed too, then cancelled: not in the lock
    assert sorted(cancelled) == sorted(hash_cache.cache_key(p) for p in (tmp_path / "other").glob("*.safetensors"))
    got = json.loads((tmp_path / "out" / "recipe.lock").read_text())
    assert got["inputs"]["base"]["files"] == _sequential_lock(tmp_path, recipe)["base"]
    assert sys.getswitchinterval() == interval


def test_a_file_changed_after_the_early_start_is_hashed_again(models, monkeypatch):
    tmp_path, recipe = models
    start = prehash.start

    def start_then_change(argv):
        start(argv)
        shard = sorted((tmp_path / "base").glob("*.safetensors"))[0]
        os.utime(shard, ns=(1, 1))  # a new identity: the early digest is of another file now

    monkeypatch.setattr(prehash, "start", start_then_change)
    assert run_console_script(monkeypatch, "run", str(recipe), "-o", str(tmp_path / "out"), "-q") == 0
    got = json.loads((tmp_path / "out" / "recipe.lock").read_text())
    assert got["inputs"]["base"]["files"] == _sequential_lock(tmp_path, recipe)["base"]


def test_remembered_files_and_no_lock_are_not_hashed_early(models, monkeypatch):
    tmp_path, recipe = models
    args = ["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]
    assert run_console_script(monkeypatch, *args, "--overwrite") == 0
    other = tmp_path / "other"
    known = hash_cache.remembered()
    hash_cache.remember({**known, **{hash_cache.cache_key(p): "0" * 64 for p in other.glob("*.safetensors")}})
    assert prehash._files_to_hash(recipe, __import__("yaml")) == []  # every weight file's digest is known
    prehash.start(args)
    assert prehash._early is None
    assert prehash._recipe_file(["run", str(recipe), "-o", "x", "--no-lock"]) is None


@pytest.mark.parametrize("argv, expected", [
    (["run", "RECIPE", "-o", "out"], "RECIPE"),
    (["run", "-o", "out", "-q", "RECIPE", "--device", "cpu"], "RECIPE"),
    (["run", "RECIPE", "-o", "out", "--no-lock"], None),
    (["run", "RECIPE", "-o", "out", "--no-l"], None),  # argparse takes abbreviations
    (["run", "RECIPE", "-o", "out", "--locked"], "RECIPE"),
    (["validate", "RECIPE"], None),
    (["run", "org/name", "-o", "out"], None),  # a Hub recipe: nothing local to read
    ([], None),
])
def test_the_recipe_file_is_read_from_the_command_line(tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "RECIPE").write_text("recipe: 1\n")
    (tmp_path / "out").mkdir()
    assert prehash._recipe_file(argv) == (Path(expected) if expected else None)


def test_model_folders_are_found_in_recipes_and_mergekit_configs(tmp_path):
    import yaml

    for name in ("a", "b", "c"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "config.json").write_text("{}")
    (tmp_path / "not-a-model").mkdir()
    config = tmp_path / "merge.yml"
    config.write_text(f"""
        slices:
          - sources:
              - {{model: models/a, layer_range: [0, 2]}}
              - &b {{model: {tmp_path}/models/b, layer_range: [0, 2]}}
          - sources: [*b, *b]
        base_model: models/c
        merge_method: slerp
        tokenizer_source: not-a-model
        dtype: {"x" * 5000}
        name: {"y" * 300}
        """.replace("\n        ", "\n"))
    found = prehash._model_folders(config, yaml)
    assert sorted(found) == [(tmp_path / "models" / n).resolve() for n in ("a", "b", "c")]


def test_an_unreadable_recipe_means_no_early_start_and_the_run_says_why(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("recipe: 1\nmodels: {base: [unclosed\n")
    assert run_console_script(monkeypatch, "run", str(recipe), "-o", str(tmp_path / "out"), "-q") == 2
    assert str(recipe) in capsys.readouterr().err
    assert prehash._early is None and not (tmp_path / "out").exists()


def test_a_run_that_fails_stops_the_early_hashing(models, monkeypatch, capsys):
    tmp_path, recipe = models
    recipe.write_text(recipe.read_text().replace("layers: [1]", "layers: [9]"))  # out of range: a plan error
    stopped = []
    end = prehash._Early.end
    monkeypatch.setattr(prehash._Early, "end", lambda self, *, stop_adopted: stopped.append(stop_adopted) or end(
        self, stop_adopted=stop_adopted))
    assert run_console_script(monkeypatch, "run", str(recipe), "-o", str(tmp_path / "out"), "-q") == 2
    assert stopped == [True] and prehash._early is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_hashing_threads_yield_the_cpu_and_the_caller_does_not():
    def in_a_thread():
        digest.yield_cpu()
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(in_a_thread).result() == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


def test_the_waiting_caller_hashes_a_queued_block_itself(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(os.urandom(10_000))
    busy = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        pool.submit(busy.wait, 20)  # the only hashing thread is busy
        queued = pool.submit(digest.blake3_file, path)
        got = lock._wait_or_hash(queued, path, threading.Event())
        assert queued.cancelled() and got == digest.blake3_file(path)
        busy.set()


@pytest.mark.parametrize("cpu_shared", [True, False])
def test_copies_into_one_output_file_take_turns_while_the_lock_is_hashed(tmp_path, monkeypatch, cpu_shared):
    make_model(tmp_path / "base", layers=4, seed=1, shard_size="40KB")
    recipe = write_recipe(tmp_path, """
        recipe: 1
        models: {base: base}
        steps: [{op: drop_layers, model: base, layers: [1]}]
        output: {shard_size: 10MB}
        """)
    plan = load_recipe(recipe).plan()
    inside: dict[int, int] = {}
    most = [0]
    guard = threading.Lock()
    copy_range = shards._copy_range

    def counting(src, dst, *args):
        with guard:
            inside[dst] = inside.get(dst, 0) + 1
            most[0] = max(most[0], inside[dst])
        try:
            threading.Event().wait(0.002)  # long enough for another stream to arrive
            return copy_range(src, dst, *args)
        finally:
            with guard:
                inside[dst] -= 1

    monkeypatch.setattr(shards, "_copy_range", counting)
    monkeypatch.setattr(shards, "copy_threads", lambda: 2)
    (tmp_path / "out").mkdir()
    shards.write_shards(plan, tmp_path / "out", progress=False, device="cpu", cpu_shared=lambda: cpu_shared)
    assert len(inside) == 1  # one output shard
    assert most[0] == 1 if cpu_shared else most[0] == 2  # never two copies into it at once / one per stream


def test_the_writer_can_ask_whether_hashing_is_under_way(models, monkeypatch):
    tmp_path, recipe = models
    told = []
    write_model = api.write_model
    monkeypatch.setattr(api, "write_model", lambda *a, **k: told.append(k["cpu_shared"]()) or write_model(*a, **k))
    release = threading.Event()
    blake3_file = lock.blake3_file
    monkeypatch.setattr(lock, "blake3_file", lambda *a: release.wait(20) and blake3_file(*a))
    threading.Timer(1.0, release.set).start()
    load_recipe(recipe).run(tmp_path / "first")  # hashes held back: still hashing when the write starts
    release.set()
    load_recipe(recipe).run(tmp_path / "warm")  # remembered: nothing to hash
    assert told == [True, False]
