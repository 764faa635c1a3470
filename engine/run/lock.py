"""`recipe.lock`: exactly which input bytes built a model, and the check that they still match.

For every input: the reference as written, the resolved Hub commit (none for
a local directory), and for each file the build read (config and the shards holding used
tensors) its size and sha256. For Hub files the sha256 is the name of the
LFS blob in the cache; other files are hashed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from recipekit.engine.core.graph import loads_of
from recipekit.engine.errors import Problem, SourceError
from recipekit.engine.run.plan import Plan

LOCK_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def make_lock(plan: Plan) -> dict:
    """The lock of everything `plan` reads."""
    used: dict[Path, set[Path]] = {}
    for t in plan.tensors:
        for load in loads_of(t.node):
            used.setdefault(load.tensor.file.parent, set()).add(load.tensor.file)
    inputs = {}
    for name, source in plan.model.sources:
        files = sorted(used.get(source.root, set()) | {source.root / "config.json"})
        entry = {"ref": source.ref, "commit": source.commit}  # a local directory has no commit
        if source.hub_id:
            entry.update(repo=source.hub_id, revision=source.revision)
        entry["files"] = {f.name: {"size": f.stat().st_size, "sha256": file_sha256(f)} for f in files}
        inputs[name] = entry
    return {"recipekit_lock": LOCK_VERSION, "inputs": inputs}


def lock_problems(lock: dict, current: dict, where: str) -> list[Problem]:
    """How the inputs of `current` (a fresh `make_lock`) differ from `lock`, one problem per difference."""
    problems = []
    for name, locked in lock.get("inputs", {}).items():
        now = current["inputs"].get(name)
        if now is None:
            problems.append(Problem(f"input {name!r} is in the lock but not in the recipe", where))
            continue
        if locked.get("commit") != now.get("commit"):
            problems.append(Problem(f"input {name!r} ({locked.get('ref')}) now resolves to commit "
                                    f"{now.get('commit')}, the lock has {locked.get('commit')}", where))
            continue
        for file, entry in locked.get("files", {}).items():
            got = now["files"].get(file)
            if got is None:
                problems.append(Problem(f"input {name!r}: {file} is no longer used or present", where))
            elif got != entry:
                problems.append(Problem(f"input {name!r}: {file} changed (sha256 {got['sha256'][:12]}..., "
                                        f"locked {entry['sha256'][:12]}...)", where))
    for name in current["inputs"]:
        if name not in lock.get("inputs", {}):
            problems.append(Problem(f"input {name!r} is not in the lock", where))
    return problems


def read_lock(path: Path) -> dict:
    """A `recipe.lock` as written by `lock_bytes`; `SourceError` at the file when it is not one (FileNotFoundError
    passes through, for the caller to word)."""
    try:
        lock = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SourceError(Problem(f"not a readable recipe lock: {e}", str(path))) from None
    inputs = lock.get("inputs") if isinstance(lock, dict) else None
    if not isinstance(inputs, dict) or not all(_input_entry(v) for v in inputs.values()):
        raise SourceError(Problem("not a recipe lock: expected a JSON object whose `inputs` maps each input to "
                                  "its commit and files (write one with `recipe run`)", str(path)))
    return lock


def _input_entry(entry: object) -> bool:
    files = entry.get("files", {}) if isinstance(entry, dict) else None
    return isinstance(files, dict) and all(isinstance(f, dict) and isinstance(f.get("sha256"), str)
                                           for f in files.values())


def lock_bytes(lock: dict) -> bytes:
    return (json.dumps(lock, indent=2, sort_keys=True) + "\n").encode()


def file_sha256(path: Path) -> str:
    """sha256 of a file: the cache blob's name when it is one (huggingface_hub stores LFS files by sha256).

    Other files are hashed once and remembered by device, inode, size and mtime
    (as git's index does), so a rerun does not read every input twice.
    """
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs" and _SHA256.match(target.name):
        return target.name
    st = target.stat()
    key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    known = _hash_cache()
    if key not in known:
        digest = hashlib.sha256()
        with open(target, "rb") as f:
            while chunk := f.read(2**24):
                digest.update(chunk)
        known[key] = digest.hexdigest()
        _save_hash_cache(known)
    return known[key]


def hash_cache_file() -> Path:
    """Where remembered hashes live: `$RECIPEKIT_CACHE`, else `$XDG_CACHE_HOME/recipekit`, else ~/.cache/recipekit."""
    root = os.environ.get("RECIPEKIT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"),
                                                              "recipekit")
    return Path(root).expanduser() / "sha256.json"


def _hash_cache() -> dict[str, str]:
    try:
        known = json.loads(hash_cache_file().read_text(encoding="utf-8"))
        return known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_hash_cache(known: dict[str, str]) -> None:
    """Best effort: a cache that cannot be written only costs a rehash next time."""
    path = hash_cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(dict(list(known.items())[-10_000:])), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
