"""`recipe.lock`: exactly which input bytes built a model, and the check that they still match.

For every input: the reference as written, the resolved Hub commit (none for a local directory), and for each
file the build read or copied (config, index, the shards holding used tensors, the side files copied into the
output, what measurements read) its size and sha256. Files outside every input that a measurement read (a text)
are under `files`, keyed by their absolute path. For Hub LFS files the sha256 is the name
of the blob in the cache; other files get their BLAKE3 (`digest.py`), hashed in threads (`Hashing`) while the
writer copies, the largest begun before recipekit has even loaded (`prehash.py`).
"""
from __future__ import annotations

import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from recipekit.engine.core.graph import loads_of
from recipekit.engine.errors import Problem, SourceError
from recipekit.engine.io.source import INDEX_FILE, SIDE_FILES
from recipekit.engine.run import prehash
from recipekit.engine.run.digest import blake3_file, yield_cpu
from recipekit.engine.run.hash_cache import cache_key, known_sha256, remember, remembered
from recipekit.engine.run.plan import Plan

# 1 locked config.json and the shards only, by plain sha256; 2 every file read, local ones by a sha256-tree
LOCK_VERSION = 3
LOCAL_DIGEST = "blake3"
_DIGESTS = ("sha256", LOCAL_DIGEST)  # a file entry holds one: Hub blobs' plain sha256, else the file's BLAKE3


def lock_files(plan: Plan) -> dict[str | None, dict[str, Path]]:
    """The files the lock covers: per input name, its files by path relative to its folder; under None, the
    files a measurement read outside every input, by absolute path (so that the output's own recipe.yaml, whose
    local paths are absolute, rebuilds against the same lock from inside OUT)."""
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
    others = {str(p.resolve()): p for p in sorted(set(model.read_files) - covered)}
    if others:
        groups[None] = others
    return groups


class Hashing:
    """The lock of `plan`, its files hashed in up to `threads` worker threads from the moment it is created, so
    that the hashing overlaps whatever the caller does next; `lock()` waits for the hashes and assembles it.

    Files huggingface_hub downloaded keep their plain sha256 (a cache blob's name, or the etag of a --local-dir
    download: free); other files get their BLAKE3 (`digest.blake3_file`), one file per thread, the largest
    first.
    """

    def __init__(self, plan: Plan, threads: int | None = None):
        self.plan = plan
        self.groups = lock_files(plan)
        self._stop = threading.Event()
        self._known = remembered()
        self._digests: dict[Path, tuple[str, str]] = {}  # path -> (kind, hex digest), once known
        self._pending: dict[Path, tuple[str, Future]] = {}  # path -> (cache key, its digest to come)
        todo = []
        for path in dict.fromkeys(p for files in self.groups.values() for p in files.values()):
            blob = known_sha256(path)
            try:
                key = cache_key(path)
            except OSError as e:
                raise _unreadable(path, e) from None
            if blob is not None:
                self._digests[path] = ("sha256", blob)
            elif key in self._known:
                self._digests[path] = (LOCAL_DIGEST, self._known[key])
            else:
                todo.append((path, key))
        self._pool = None
        for path, key in list(todo):
            early = prehash.adopt(key)  # begun before recipekit had loaded (`prehash.py`)
            if early is not None:
                self._pending[path] = (key, early)
                todo.remove((path, key))
        prehash.discard()  # the early hashing of files this lock does not cover
        if todo:
            self._pool = ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1,
                                            thread_name_prefix="recipekit-hash", initializer=yield_cpu)
            # the largest first, so that a small file never waits behind the tail of the work
            for path, key in sorted(todo, key=lambda item: -item[0].stat().st_size):
                self._pending[path] = (key, self._pool.submit(blake3_file, path, self._stop))

    def busy(self) -> bool:
        """Whether some file is still being hashed."""
        return any(not future.done() for _, future in self._pending.values())

    def lock(self) -> dict:
        """The lock, once every file is hashed (`SourceError` for a file that could not be read)."""
        for path, (key, future) in self._pending.items():
            try:
                digest = _wait_or_hash(future, path, self._stop)
            except OSError as e:
                raise _unreadable(path, e) from None
            self._known[key] = digest
            self._digests[path] = (LOCAL_DIGEST, digest)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._pending:
            remember(self._known)
        self._pending = {}
        inputs: dict[str, dict] = {}
        for name, source in self.plan.model.sources:
            entry = {"ref": source.ref, "commit": source.commit}  # a local directory has no commit
            if source.hub_id:
                entry.update(repo=source.hub_id, revision=source.revision)
            entry["files"] = self._entries(self.groups[name])
            inputs[name] = entry
        lock = {"recipekit_lock": LOCK_VERSION, "inputs": inputs}
        if None in self.groups:
            lock["files"] = self._entries(self.groups[None])
        return lock

    def _entries(self, files: dict[str, Path]) -> dict[str, dict]:
        return {key: {"size": path.stat().st_size, self._digests[path][0]: self._digests[path][1]}
                for key, path in files.items()}

    def close(self) -> None:
        """Stop hashing (the run failed): running hashes end at their next read, queued ones never start."""
        self._stop.set()
        prehash.stop()
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


def _wait_or_hash(future: Future, path: Path, stop: threading.Event) -> str:
    """The digest of `path`, hashed in this thread (at its own priority) if no hashing thread has begun it."""
    return blake3_file(path, stop) if future.cancel() else future.result()


def _unreadable(path: Path, e: OSError) -> SourceError:
    return SourceError(Problem(f"cannot read this input to hash it for recipe.lock: {e.strerror or e} "
                               "(make it readable, or run with --no-lock)", str(path)))


def lock_problems(lock: dict, current: dict, where: str) -> list[Problem]:
    """How the inputs of `current` (a fresh lock) differ from `lock`, one problem per difference."""
    if lock.get("recipekit_lock") != LOCK_VERSION:
        return [Problem(f"this lock was written by another recipekit (lock version {lock.get('recipekit_lock')}; "
                        f"this one writes and checks version {LOCK_VERSION}, which covers every file a build reads "
                        "and hashes local files by BLAKE3): run once without --locked (or with --no-lock for "
                        "a shared recipe) and lock with the recipe.lock that run writes", where)]
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
        problems += _file_problems(f"input {name!r}: ", locked.get("files", {}), now["files"], where)
    for name in current["inputs"]:
        if name not in lock.get("inputs", {}):
            problems.append(Problem(f"input {name!r} is not in the lock", where))
    problems += _file_problems("", lock.get("files", {}), current.get("files", {}), where)
    return problems


def _file_problems(label: str, locked: dict, now: dict, where: str) -> list[Problem]:
    problems = []
    for file, entry in locked.items():
        got = now.get(file)
        if got is None:
            problems.append(Problem(f"{label}{file} is no longer used or present", where))
        elif got != entry:
            problems.append(Problem(f"{label}{file} changed ({_digest(got)}, locked {_digest(entry)})", where))
    problems += [Problem(f"{label}{file} is read now but not in the lock (a file added since it was written)",
                         where) for file in now if file not in locked]
    return problems


def _digest(entry: dict) -> str:
    kind = next((k for k in _DIGESTS if k in entry), "sha256")
    return f"{kind} {str(entry.get(kind))[:12]}..."


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
    return isinstance(files, dict) and all(isinstance(f, dict) and any(isinstance(f.get(k), str) for k in _DIGESTS)
                                           for f in files.values())


def lock_bytes(lock: dict) -> bytes:
    return (json.dumps(lock, indent=2, sort_keys=True) + "\n").encode()
