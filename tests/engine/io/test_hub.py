"""Hub references through a real huggingface_hub cache layout, offline; lock files and --locked."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from recipekit.engine.cli import main
from tests.tiny import make_model, put_in_cache, tensors_of, write_recipe

COMMIT_1 = "1" * 40
COMMIT_2 = "2" * 40


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline cache holding org/tiny at two commits; refs/main points at the first."""
    cache = tmp_path / "hub-cache"
    one = make_model(tmp_path / "src1", layers=4, seed=11, shard_size="40KB")
    two = make_model(tmp_path / "src2", layers=4, seed=12)
    put_in_cache(cache, "org/tiny", one, COMMIT_1)
    put_in_cache(cache, "org/tiny", two, COMMIT_2, ref=None)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"cache": cache, "one": one, "two": two}


def _recipe(tmp_path, models: str) -> Path:
    return write_recipe(tmp_path, f"""
        recipe: 1
        models: {models}
        steps:
          - op: slice_layers
            slices: [{{model: a, range: [0, 2]}}, {{model: b, range: [2, 4]}}]
        """)


def test_hub_ids_resolve_through_the_cache_and_follow_refs(hub, tmp_path, capsys):
    recipe = _recipe(tmp_path, f"{{a: org/tiny, b: 'org/tiny@{COMMIT_1}'}}")
    assert main(["run", str(recipe), "-o", str(tmp_path / "out1"), "-q"]) == 0
    got = tensors_of(tmp_path / "out1")
    src = tensors_of(hub["one"])
    assert got["model.layers.0.mlp.up_proj.weight"].equal(src["model.layers.0.mlp.up_proj.weight"])
    lock = json.loads((tmp_path / "out1" / "recipe.lock").read_text())
    assert lock["inputs"]["a"]["commit"] == lock["inputs"]["b"]["commit"] == COMMIT_1
    assert COMMIT_1 in (tmp_path / "out1" / "README.md").read_text()
    assert "org/tiny" in (tmp_path / "out1" / "README.md").read_text().split("---")[1]  # base_model

    (hub["cache"] / "models--org--tiny" / "refs" / "main").write_text(COMMIT_2)  # the branch moves
    assert main(["run", str(recipe), "-o", str(tmp_path / "out2"), "-q"]) == 0
    lock = json.loads((tmp_path / "out2" / "recipe.lock").read_text())
    assert lock["inputs"]["a"]["commit"] == COMMIT_2 and lock["inputs"]["b"]["commit"] == COMMIT_1
    got = tensors_of(tmp_path / "out2")
    assert got["model.layers.0.mlp.up_proj.weight"].equal(tensors_of(hub["two"])["model.layers.0.mlp.up_proj.weight"])
    assert got["model.layers.2.mlp.up_proj.weight"].equal(src["model.layers.2.mlp.up_proj.weight"])


def test_plan_says_which_source_it_used(hub, tmp_path, capsys):
    local = tmp_path / "org" / "tiny"  # a local path that is also a plausible Hub id wins
    shutil.copytree(hub["two"], local)
    recipe = _recipe(tmp_path, f"{{a: org/tiny, b: 'org/tiny@{COMMIT_1}'}}")
    assert main(["plan", str(recipe), "--json"]) == 0
    inputs = {i["name"]: i for i in json.loads(capsys.readouterr().out)["inputs"]}
    assert inputs["a"]["kind"] == "local" and inputs["a"]["path"] == str(local)
    assert inputs["b"]["kind"] == "hub" and inputs["b"]["commit"] == COMMIT_1


class _Counting:
    """A file handle that counts the bytes read through it."""

    def __init__(self, handle):
        self.handle, self.read_bytes = handle, 0

    def read(self, n=-1):
        data = self.handle.read(n)
        self.read_bytes += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_plan_reads_only_headers(hub, tmp_path, monkeypatch):
    import builtins
    import struct

    handles, raw_opens = [], []
    real_open, real_os_open = builtins.open, os.open

    def counting_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if str(file).endswith(".safetensors"):
            handles.append((Path(file), _Counting(handle)))
            return handles[-1][1]
        return handle

    def recording_os_open(path, *args, **kwargs):
        if str(path).endswith(".safetensors"):
            raw_opens.append(path)
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(os, "open", recording_os_open)
    recipe = _recipe(tmp_path, "{a: org/tiny, b: org/tiny}")
    assert main(["plan", str(recipe)]) == 0
    assert len(handles) == len(list(hub["one"].glob("*.safetensors"))) > 1
    for path, handle in handles:
        header = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
        assert handle.read_bytes == header < path.stat().st_size
    assert raw_opens == []


def test_locked_refuses_a_moved_branch_and_a_modified_local_shard(hub, tmp_path, capsys):
    local = tmp_path / "local"
    shutil.copytree(hub["one"], local)
    recipe = _recipe(tmp_path, f"{{a: org/tiny, b: {local}}}")
    out = tmp_path / "out"
    assert main(["run", str(recipe), "-o", str(out), "-q"]) == 0
    shutil.copy(out / "recipe.lock", tmp_path / "recipe.lock")
    assert main(["run", str(recipe), "-o", str(tmp_path / "again"), "-q", "--locked"]) == 0

    (hub["cache"] / "models--org--tiny" / "refs" / "main").write_text(COMMIT_2)
    capsys.readouterr()
    assert main(["run", str(recipe), "-o", str(tmp_path / "moved"), "-q", "--locked"]) == 2
    err = capsys.readouterr().err
    assert f"input 'a' (org/tiny) now resolves to commit {COMMIT_2}, the lock has {COMMIT_1}" in err
    assert not (tmp_path / "moved").exists()

    (hub["cache"] / "models--org--tiny" / "refs" / "main").write_text(COMMIT_1)
    index = json.loads((local / "model.safetensors.index.json").read_text())
    shard = local / index["weight_map"]["model.layers.2.mlp.down_proj.weight"]  # a shard the recipe reads
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["run", str(recipe), "-o", str(tmp_path / "modified"), "-q", "--locked"]) == 2
    err = capsys.readouterr().err
    assert f"input 'b': {shard.name} changed" in err and str(tmp_path / "recipe.lock") in err
    assert not (tmp_path / "modified").exists()


def test_a_hub_id_missing_from_the_offline_cache_is_one_line(hub, tmp_path, capsys):
    recipe = _recipe(tmp_path, "{a: org/absent, b: org/tiny}")
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "models.a: Hub model 'org/absent@main': config.json is not in the cache" in err
    assert "HF_HUB_OFFLINE is set" in err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def unreachable_hub(monkeypatch):
    """HF_HUB_OFFLINE unset and the Hub's endpoint a local port nothing listens on: a Hub that cannot be reached."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    return port


def test_an_unreachable_hub_is_one_line_at_once(hub, tmp_path, capsys, unreachable_hub):
    import time

    recipe = _recipe(tmp_path, "{a: org/absent, b: org/tiny}")
    start = time.monotonic()
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 2
    assert time.monotonic() - start < 10  # huggingface_hub alone retries for some 23 s
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Retrying" not in err and "Traceback" not in err, err
    assert "models.a: Hub model 'org/absent@main': config.json is not in the cache" in err
    assert f"the Hub (http://127.0.0.1:{unreachable_hub}) cannot be reached" in err
    assert "nor is it a local directory (nothing at " in err
    assert not (tmp_path / "out").exists()

    recipe = _recipe(tmp_path, "{a: org/tiny, b: org/tiny}")  # in the cache: built from it, and said once
    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "cannot be reached" in line]
    assert len(notes) == 1 and "the Hub inputs come from the local cache" in notes[0]


def _share(hub, tmp_path, repo_id: str, models: str) -> Path:
    """Build a model from a recipe and publish its output folder in the cache as `repo_id`."""
    recipe = _recipe(tmp_path, models)
    out = tmp_path / "published"
    assert main(["run", str(recipe), "-o", str(out), "-q"]) == 0
    put_in_cache(hub["cache"], repo_id, out, "3" * 40)
    return out


def test_a_shared_recipe_rebuilds_byte_identical(hub, tmp_path, capsys, monkeypatch):
    original = _share(hub, tmp_path, "org/pruned", f"{{a: org/tiny, b: 'org/tiny@{COMMIT_1}'}}")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "org/pruned", "-o", str(tmp_path / "rebuilt"), "-q"]) == 0
    files = sorted(p.name for p in original.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "rebuilt").iterdir())
    for name in files:
        assert (original / name).read_bytes() == (tmp_path / "rebuilt" / name).read_bytes(), name

    capsys.readouterr()
    assert main(["show", "org/pruned"]) == 0
    shown = capsys.readouterr().out
    assert "op: slice_layers" in shown and f"#   a: org/tiny (commit {COMMIT_1}" in shown

    (hub["cache"] / "models--org--tiny" / "refs" / "main").write_text(COMMIT_2)  # its lock now refuses
    assert main(["run", "org/pruned", "-o", str(tmp_path / "moved"), "-q"]) == 2
    assert "now resolves to commit" in capsys.readouterr().err
    assert not (tmp_path / "moved").exists()


@pytest.mark.parametrize("kind", ["relative", "absolute", "parent", "home"])
def test_a_shared_recipe_naming_a_local_path_is_refused_unless_allowed(hub, tmp_path, capsys, monkeypatch, kind):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path))
    ref, target = {"relative": ("local-model", work / "local-model"),
                   "absolute": (str(tmp_path / "abs-model"), tmp_path / "abs-model"),
                   "parent": ("../x", tmp_path / "x"),
                   "home": ("~/home-model", tmp_path / "home-model")}[kind]
    recipe_dir = tmp_path / "shared"
    recipe_dir.mkdir()
    (recipe_dir / "recipe.yaml").write_text(
        f"recipe: 1\nmodels:\n  a: org/tiny\n  b: '{ref}'\nsteps:\n"
        "  - op: slice_layers\n    slices: [{model: a, range: [0, 2]}, {model: b, range: [2, 4]}]\n")
    (recipe_dir / "config.json").write_text("{}")
    put_in_cache(hub["cache"], "org/evil", recipe_dir, "4" * 40)
    shutil.copytree(hub["two"], target)

    assert main(["run", "org/evil", "-o", str(work / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("org/evil:recipe.yaml:4:6: models.b: ") and "is not a Hub id" in err
    assert "--allow-local-paths" in err and err.count("\n") == 1
    assert not (work / "out").exists()

    assert main(["run", "org/evil", "-o", str(work / "out"), "-q", "--allow-local-paths"]) == 0
    assert tensors_of(work / "out")["model.layers.2.mlp.up_proj.weight"].equal(
        tensors_of(hub["two"])["model.layers.2.mlp.up_proj.weight"])


class FakeHub:
    """A Hub 'online' for one test: serves files of local folders, records every download."""

    def __init__(self, cache: Path):
        self.cache, self.repos, self.downloads = cache, {}, []

    def add(self, repo_id: str, folder: Path, commit: str) -> None:
        self.repos[repo_id] = (commit, folder)

    def hf_hub_download(self, repo_id, filename, *, revision, cache_dir, local_files_only):
        from huggingface_hub.errors import EntryNotFoundError

        commit, folder = self.repos[repo_id]
        assert revision in ("main", commit) and not local_files_only
        if not (folder / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        self.downloads.append(filename)
        repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
        target = repo / "snapshots" / commit / filename
        if not target.exists():
            data = (folder / filename).read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            (repo / "blobs").mkdir(parents=True, exist_ok=True)
            (repo / "blobs" / digest).write_bytes(data)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(Path("..") / ".." / "blobs" / digest)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return str(target)

    def remote_header(self, repo_id, commit, filename, *, where):
        data = (self.repos[repo_id][1] / filename).read_bytes()
        n = int.from_bytes(data[:8], "little")
        return data[8:8 + n], len(data)


def test_online_plan_reads_headers_only_and_run_downloads_only_used_shards(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from recipekit.engine.io import hub

    cache = tmp_path / "cache"
    fake = FakeHub(cache)
    fake.add("org/big", make_model(tmp_path / "remote", layers=4, seed=5, shard_size="40KB"), "5" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(hub, "remote_header", fake.remote_header)
    monkeypatch.setattr(hub, "unreachable", lambda: None)  # the fake Hub answers, wherever the test runs
    recipe = write_recipe(tmp_path, """
        recipe: 1
        models: {a: org/big}
        steps: [{op: drop_layers, model: a, layers: [[1, 4]]}]
        """)
    assert main(["plan", str(recipe)]) == 0
    assert not [f for f in fake.downloads if f.endswith(".safetensors")]  # headers by range request only

    assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0
    index = json.loads((tmp_path / "remote" / "model.safetensors.index.json").read_text())
    used = {index["weight_map"][n] for n in index["weight_map"] if ".layers." not in n or ".layers.0." in n}
    fetched = {f for f in fake.downloads if f.endswith(".safetensors")}
    assert fetched == used and len(fetched) < len(set(index["weight_map"].values()))
    assert "skipped" in capsys.readouterr().err
    got, want = tensors_of(tmp_path / "out"), tensors_of(tmp_path / "remote")
    assert got["model.layers.0.mlp.up_proj.weight"].equal(want["model.layers.0.mlp.up_proj.weight"])


def test_validate_reads_nothing_remote(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("validate touched the Hub")

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    recipe = _recipe(tmp_path, "{a: org/not-cached, b: org/not-cached}")
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "ok (recipe: 2 model(s)" in out and "inputs not checked: org/not-cached not in the local Hub cache" in out


def test_validate_checks_cached_hub_inputs(hub, tmp_path, capsys):
    recipe = write_recipe(tmp_path, """
        recipe: 1
        models: {a: org/tiny}
        steps: [{op: drop_layers, model: a, layers: [9]}]
        """)
    assert main(["validate", str(recipe)]) == 2
    assert "layer 9 is out of range: 'a' has 4 layers" in capsys.readouterr().err


def test_a_shared_recipe_may_not_read_local_texts(hub, tmp_path, capsys, monkeypatch):
    recipe_dir = tmp_path / "shared"
    recipe_dir.mkdir()
    (recipe_dir / "recipe.yaml").write_text(
        "recipe: 1\nmodels: {a: org/tiny}\nsteps:\n"
        "  - {op: drop_layers, model: a, select: {metric: bi, count: 1, text: /etc/passwd}}\n")
    (recipe_dir / "config.json").write_text("{}")
    put_in_cache(hub["cache"], "org/reader", recipe_dir, "6" * 40)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "org/reader", "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("org/reader:recipe.yaml:4:70: steps[0].select.text: '/etc/passwd' is a local file")
    assert not (tmp_path / "out").exists()


def test_show_escapes_control_characters_of_a_shared_recipe(hub, tmp_path, capsys):
    """A shared recipe is untrusted text: escape sequences (a retitled or cleared terminal) are shown, not sent."""
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "recipe.yaml").write_bytes(b"recipe: 1\n# \x1b]0;pwned\x07\x1b[2J\xe2\x80\xae\n")
    put_in_cache(hub["cache"], "org/evil", folder, "4" * 40)
    capsys.readouterr()
    assert main(["show", "org/evil"]) == 0
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\u202e" in shown
