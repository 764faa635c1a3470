"""Hashing for `recipe.lock` that starts while Python is still loading recipekit.

The first run over new local inputs must hash every input file, and the 0.2 s the interpreter spends importing
pydantic and the engine leave one core idle. The console script calls `start` with its arguments before it
imports anything else; this module needs only the standard library and PyYAML. It reads the recipe the command
names, takes every string in it that names a local model folder (a directory holding `config.json`, relative
to the recipe's folder as the recipe resolves it), and hashes the `*.safetensors` files there whose digest is
not already known, in one thread per core. Once the plan knows what the lock covers, `lock.Hashing` adopts the
digests of its files and `discard` cancels the rest.

It is a guess made before the recipe is validated: an unreadable recipe, a YAML error, a Hub id or `--no-lock`
mean no early start, never an error, and a wrong guess costs only CPU time; the lock never depends on it.
"""
from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

from recipekit.engine.run.digest import blake3_file, yield_cpu
from recipekit.engine.run.hash_cache import cache_key, known_sha256, remembered

_MAX_RECIPE = 2**20  # bytes: a recipe is a few KB, a larger file is not one
_MAX_STRINGS = 10_000
# While imports hold the GIL, a hashing thread that finished an update waits up to the switch interval to
# start the next: the default 5 ms is about three times as long as BLAKE3 takes over one 8 MiB read.
_SWITCH_INTERVAL = 0.0005


class _Early:
    """The early hashing under way: per file (by `cache_key`), the future of its digest."""

    def __init__(self, files: list[Path]):
        sized = sorted(((path.stat().st_size, cache_key(path), path) for path in files), reverse=True)
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="recipekit-prehash",
                                       initializer=yield_cpu)
        self.switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self.switch_interval, _SWITCH_INTERVAL))
        # the largest first, as `Hashing` orders its own
        self.files: dict[str, Future] = {key: self.pool.submit(blake3_file, path, self.stop)
                                         for size, key, path in sized}

    def end(self, *, stop_adopted: bool) -> None:
        for future in self.files.values():
            future.cancel()
        self.files = {}
        if stop_adopted:
            self.stop.set()
        self.pool.shutdown(wait=False, cancel_futures=stop_adopted)
        sys.setswitchinterval(self.switch_interval)


_early: _Early | None = None


def start(argv: list[str]) -> None:
    """Begin hashing the weight files of the local models named by the recipe of `recipe run ...` (`argv`
    without the program's name). Does nothing for another command, under `--no-lock` (without `--locked`), or
    when the recipe cannot be read; never raises."""
    global _early
    recipe = _recipe_file(argv)
    if recipe is None or _early is not None:
        return
    import yaml  # only now: `recipe --version` and the other commands never pay for it

    try:
        files = _files_to_hash(recipe, yaml)
        if files:
            _early = _Early(files)
    except (OSError, ValueError, RecursionError, yaml.YAMLError):
        return


def adopt(key: str) -> Future | None:
    """The future digest of the file known as `key` (`hash_cache.cache_key`) if it is being hashed early; it is
    the caller's from now on (`discard` leaves it running)."""
    return None if _early is None else _early.files.pop(key, None)


def discard() -> None:
    """Cancel the early hashing of every file not adopted, and give the interpreter its switch interval back."""
    global _early
    if _early is not None:
        _early.end(stop_adopted=False)
        _early = None


def stop() -> None:
    """Stop all early hashing, adopted or not: the run is over (a file being hashed ends at its next read)."""
    global _early
    if _early is not None:
        _early.end(stop_adopted=True)
        _early = None


def _files_to_hash(recipe: Path, yaml: ModuleType) -> list[Path]:
    known = remembered()
    files = []
    for folder in _model_folders(recipe, yaml):
        for path in sorted(folder.glob("*.safetensors")):
            if path.is_file() and known_sha256(path) is None and cache_key(path) not in known:
                files.append(path)
    return files


def _recipe_file(argv: list[str]) -> Path | None:
    """The recipe file of `run ...`: its first argument that is an existing file (`-o OUT` names a folder), or
    None when the run hashes nothing. Options may be abbreviated, as argparse allows."""
    if not argv or argv[0] != "run":
        return None
    options = [a for a in argv[1:] if a.startswith("--")]
    no_lock = any(len(a) > 4 and "--no-lock".startswith(a) for a in options)
    locked = any(len(a) > 4 and "--locked".startswith(a) for a in options)
    if no_lock and not locked:
        return None
    return next((Path(a) for a in argv[1:] if not a.startswith("-") and os.path.isfile(a)), None)


def _model_folders(recipe: Path, yaml: ModuleType) -> list[Path]:
    if recipe.stat().st_size > _MAX_RECIPE:
        return []
    document = yaml.load(recipe.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    folders: dict[Path, None] = {}
    for text in _strings(document):
        if "\n" in text or "\0" in text or len(text) > 4096:
            continue
        folder = recipe.parent / Path(text).expanduser()
        try:
            if (folder / "config.json").is_file():
                folders[folder.resolve()] = None
        except OSError:  # a string too long for a file name, say: not a folder
            continue
    return list(folders)


def _strings(document: object) -> list[str]:
    """Every string in a parsed YAML document, each shared (aliased) node walked once, at most _MAX_STRINGS."""
    found: list[str] = []
    seen: set[int] = set()
    todo = [document]
    while todo and len(found) < _MAX_STRINGS:
        node = todo.pop()
        if isinstance(node, str):
            found.append(node)
        elif isinstance(node, (dict, list)) and id(node) not in seen:
            seen.add(id(node))
            todo.extend(node.values() if isinstance(node, dict) else node)
    return found
