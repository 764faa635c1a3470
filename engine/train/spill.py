"""Trained tensors on disk until the writer copies them: a scratch file per process, removed at exit.

A healed model larger than RAM must not hold its trained weights in memory until the write, so each trained
tensor is appended here as soon as its layer is done and comes back as a `Load` of this file, in the stored
dtype of the tensor it replaces: the planner casts it to `output.dtype` like any input, or copies its bytes.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import torch

from recipekit.engine.core.graph import Load
from recipekit.engine.core.kernels import torch_dtype
from recipekit.engine.io.safetensors_header import TensorInfo
from recipekit.engine.run.evaluate import write_tensor

_folder: Path | None = None


def _scratch_folder() -> Path:
    global _folder
    if _folder is None:
        _folder = Path(tempfile.mkdtemp(prefix="recipekit-heal-"))
        atexit.register(shutil.rmtree, _folder, ignore_errors=True)
    return _folder


class Spill:
    """An append-only scratch file of trained tensors."""

    def __init__(self) -> None:
        handle, name = tempfile.mkstemp(suffix=".bin", dir=_scratch_folder())
        os.close(handle)
        self.path = Path(name)
        self.size = 0

    def put(self, name: str, tensor: torch.Tensor, dtype: str) -> Load:
        """Append `tensor` rounded to `dtype` (a safetensors name); the node that reads it back."""
        values = tensor.detach().to(device="cpu", dtype=torch_dtype(dtype)).contiguous()
        nbytes = values.numel() * values.element_size()
        fd = os.open(self.path, os.O_WRONLY)
        try:
            write_tensor(values, fd, self.size)
        finally:
            os.close(fd)
        info = TensorInfo(name, dtype, tuple(values.shape), self.path, self.size, nbytes)
        self.size += nbytes
        return Load(info)
