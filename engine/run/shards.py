"""The executor: every output tensor is a job that writes its bytes at the offset the plan fixed, so jobs run in
any order and still give the same file.

Unchanged tensors are copied by the kernel (`os.copy_file_range`; while the lock is hashed, one copy into an
output file at a time), plain dtype casts and row-wise merges are streamed in small chunks, several streams at
once; other computed tensors go through `evaluate.py`, several at once while their working sets together stay
within the largest one's (`admission.py`). Shards a resumed run keeps are skipped, and each shard that is
complete is reported to the journal.
"""
from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

from recipekit.engine.core.graph import Apply
from recipekit.engine.errors import Problem, SourceError
from recipekit.engine.io.inputs import InputFiles
from recipekit.engine.io.safetensors_header import TensorInfo
from recipekit.engine.progress import progress_bar
from recipekit.engine.run.admission import run_within
from recipekit.engine.run.journal import Journal
from recipekit.engine.run.plan import Plan, TensorPlan, copy_threads, working_set

_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}
_CHUNK = 16 * 2**20


class _Completion:
    """Counts the jobs left in each shard and tells the journal of each shard that completes, except the last:
    when that one is done, so is the run."""

    def __init__(self, jobs: dict[str, int], journal: Journal | None):
        self._left = dict(jobs)
        self._open = len(jobs)
        self._journal = journal
        self._lock = threading.Lock()

    def done(self, shard: str) -> None:
        with self._lock:
            self._left[shard] -= 1
            if self._left[shard]:
                return
            self._open -= 1
            last = self._open == 0
        if self._journal is not None and not last:
            self._journal.finished(shard)


def write_shards(plan: Plan, folder: Path, *, progress: bool, device: str, keep: frozenset[str] = frozenset(),
                 journal: Journal | None = None, cpu_shared: Callable[[], bool] = lambda: False) -> None:
    """Write every shard of `plan` into `folder`, except those named in `keep` (already there, verified).

    The kernel takes an output file's lock for each copy into it, so a second copy stream into the same file
    gains a little wall time and spins away most of a core. While `cpu_shared()` (other work, the lock's
    hashing, needs that core), copies into one shard take turns; streams into different shards never wait."""
    inputs, outputs = InputFiles(), []
    bar = progress_bar(plan.output_bytes, progress, unit="B", desc="writing")
    try:
        streamed: list[tuple[TensorPlan, int, int, str]] = []  # byte copies and chunked casts
        turns: dict[int, threading.Lock] = {}  # per output file: held while copying into it, while cpu_shared()
        computes: list[tuple[TensorPlan, int, int, str]] = []
        for shard in plan.shards:
            if shard.filename in keep:
                bar.update(shard.size)
                continue
            fd = os.open(folder / shard.filename, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            outputs.append(fd)
            turns[fd] = threading.Lock()
            _allocate(fd, shard.size)
            os.pwrite(fd, shard.header, 0)
            base = len(shard.header)
            for t in shard.tensors:
                stream = t.is_copy or t.cast_source or (t.is_rowwise and device == "cpu")
                (streamed if stream else computes).append((t, fd, base + t.offset, shard.filename))
            bar.update(len(shard.header))
        completion = _Completion({s.filename: len(s.tensors) for s in plan.shards if s.filename not in keep},
                                 journal)
        # shard after shard, so that each completes early and is journaled while later ones are written; inside
        # a shard, the inputs are read front to back
        streamed.sort(key=lambda job: (job[3], _first_input(job[0])))
        computes.sort(key=lambda job: (job[3], _first_input(job[0])))
        evaluate = None
        if computes or any(not t.is_copy for t, _, _, _ in streamed):
            from recipekit.engine.run import evaluate  # torch is imported here, only when a tensor must be computed

        def stream(job: tuple[TensorPlan, int, int, str]) -> None:
            t, fd, offset, shard = job
            if t.is_copy:
                info = t.node.tensor
                with turns[fd] if cpu_shared() else nullcontext():
                    _copy_range(inputs.fd(info), fd, info.offset, offset, info.nbytes, info)
            elif t.is_rowwise:
                evaluate.rowwise_stream(t.node, inputs.fd, fd, offset, t.name)
            else:
                info = t.cast_source.tensor
                evaluate.cast_stream(info, inputs.fd(info), fd, offset, t.dtype, t.name)
            bar.update(t.nbytes)
            completion.done(shard)

        with ThreadPoolExecutor(max_workers=copy_threads()) as pool:
            pending = pool.map(stream, streamed)
            if computes:
                evaluator = evaluate.Evaluator([t.node for t, _, _, _ in computes], inputs.fd, device)

                def compute(job: tuple[TensorPlan, int, int, str], evaluator: evaluate.Evaluator) -> None:
                    t, fd, offset, shard = job
                    value = evaluator.value(t.node)
                    evaluate.check_finite(value, lambda: evaluator.inputs_of(t.node), t.name)
                    evaluate.write_tensor(value, fd, offset)
                    bar.update(t.nbytes)
                    completion.done(shard)

                if device == "cpu" and not evaluator.shared():
                    # several at once, within the memory of the largest alone (each with an evaluator of its own)
                    costs = {id(job): working_set(job[0].node) for job in computes}
                    run_within(computes, lambda job: costs[id(job)], max(costs.values()), copy_threads(),
                               lambda job: compute(job, evaluate.Evaluator([job[0].node], inputs.fd, device)))
                else:  # intermediates shared between outputs (kept until their last use), or a GPU: one at a time
                    for job in computes:
                        compute(job, evaluator)
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
