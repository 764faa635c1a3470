"""Write a plan to disk: shards streamed tensor by tensor, the directory appearing by atomic rename.

Every tensor's offset is fixed by the plan, so jobs can run in any order and
still give the same bytes. Unchanged tensors are copied by the kernel
(`os.copy_file_range`) and plain dtype casts are streamed in small chunks,
several streams at once; other computed tensors go through `evaluate.py` one
at a time in input-file order.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from recipekit.engine.core.graph import Apply
from recipekit.engine.core.sizes import human
from recipekit.engine.errors import Problem, RunFailed, SourceError, WriteError
from recipekit.engine.io.inputs import InputFiles
from recipekit.engine.io.safetensors_header import TensorInfo
from recipekit.engine.io.source import SIDE_FILES
from recipekit.engine.progress import progress_bar
from recipekit.engine.run.plan import INDEX_FILE, Plan, TensorPlan, copy_threads

_PARTIAL = ".recipekit-partial-"
_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}
_CHUNK = 16 * 2**20
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
    out = Path(out).resolve()
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
    longest = len(os.fsencode(f".{out.name}{_PARTIAL}{os.getpid()}"))  # the hidden name written beside OUT
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
                overwrite: bool = False, progress: bool = True, device: str = "cpu") -> RunResult:
    """Write shards, index, config, side files and `files` (name -> bytes) into OUT, atomically, holding OUT's
    lock so that no other run writes it at the same time. `late_files()` gives more files once the shards are
    written (the lock, hashed meanwhile), before OUT appears."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        if out.exists() and not overwrite:  # another run finished it since the check
            raise WriteError(Problem(f"{out} already exists; pass --overwrite to replace it"))
        return _write_locked(plan, out, files, late_files, overwrite=overwrite, progress=progress, device=device)
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
                  progress: bool, device: str) -> RunResult:
    start = time.perf_counter()
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}{_PARTIAL}{os.getpid()}"
    tmp.mkdir()
    try:
        _write_shards(plan, tmp, progress=progress, device=device)
        _write_json(tmp / INDEX_FILE, plan.index())
        _write_json(tmp / "config.json", plan.config)
        for name in SIDE_FILES:
            source = plan.model.side_files.side_file(name)
            if source is not None:
                shutil.copyfile(source, tmp / name)
        if late_files is not None:
            files = {**files, **late_files()}
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        leftover = _replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(out.parent).free
            raise RunFailed(f"the disk filled up while writing {out}: the output needs {human(plan.output_bytes)}, "
                            f"{human(free)} is free now (after removing the partial output); free some space and "
                            "run again") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RunResult(out, plan.output_bytes, time.perf_counter() - start, plan, warnings=() if leftover is None
                     else (leftover,))


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


def _remove_stale_partials(out: Path) -> None:
    """Remove the partial outputs earlier runs of the same OUT left behind (killed ones): this run holds OUT's
    lock, so no live run is writing any of them."""
    for path in out.parent.glob(f".{out.name}{_PARTIAL}*"):
        shutil.rmtree(path, ignore_errors=True)


def _write_shards(plan: Plan, tmp: Path, *, progress: bool, device: str) -> None:
    inputs, outputs = InputFiles(), []
    bar = progress_bar(plan.output_bytes, progress, unit="B", desc="writing")
    try:
        streamed: list[tuple[TensorPlan, int, int]] = []  # byte copies and chunked casts
        computes: list[tuple[TensorPlan, int, int]] = []
        for shard in plan.shards:
            fd = os.open(tmp / shard.filename, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            outputs.append(fd)
            _allocate(fd, shard.size)
            os.pwrite(fd, shard.header, 0)
            base = len(shard.header)
            for t in shard.tensors:
                stream = t.is_copy or t.cast_source or (t.is_rowwise and device == "cpu")
                (streamed if stream else computes).append((t, fd, base + t.offset))
            bar.update(len(shard.header))
        # read every input file front to back
        streamed.sort(key=lambda job: _first_input(job[0]))
        computes.sort(key=lambda job: _first_input(job[0]))
        evaluate = None
        if computes or any(not t.is_copy for t, _, _ in streamed):
            from recipekit.engine.run import evaluate  # torch is imported here, only when a tensor must be computed

        def stream(job: tuple[TensorPlan, int, int]) -> None:
            t, fd, offset = job
            if t.is_copy:
                info = t.node.tensor
                _copy_range(inputs.fd(info), fd, info.offset, offset, info.nbytes, info)
            elif t.is_rowwise:
                evaluate.rowwise_stream(t.node, inputs.fd, fd, offset)
            else:
                info = t.cast_source.tensor
                evaluate.cast_stream(info, inputs.fd(info), fd, offset, t.dtype)
            bar.update(t.nbytes)

        with ThreadPoolExecutor(max_workers=copy_threads()) as pool:
            pending = pool.map(stream, streamed)
            if computes:
                evaluator = evaluate.Evaluator([t.node for t, _, _ in computes], inputs.fd, device)
                for t, fd, offset in computes:
                    evaluate.write_tensor(evaluator.value(t.node), fd, offset)
                    bar.update(t.nbytes)
            for _ in pending:
                pass  # re-raise the first failed job
    finally:
        for fd in outputs:
            os.close(fd)
        inputs.close()
        bar.close()


def _first_input(t: TensorPlan) -> tuple[Path, int]:
    """Where the first tensor a computed output reads lies, to order reads front to back."""
    node = t.node
    while isinstance(node, Apply):
        if not node.inputs:
            return (Path(), 0)
        node = node.inputs[0]
    return (node.tensor.file, node.tensor.offset)


def _allocate(fd: int, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # reported with the sizes by write_model
        os.ftruncate(fd, size)  # filesystems without fallocate


def _copy_range(src: int, dst: int, src_offset: int, dst_offset: int, count: int, info: TensorInfo) -> None:
    """Copy bytes between files inside the kernel; plain reads and writes where it refuses."""
    while count > 0:
        try:
            done = os.copy_file_range(src, dst, count, src_offset, dst_offset)
        except OSError as e:
            if e.errno not in _FALLBACK_ERRNOS:
                raise
            _copy_chunks(src, dst, src_offset, dst_offset, count, info)
            return
        if done == 0:
            raise SourceError(Problem(f"file ended before tensor {info.name!r}: was it truncated while running?",
                                      str(info.file)))
        count -= done
        src_offset += done
        dst_offset += done


def _copy_chunks(src: int, dst: int, src_offset: int, dst_offset: int, count: int, info: TensorInfo) -> None:
    while count > 0:
        data = os.pread(src, min(count, _CHUNK), src_offset)
        if not data:
            raise SourceError(Problem(f"file ended before tensor {info.name!r}: was it truncated while running?",
                                      str(info.file)))
        view = memoryview(data)
        while view:
            written = os.pwrite(dst, view, dst_offset)
            view, dst_offset = view[written:], dst_offset + written
        src_offset += len(data)
        count -= len(data)
