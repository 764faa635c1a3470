"""Tensor computation: reading input tensors, running kernels, writing results (imports torch).

The executor imports it when the first tensor has to be computed, so runs
that only move bytes never pay for torch. `Evaluator` computes output nodes
one at a time and keeps a shared intermediate only until its last consumer
has used it.
"""
from __future__ import annotations

import ctypes
import math
import os
import threading
from collections import Counter
from collections.abc import Callable

import torch

from recipekit.engine.core.graph import Apply, Load, Node, loads_of
from recipekit.engine.core.kernels import OWN_MEAN, TAKE_ROWS, compute_dtype, gather_rows, row_pairs, torch_dtype
from recipekit.engine.errors import PlanError
from recipekit.engine.io.safetensors_header import DTYPE_SIZES, TensorInfo
from recipekit.ops.registry import KERNELS

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
HEAP_LIMIT = 16 * 2**20


def _bound_the_heap() -> None:
    """Have glibc give every allocation of HEAP_LIMIT or more its own mapping, returned to the system when freed,
    and keep up to HEAP_LIMIT of freed memory at the top of each heap for the next smaller allocation.

    By default glibc raises the mapping threshold to the size of each large block freed (up to 32 MiB), after which
    such tensors come from per-thread heaps that keep freed memory: with compute jobs on several threads a TIES
    merge of 1.7 GB models peaked 10-20% higher (about 1.8 GB against 1.55-1.65 GB with the bound, measured here).
    Fixing that threshold also fixes the trim threshold at its 128 KiB default, so the few-MiB blocks a streamed
    merge allocates per step went back to the system and were faulted in again: a linear merge of 1.67 GB models
    took 290k-540k page faults, with the trim threshold raised 54k (median 4.9 s before, 4.4 s after; same peak RSS).
    Elsewhere (not glibc) this does nothing.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, HEAP_LIMIT)
        libc.mallopt(_M_TRIM_THRESHOLD, HEAP_LIMIT)
    except (OSError, AttributeError):
        pass


_bound_the_heap()


def device_problem(device: str) -> str | None:
    """Why `device` cannot be used here, or None."""
    if device == "cpu":
        return None
    if device.startswith("cuda"):
        return None if torch.cuda.is_available() else f"--device {device}: no CUDA device is available here"
    return f"--device {device}: expected cpu or cuda"


def read_tensor(info: TensorInfo, fd: int) -> torch.Tensor:
    """One input tensor, read from its file into fresh CPU memory."""
    tensor = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
    _read_into(_bytes_of(tensor), fd, info.offset, info)
    return tensor


def read_rows(info: TensorInfo, fd: int, rows: list[int]) -> torch.Tensor:
    """Rows of a 2-D input tensor (e.g. the embeddings of some tokens), reading only their bytes; consecutive rows
    are read in one call."""
    width = math.prod(info.shape[1:])
    out = torch.empty((len(rows), *info.shape[1:]), dtype=torch_dtype(info.dtype))
    view, row_bytes = _bytes_of(out), width * out.element_size()
    k = 0
    while k < len(rows):
        run = 1
        while k + run < len(rows) and rows[k + run] == rows[k] + run:
            run += 1
        _read_into(view[k * row_bytes:(k + run) * row_bytes], fd, info.offset + rows[k] * row_bytes, info)
        k += run
    return out


def check_finite(result: torch.Tensor, inputs: Callable[[], list[torch.Tensor]], name: str) -> None:
    """Refuse to write a computed tensor that has NaN or infinite values its inputs did not have: a cast that
    overflows the output dtype (float16 tops out at 65504), or a kernel that divided by zero. Inputs that were
    already non-finite pass through, as a byte copy would pass them. `inputs()` is called only then."""
    if not result.is_floating_point() or _all_finite(result):
        return
    sources = [_widened(s) for s in inputs() if s.is_floating_point()]
    if not all(_all_finite(s) for s in sources):
        return
    bad = int(torch.count_nonzero(~torch.isfinite(_widened(result))))
    largest = max((float(s.abs().max()) for s in sources if s.numel()), default=0.0)
    raise PlanError(f"tensor {name!r} would have {bad} NaN or infinite value(s) in {str(result.dtype)[6:]}, from "
                    f"finite inputs (largest |input| {largest:.4g}): write a wider output dtype (bfloat16 or "
                    "float32) or check the step's parameters; nothing was written")


def _all_finite(values: torch.Tensor) -> bool:
    """Whether every value is finite, from the smallest and largest (NaN propagates into both): one pass with
    nothing allocated, where `isfinite(values).all()` makes a mask the size of `values` and costs more than a
    linear merge of the same rows."""
    if values.numel() == 0:
        return True
    low, high = (float(v) for v in torch.aminmax(_widened(values)))
    return math.isfinite(low) and math.isfinite(high)


def _widened(values: torch.Tensor) -> torch.Tensor:
    """float8 values as float16, which holds each of them (NaN included): the CPU has no aminmax or isfinite
    for float8."""
    return values.to(torch.float16) if values.element_size() == 1 else values


def _beyond(values: torch.Tensor, limit: float) -> bool:
    """Whether some finite value lies beyond +-limit: one pass, nothing allocated the size of `values` (a cast to
    float16 can overflow only there; an infinity already in the input passes through)."""
    low, high = (float(v) for v in torch.aminmax(values))
    return (limit < high < math.inf) or (-math.inf < low < -limit)


def write_tensor(tensor: torch.Tensor, fd: int, offset: int) -> None:
    """Write a tensor's raw little-endian bytes at `offset`, without a copy on the CPU."""
    _write_from(_bytes_of(tensor.detach().contiguous().cpu()), fd, offset)


def _read_into(view: memoryview, fd: int, offset: int, info: TensorInfo) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(f"{info.file} ended before tensor {info.name!r} (was it truncated while running?)")
        done += got


def _write_from(view: memoryview, fd: int, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The memory of a contiguous CPU tensor as writable bytes (no copy). The view holds the tensor: it may be a
    temporary (a copy from the GPU, or `contiguous()` of a strided result) that would otherwise be freed, and its
    memory reused, before the bytes are written."""
    size = tensor.numel() * tensor.element_size()
    if size == 0:
        return memoryview(b"")
    memory = (ctypes.c_char * size).from_address(tensor.data_ptr())
    memory.tensor = tensor
    return memoryview(memory).cast("B")


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A copy of a CPU tensor's raw bytes."""
    return bytes(_bytes_of(tensor.contiguous()))


CAST_CHUNK_BYTES = 8 * 2**20
_chunk_buffers = threading.local()


def cast_stream(info: TensorInfo, src_fd: int, dst_fd: int, dst_offset: int, dtype: str, name: str = "") -> None:
    """Cast one input tensor into `dtype` straight from file to file, a chunk at a time.

    A cast is elementwise, so it never needs the whole tensor: each thread keeps
    two reusable buffers of `CAST_CHUNK_BYTES`, whatever the tensor's size.
    `name` is the output tensor's, for errors (default: the input's).
    """
    source, target = torch_dtype(info.dtype), torch_dtype(dtype)
    in_size, out_size = source.itemsize, target.itemsize
    step = CAST_CHUNK_BYTES // max(in_size, out_size)
    key = (source, target)
    buffers = getattr(_chunk_buffers, "by_dtypes", None)
    if buffers is None:
        buffers = _chunk_buffers.by_dtypes = {}
    if key not in buffers:
        buffers[key] = (torch.empty(step, dtype=source), torch.empty(step, dtype=target))
    inp, out = buffers[key]
    narrows = (source.is_floating_point and target.is_floating_point
               and torch.finfo(target).max < torch.finfo(source).max)
    inp_bytes = _bytes_of(inp)
    count, done = info.nbytes // in_size, 0
    out_bytes = _bytes_of(out)
    while done < count:
        n = min(step, count - done)
        _read_into(inp_bytes[: n * in_size], src_fd, info.offset + done * in_size, info)
        out[:n].copy_(inp[:n])
        if narrows and _beyond(inp[:n], torch.finfo(target).max):
            check_finite(out[:n], lambda: [inp[:n]], name or info.name)
        _write_from(out_bytes[: n * out_size], dst_fd, dst_offset + done * out_size)
        done += n


def rowwise_stream(node: Apply, open_input: Callable[[TensorInfo], int], dst_fd: int, dst_offset: int,
                   name: str) -> None:
    """Compute a rowwise kernel (a linear merge) a block of rows at a time, from the input files to the output
    file: memory is a few blocks per thread, whatever the tensor's size. Every input is a `Load` of `node`'s shape
    or rows gathered from `Load`s (`take_rows`: an input in the output vocabulary), and `node` may be such gathered
    rows itself."""
    gathered = node.kernel == TAKE_ROWS
    kernel = None if gathered else KERNELS[node.kernel]
    params = dict(node.params)
    keep = params.pop("keep", ())
    rows, row_elems = node.shape[0], math.prod(node.shape[1:])
    out_dtype = torch_dtype(node.dtype)
    work = DTYPE_SIZES[compute_dtype(node.params)]
    sources = (node,) if gathered else node.inputs
    # inputs in their dtype and their copies in the compute dtype, the result and its cast: about CAST_CHUNK_BYTES
    per_row = row_elems * (sum(DTYPE_SIZES[i.dtype] + work for i in sources) + work + out_dtype.itemsize)
    step = max(1, CAST_CHUNK_BYTES // per_row)
    out_row = row_elems * out_dtype.itemsize
    readers = [_block_reader(source, open_input) for source in sources]
    for start in range(0, rows, step):
        n = min(step, rows - start)
        blocks = [read(start, n) for read in readers]
        if kernel is None:
            result = blocks[0].to(out_dtype)
        else:
            local = tuple((r - start, c, s) for r, c, s in keep if start <= r < start + n)
            result = kernel(*blocks, **params, **({"keep": local} if local else {})).to(out_dtype)
        check_finite(result, lambda: blocks, name)
        write_tensor(result, dst_fd, dst_offset + start * out_row)


def _block_reader(node: Node, open_input: Callable[[TensorInfo], int]) -> Callable[[int, int], torch.Tensor]:
    """`read(start, n)`: rows [start, start + n) of a `Load`, or of rows gathered from `Load`s, read from the files."""
    if isinstance(node, Load):
        info = node.tensor
        in_row = math.prod(info.shape[1:]) * DTYPE_SIZES[info.dtype]

        def read_block(start: int, n: int) -> torch.Tensor:
            block = torch.empty((n, *info.shape[1:]), dtype=torch_dtype(info.dtype))
            _read_into(_bytes_of(block), open_input(info), info.offset + start * in_row, info)
            return block

        return read_block
    params = dict(node.params)
    pairs = row_pairs(params["take"])
    infos = [load.tensor for load in node.inputs]
    own_mean = _mean_rows(infos[0], open_input, params["used"]) if bool((pairs[:, 0] == OWN_MEAN).any()) else None

    def read(k: int, picked: torch.Tensor) -> torch.Tensor:
        return read_rows(infos[k], open_input(infos[k]), picked.tolist())

    return lambda start, n: gather_rows(pairs[start:start + n], params["means"], own_mean, read,
                                        torch_dtype(node.dtype), node.shape[1:])


def _mean_rows(info: TensorInfo, open_input: Callable[[TensorInfo], int], used: int) -> torch.Tensor:
    """The float32 mean of the first `used` rows of an input matrix, read a block of rows at a time."""
    step = max(1, CAST_CHUNK_BYTES // (math.prod(info.shape[1:]) * 4))
    total = torch.zeros(info.shape[1:], dtype=torch.float64)
    for start in range(0, used, step):
        total += read_rows(info, open_input(info), list(range(start, min(used, start + step)))).double().sum(0)
    return (total / max(used, 1)).float()


class Evaluator:
    """Computes output nodes; `roots` are all nodes that will be asked for, in order."""

    def __init__(self, roots: list[Node], open_input: Callable[[TensorInfo], int], device: str = "cpu"):
        self.open_input = open_input
        self.device = torch.device(device)
        self.uses: Counter[Node] = Counter()
        self.cache: dict[Node, torch.Tensor] = {}
        for root in roots:
            self._count(root)

    def shared(self) -> bool:
        """Whether some node is used more than once (by several roots, or twice in one graph)."""
        return any(count > 1 for count in self.uses.values())

    def inputs_of(self, node: Node) -> list[torch.Tensor]:
        """The input tensors `node` reads, read again (for `check_finite`, after a failure)."""
        return [read_tensor(load.tensor, self.open_input(load.tensor)) for load in loads_of(node)]

    def _count(self, node: Node) -> None:
        self.uses[node] += 1
        if self.uses[node] == 1 and isinstance(node, Apply):
            for child in node.inputs:
                self._count(child)

    def value(self, node: Node) -> torch.Tensor:
        """The tensor of `node`; shared values are dropped after their last use."""
        result = self.cache.get(node)
        if result is None:
            result = self._compute(node)
        self.uses[node] -= 1
        if self.uses[node] > 0:
            self.cache[node] = result
        else:
            self.cache.pop(node, None)
        return result

    def _compute(self, node: Node) -> torch.Tensor:
        if isinstance(node, Load):
            return read_tensor(node.tensor, self.open_input(node.tensor)).to(self.device)
        inputs = [self.value(child) for child in node.inputs]
        result = KERNELS[node.kernel](*inputs, **dict(node.params))
        dtype = torch_dtype(node.dtype)
        return result if result.dtype == dtype else result.to(dtype)  # a kernel's result is in its compute dtype
