"""Read and check safetensors headers without reading tensor data.

Format: 8 bytes little-endian header length N, N bytes of JSON, then the data
buffer. Every tensor entry is `{"dtype", "shape", "data_offsets": [begin, end]}`
relative to the buffer. We trust nothing: offsets inside the file, known dtype,
byte span equal to shape times element size, no overlaps.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from recipekit.engine.core.words import counted
from recipekit.engine.errors import Problem, SourceError

# safetensors dtype name -> bytes per element
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_MAX_HEADER = 100 * 2**20  # the safetensors library refuses larger headers too


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: `offset` is absolute within `file`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int


def read_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header: (tensors, metadata)."""
    where = str(file)
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = header_length(f.read(8), size, where)
            raw = f.read(n)
    except OSError as e:
        raise SourceError(Problem(f"cannot read: {e.strerror}", where)) from None
    return parse_header(raw, size, file, where)


def header_length(head: bytes, size: int, where: str) -> int:
    """The JSON header's length from a file's first 8 bytes, checked against the file's size."""
    if len(head) < 8:
        raise SourceError(Problem("truncated safetensors file: shorter than its 8-byte header length", where))
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER or 8 + n > size:
        raise SourceError(Problem(
            f"not a safetensors file or truncated: header length {n} does not fit in {counted(size, 'byte')}", where))
    return n


def parse_header(raw: bytes, size: int, file: Path, where: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate the JSON header `raw` of a safetensors file of `size` bytes that is (or will be) at `file`."""
    n = len(raw)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise SourceError(Problem("corrupt safetensors header: not JSON (or nested absurdly deep)", where)) from None
    if not isinstance(header, dict):
        raise SourceError(Problem("corrupt safetensors header: not a JSON object", where))
    data_start, data_size = 8 + n, size - 8 - n
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SourceError(Problem("corrupt safetensors header: __metadata__ is not an object", where))
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        begin, end, dtype, shape = _entry(name, entry, where)
        if end > data_size:
            raise SourceError(Problem(
                f"tensor {name!r} ends at byte {end} but the data is only {counted(data_size, 'byte')}: truncated or "
                "lying header",
                where))
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != expected:
            raise SourceError(Problem(
                f"tensor {name!r}: shape {list(shape)} in {dtype} needs {counted(expected, 'byte')}, the header "
                f"gives {end - begin}",
                where))
        spans.append((begin, end, name))
        tensors[name] = TensorInfo(name, dtype, shape, file, data_start + begin, end - begin)
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise SourceError(Problem(f"tensors {n0!r} and {n1!r} overlap in the file: lying header", where))
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _entry(name: str, entry: object, where: str) -> tuple[int, int, str, tuple[int, ...]]:
    if not isinstance(entry, dict):
        raise SourceError(Problem(f"corrupt header entry for {name!r}", where))
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise SourceError(Problem(f"tensor {name!r} has unknown dtype {dtype!r}", where))
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise SourceError(Problem(f"tensor {name!r} has an invalid shape {shape!r}", where))
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise SourceError(Problem(f"tensor {name!r} has invalid data_offsets {offsets!r}", where))
    return offsets[0], offsets[1], dtype, tuple(shape)
