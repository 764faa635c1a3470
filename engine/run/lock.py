"""`recipe.lock`: exactly which input bytes built a model, and the check that they still match.

For every input: the reference as written, the resolved Hub commit (none for a local directory), and for each
file the build read or copied (config, index, the shards holding used tensors, the side files copied into the
output, what measurements read) its size and sha256. Files outside every input that a measurement read (a text)
are under `files`, keyed by their path relative to the recipe's folder. For Hub files the sha256 is the name of
the LFS blob in the cache; other files are hashed, in threads (`Hashing`), while the writer copies.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from recipekit.engine.core.graph import loads_of
from recipekit.engine.errors import Problem, SourceError
from recipekit.engine.io.source import INDEX_FILE, SIDE_FILES
from recipekit.engine.run.plan import Plan

LOCK_VERSION = 2  # 1 locked config.json and the shards only
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_READ = 8 * 2**20  # per hashing read: large enough that hashlib releases the GIL for nearly all the work


def lock_files(plan: Plan, base_dir: Path) -> dict[str | None, dict[str, Path]]:
    """The files the lock covers: per input name, its files by path relative to its folder; under None, the
    files a measurement read outside every input, by path relative to `base_dir` (absolute outside it)."""
    model = plan.model
    read = {load.tensor.file for t in plan.tensors for load in loads_of(t.node)} | set(model.read_files)
    covered: set[Path] = set()
    groups: dict[str | None, dict[str, Path]] = {}
    for name, source in model.sources:
        root = source.root
        files = {root / "config.json", *(p for p in [root / INDEX_FILE] if p.is_file())}
        files |= {p for p in read if p.parent == root}
        if source.root == model.side_files.root:  # its tokenizer and generation config are copied into OUT
            files |= {p for p in map(source.side_file, SIDE_FILES) if p is not None}
        groups[name] = {p.relative_to(root).as_posix(): p for p in sorted(files)}
        covered |= files
    others = {_relative(p, base_dir): p for p in sorted(set(model.read_files) - covered)}
    if others:
        groups[None] = others
    return groups


def _relative(path: Path, base_dir: Path) -> str:
    try:
        return path.relative_to(base_dir).as_posix()
    except ValueError:
        return str(path)


class Hashing:
    """The lock of `plan`, its files hashed in up to `threads` worker threads from the moment it is created, so
    that the hashing overlaps whatever the caller does next; `lock()` waits for the hashes and assembles it."""

    def __init__(self, plan: Plan, base_dir: Path, threads: int | None = None):
        self.plan = plan
        self.groups = lock_files(plan, base_dir)
        self._stop = threading.Event()
        self._known = _hash_cache()
        self._digests: dict[Path, str | Future] = {}
        pending = []
        for path in dict.fromkeys(p for files in self.groups.values() for p in files.values()):
            digest = _blob_sha256(path) or self._known.get(_stat_key(path))
            if digest is None:
                pending.append(path)
            else:
                self._digests[path] = digest
        self._pool = None
        if pending:
            self._pool = ThreadPoolExecutor(max_workers=threads or min(len(pending), os.cpu_count() or 1),
                                            thread_name_prefix="recipekit-hash")
            # the largest first, so that a small file never waits behind the tail of the work
            for path in sorted(pending, key=lambda p: -p.stat().st_size):
                self._digests[path] = self._pool.submit(self._hash, path)

    def _hash(self, path: Path) -> str:
        try:
            key = _stat_key(path)
            digest = sha256_of(path, self._stop)
        except OSError as e:
            raise SourceError(Problem(f"cannot read this input to hash it for recipe.lock: {e.strerror or e} "
                                      "(make it readable, or run with --no-lock)", str(path))) from None
        self._known[key] = digest
        return digest

    def lock(self) -> dict:
        """The lock, once every file is hashed (`SourceError` for a file that could not be read)."""
        digests = {p: d.result() if isinstance(d, Future) else d for p, d in self._digests.items()}
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
            _save_hash_cache(self._known)
        inputs: dict[str, dict] = {}
        for name, source in self.plan.model.sources:
            entry = {"ref": source.ref, "commit": source.commit}  # a local directory has no commit
            if source.hub_id:
                entry.update(repo=source.hub_id, revision=source.revision)
            entry["files"] = _entries(self.groups[name], digests)
            inputs[name] = entry
        lock = {"recipekit_lock": LOCK_VERSION, "inputs": inputs}
        if None in self.groups:
            lock["files"] = _entries(self.groups[None], digests)
        return lock

    def close(self) -> None:
        """Stop hashing (the run failed): running hashes end at their next read, queued ones never start."""
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


def _entries(files: dict[str, Path], digests: dict[Path, str]) -> dict[str, dict]:
    return {key: {"size": path.stat().st_size, "sha256": digests[path]} for key, path in files.items()}


def lock_problems(lock: dict, current: dict, where: str) -> list[Problem]:
    """How the inputs of `current` (a fresh lock) differ from `lock`, one problem per difference.

    A version-1 lock covered config.json and the shards only: those are compared, and files it never covered are
    not reported as new.
    """
    complete = lock.get("recipekit_lock") == LOCK_VERSION
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
        problems += _file_problems(f"input {name!r}: ", locked.get("files", {}), now["files"], complete, where)
    for name in current["inputs"]:
        if name not in lock.get("inputs", {}):
            problems.append(Problem(f"input {name!r} is not in the lock", where))
    problems += _file_problems("", lock.get("files", {}), current.get("files", {}), complete, where)
    return problems


def _file_problems(label: str, locked: dict, now: dict, complete: bool, where: str) -> list[Problem]:
    problems = []
    for file, entry in locked.items():
        got = now.get(file)
        if got is None:
            problems.append(Problem(f"{label}{file} is no longer used or present", where))
        elif got != entry:
            problems.append(Problem(f"{label}{file} changed (sha256 {got['sha256'][:12]}..., "
                                    f"locked {entry['sha256'][:12]}...)", where))
    if complete:
        problems += [Problem(f"{label}{file} is read now but not in the lock (a file added since it was written)",
                             where) for file in now if file not in locked]
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
    if not isinstance(inputs, dict) or not all(_input_entry(v) for v in inputs.values()) \
            or not _file_entries(lock.get("files", {})):
        raise SourceError(Problem("not a recipe lock: expected a JSON object whose `inputs` maps each input to "
                                  "its commit and files (write one with `recipe run`)", str(path)))
    return lock


def _input_entry(entry: object) -> bool:
    return isinstance(entry, dict) and _file_entries(entry.get("files", {}))


def _file_entries(files: object) -> bool:
    return isinstance(files, dict) and all(isinstance(f, dict) and isinstance(f.get("sha256"), str)
                                           for f in files.values())


def lock_bytes(lock: dict) -> bytes:
    return (json.dumps(lock, indent=2, sort_keys=True) + "\n").encode()


def sha256_of(path: Path, stop: threading.Event | None = None) -> str:
    """sha256 of a file's bytes, read in large blocks into one buffer (hashlib releases the GIL while it hashes
    each). With `stop` set, gives up at the next block (OSError)."""
    digest = hashlib.sha256()
    buffer = bytearray(_READ)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            if stop is not None and stop.is_set():
                raise OSError(f"hashing of {path} stopped")
            digest.update(view[:n])
    return digest.hexdigest()


def _blob_sha256(path: Path) -> str | None:
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs" and _SHA256.match(target.name):
        return target.name
    return None


def _stat_key(path: Path) -> str:
    st = path.resolve().stat()
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


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
    """Best effort: a cache that cannot be written only costs a rehash next time. Entries another run saved since
    this one read the cache are kept."""
    path = hash_cache_file()
    try:
        merged = {**_hash_cache(), **known}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(dict(list(merged.items())[-10_000:])), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
