"""Tensor computation: the one engine module that imports torch.

The executor imports it when the first tensor has to be computed, so runs
that only move bytes never pay for torch. `Evaluator` computes output nodes
one at a time and keeps a shared intermediate only until its last consumer
has used it.
"""
from __future__ import annotations

import ctypes
import os
from collections import Counter
from collections.abc import Callable

import torch

from .lazy import Apply, Load, Node
from .safetensors_header import TensorInfo

TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16, "U32": torch.uint32,
    "U64": torch.uint64,
}


def cast(x: torch.Tensor, *, dtype: str) -> torch.Tensor:
    """Any shape; the same values in another dtype (round to nearest)."""
    return x.to(TORCH_DTYPES[dtype])


KERNELS: dict[str, Callable[..., torch.Tensor]] = {"cast": cast}


def device_problem(device: str) -> str | None:
    """Why `device` cannot be used here, or None."""
    if device == "cpu":
        return None
    if device.startswith("cuda"):
        return None if torch.cuda.is_available() else f"--device {device}: no CUDA device is available here"
    return f"--device {device}: expected cpu or cuda"


def read_tensor(info: TensorInfo, fd: int) -> torch.Tensor:
    """One input tensor, read from its file into fresh CPU memory."""
    buffer = bytearray(info.nbytes)
    view, done = memoryview(buffer), 0
    while done < info.nbytes:
        got = os.preadv(fd, [view[done:]], info.offset + done)
        if got == 0:
            raise OSError(f"{info.file} ended before tensor {info.name!r} (was it truncated while running?)")
        done += got
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=TORCH_DTYPES[info.dtype])
    return torch.frombuffer(buffer, dtype=TORCH_DTYPES[info.dtype]).reshape(info.shape)


def write_tensor(tensor: torch.Tensor, fd: int, offset: int) -> None:
    """Write a tensor's raw little-endian bytes at `offset`, without a copy on the CPU."""
    tensor = tensor.detach().contiguous().cpu()
    size = tensor.numel() * tensor.element_size()
    if size == 0:
        return
    view = memoryview((ctypes.c_char * size).from_address(tensor.data_ptr())).cast("B")
    done = 0
    while done < size:
        done += os.pwrite(fd, view[done:], offset + done)


class Evaluator:
    """Computes output nodes; `roots` are all nodes that will be asked for, in order."""

    def __init__(self, roots: list[Node], open_input: Callable[[TensorInfo], int], device: str = "cpu"):
        self.open_input = open_input
        self.device = torch.device(device)
        self.uses: Counter[Node] = Counter()
        self.cache: dict[Node, torch.Tensor] = {}
        for root in roots:
            self._count(root)

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
        return KERNELS[node.kernel](*inputs, **dict(node.params))
