"""Read-only descriptors of input files, opened once and shared by threads."""
from __future__ import annotations

import os
import threading
from pathlib import Path

from recipekit.engine.errors import Problem, SourceError
from recipekit.engine.io.safetensors_header import TensorInfo


class InputFiles:
    """`fd(info)` opens the file holding a tensor on first use; `close()` closes them all."""

    def __init__(self):
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def fd(self, info: TensorInfo) -> int:
        with self._lock:
            if info.file not in self._fds:
                try:
                    self._fds[info.file] = os.open(info.file, os.O_RDONLY)
                except OSError as e:
                    raise SourceError(Problem(f"cannot open: {e.strerror}", str(info.file))) from None
            return self._fds[info.file]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> InputFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
