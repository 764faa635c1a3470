"""Counts as people read them: `1 matrix`, `2 matrices`."""
from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n` and the noun that agrees with it; the plural is `noun + "s"` unless given."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
