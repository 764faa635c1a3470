"""Words as people read them: counts (`1 matrix`, `2 matrices`) and lists (`a, b and c`)."""
from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n` and the noun that agrees with it; the plural is `noun + "s"` unless given."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def listed(items: list[str]) -> str:
    """`a`, `a and b`, `a, b and c`."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
