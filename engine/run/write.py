"""Write a plan to disk as a model directory that appears by atomic rename, or not at all.

Where OUT may go (`check_output`), one run per OUT (an advisory lock beside it), the hidden partial directory
the shards are written into (`shards.py`) with its journal (`journal.py`), which `--resume` finishes, and the
rename into place.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from recipekit.engine.core.sizes import human
from recipekit.engine.errors import Problem, RunFailed, WriteError
from recipekit.engine.io.source import SIDE_FILES
from recipekit.engine.run.journal import JOURNAL, Journal, fingerprint, reusable
from recipekit.engine.run.plan import INDEX_FILE, Plan
from recipekit.engine.run.shards import write_shards

_PARTIAL = ".recipekit-partial"
LateFiles = Callable[[], dict[str, bytes]]


@dataclass(frozen=True)
class RunResult:
    out: Path
    bytes_written: int
    seconds: float
    plan: Plan = field(repr=False)
    downloaded: int = 0  # bytes of Hub shards fetched for this run
    skipped: int = 0  # bytes of Hub shards not fetched because the output uses none of their tensors
    warnings: tuple[str, ...] = ()  # what the user must know although the run succeeded
    reused: int = 0  # bytes of shards a resumed run kept from the partial output
    resume_note: str | None = None  # why --resume kept nothing, or not all it found

    @property
    def shards(self) -> int:
        return len(self.plan.shards)


def check_output(out: str | Path, input_roots: list[Path], *, overwrite: bool, needed: int,
                 recipe_dir: Path | None = None) -> None:
    """Refuse an output location before anything is written.

    OUT may lie inside the recipe's folder, the current directory or home, but may not be any of them or hold
    them, with or without --overwrite: an unset `$OUT` (an empty path, which resolves to the current directory)
    or a stray `..` must never replace a directory of the user's work.
    """
    if not str(out).strip():
        raise WriteError("the output path is empty (is the variable you passed to -o set?); name a new directory")
    try:
        out = Path(out).resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError before Python 3.13)
        raise WriteError(f"the output path {out} cannot be resolved: {e}") from None
    problems = []
    guarded = [(folder, what) for folder, what in _guarded_folders(recipe_dir)
               if out == folder or out in folder.parents]
    if out == out.parent:
        problems.append(Problem(f"the output {out} is the filesystem root; name a new directory"))
    elif guarded:  # the first is enough: the recipe's folder inside the current directory is one mistake
        folder, what = guarded[0]
        problems.append(Problem(f"the output {out} would replace {folder}, {what}; name a new directory"))
    elif out.exists() and not overwrite:
        problems.append(Problem(f"{out} already exists; pass --overwrite to replace it"))
    elif out.exists() and not out.is_dir():
        problems.append(Problem(f"{out} exists and is not a directory; refusing to replace it"))
    for root in input_roots:
        if out == root or root in out.parents:
            problems.append(Problem(f"the output {out} would be inside the input model directory {root}"))
        elif out in root.parents:
            problems.append(Problem(f"the input model directory {root} is inside the output {out}"))
    existing = next(p for p in (out, *out.parents) if p.exists())
    if existing != out and not existing.is_dir():
        problems.append(Problem(f"cannot create {out}: {existing} is a file, not a directory"))
    elif existing != out and not os.access(existing, os.W_OK):
        problems.append(Problem(f"cannot create {out}: {existing} is not writable"))
    elif existing == out and overwrite and not os.access(out.parent, os.W_OK):
        problems.append(Problem(f"cannot replace {out}: its folder {out.parent} is not writable"))
    longest = len(os.fsencode(f".{out.name}.recipekit-old-{os.getpid()}"))  # the longest hidden name beside OUT
    limit = _name_max(existing if existing.is_dir() else existing.parent)
    if longest > limit:
        problems.append(Problem(f"the output name {out.name[:40]}... is too long: recipekit writes it first under "
                                f"a hidden name {longest - len(os.fsencode(out.name))} bytes longer, and names may "
                                f"have at most {limit} bytes here"))
    if problems:
        raise WriteError(problems)
    free = shutil.disk_usage(existing).free
    margin = needed // 50 + 64 * 2**20  # the side files, the filesystem's own blocks, and error
    if free < needed + margin:
        raise WriteError(f"not enough free disk for {out}: the output needs {human(needed)} and recipekit keeps "
                         f"{human(margin)} of room, {human(free)} is free")


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _guarded_folders(recipe_dir: Path | None) -> list[tuple[Path, str]]:
    """Folders an output may lie inside but never be or hold."""
    folders = [] if recipe_dir is None else [(recipe_dir.resolve(), "the recipe's folder")]
    for where, what in ((Path.cwd, "the current directory"), (Path.home, "your home directory")):
        try:
            folders.append((where().resolve(), what))
        except (OSError, RuntimeError, KeyError):  # a deleted cwd, an unset HOME: nothing there to protect
            pass
    return folders


def write_model(plan: Plan, out: Path, files: dict[str, bytes], *, late_files: LateFiles | None = None,
                overwrite: bool = False, progress: bool = True, device: str = "cpu", resume: bool = False,
                cpu_shared: Callable[[], bool] = lambda: False) -> RunResult:
    """Write shards, index, config, side files and `files` (name -> bytes) into OUT, atomically, holding OUT's
    lock so that no other run writes it at the same time. `late_files()` gives more files once the shards are
    written (the lock, hashed meanwhile), before OUT appears. With `resume`, the shards a killed run of the same
    plan finished (journaled, and their sha256 checked again) are kept. `cpu_shared()`: whether the lock's
    hashing needs the CPU at the moment (`write_shards`)."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        if out.exists() and not overwrite:  # another run finished it since the check
            raise WriteError(Problem(f"{out} already exists; pass --overwrite to replace it"))
        return _write_locked(plan, out, files, late_files, overwrite=overwrite, progress=progress, device=device,
                             resume=resume, cpu_shared=cpu_shared)
    finally:
        _unlock(out, lock)


def _lock(out: Path) -> int:
    """An exclusive advisory lock beside OUT (`.OUT.recipekit-lock`, holding the owner's pid); a second run is
    refused at once, naming the first."""
    path = _lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise WriteError(Problem(f"another recipe run{f' (pid {owner})' if owner else ''} is writing {out}; "
                                     "wait for it to finish, or choose another OUT")) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file the previous owner removed while we waited to open it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def _unlock(out: Path, fd: int) -> None:
    try:
        os.unlink(_lock_path(out))
    except FileNotFoundError:
        pass
    os.close(fd)


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.recipekit-lock"


def _write_locked(plan: Plan, out: Path, files: dict[str, bytes], late_files: LateFiles | None, *, overwrite: bool,
                  progress: bool, device: str, resume: bool, cpu_shared: Callable[[], bool]) -> RunResult:
    start = time.perf_counter()
    partial = partial_path(out)
    print_id = fingerprint(plan, device, _version())
    kept, note = reusable(partial, plan, print_id) if resume else ({}, None)
    _clear_partials(out, keep=kept)
    journal = Journal(partial, print_id, kept)
    try:
        write_shards(plan, partial, progress=progress, device=device, keep=frozenset(kept), journal=journal,
                     cpu_shared=cpu_shared)
        journal.close()
        (partial / JOURNAL).unlink()
        _write_json(partial / INDEX_FILE, plan.index())
        _write_json(partial / "config.json", plan.config)
        overrides = dict(plan.model.side_overrides)
        for name in SIDE_FILES:
            source = plan.model.side_files.side_file(name)
            if source is not None and name not in overrides:
                shutil.copyfile(source, partial / name)
        for name, data in overrides.items():
            if data is not None:
                (partial / name).write_bytes(data)
        if late_files is not None:
            files = {**files, **late_files()}
        for name, data in files.items():
            (partial / name).write_bytes(data)
        leftover = _replace(partial, out)
    except OSError as e:
        journal.close()
        shutil.rmtree(partial, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(out.parent).free
            raise RunFailed(f"the disk filled up while writing {out}: the output needs {human(plan.output_bytes)}, "
                            f"{human(free)} is free now (after removing the partial output); free some space and "
                            "run again") from None
        raise
    except Exception:
        journal.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except BaseException as e:  # Ctrl-C or a signal: what is finished may be resumed
        journal.close()
        if journal.recorded:
            e.add_note(f"{journal.recorded} finished shard(s) of {len(plan.shards)} are kept in {partial}: the same "
                       "command with --resume finishes the run")
        else:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    reused = sum(shard.size for shard in plan.shards if shard.filename in kept)
    return RunResult(out, plan.output_bytes, time.perf_counter() - start, plan, reused=reused, resume_note=note,
                     warnings=() if leftover is None else (leftover,))


def partial_path(out: Path) -> Path:
    """The hidden directory OUT is written into: one name per OUT, so that --resume finds it."""
    return out.parent / f".{out.name}{_PARTIAL}"


def _version() -> str:
    from recipekit.engine import __version__

    return __version__


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _replace(tmp: Path, out: Path) -> str | None:
    """Rename the finished `tmp` to `out`. An old `out` is moved aside first and deleted only once the new one
    is in place; returns a warning naming what is left where that deletion fails."""
    if not out.exists():
        os.rename(tmp, out)
        return None
    old = out.parent / f".{out.name}.recipekit-old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)  # put the old output back
        raise
    try:
        shutil.rmtree(old)
    except OSError as e:
        return (f"the new {out} is in place, but the old one, moved aside to {old}, could not be fully removed "
                f"({e.strerror or e}: {e.filename}); remove it yourself")
    return None


def _clear_partials(out: Path, keep: dict[str, str]) -> None:
    """Remove what earlier runs of the same OUT left behind (killed ones), except the shards `keep` names, which
    a resumed run reuses: this run holds OUT's lock, so no live run is writing any of it. The partial directory
    exists afterwards."""
    partial = partial_path(out)
    for path in out.parent.glob(f".{out.name}{_PARTIAL}*"):  # also the `-<pid>` names of recipekit before 0.2
        if path == partial and keep:
            for item in path.iterdir():
                if item.name not in keep:
                    shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)
    partial.mkdir(exist_ok=True)
