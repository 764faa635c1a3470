"""Byte sizes as people write them (`2GB`, `500MiB`) and as people read them."""
from __future__ import annotations

import re

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """`"2GB"` -> 2_000_000_000 (decimal units as transformers uses; `GiB` is binary)."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ValueError(f"expected a size such as 2GB or 500MiB, got {text!r}")
    if isinstance(text, int):
        if text <= 0:
            raise ValueError("a size must be positive")
        return text
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"cannot read {text!r} as a size: write e.g. 2GB, 500MB or 1GiB")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").upper()]
    if value < 1:
        raise ValueError(f"{text!r} is smaller than one byte")
    return int(value)


def human(n: float) -> str:
    """4_000_000 -> `4.0 MB` (decimal units, like the sizes recipes use)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
