"""The metadata at the top of a model card: the YAML between a README.md's first two `---` lines.

An input's card is third-party text, read for a few fields (its license): at
most `MAX_BYTES` of the file, the front matter only, parsed by PyYAML's safe
loader (no tag can construct an object). A card whose front matter is absent
or unreadable simply states nothing.
"""
from __future__ import annotations

from pathlib import Path

import yaml

MAX_BYTES = 64 * 1024  # front matter is a few lines; a card's body can be long, and is never read


def front_matter(path: Path) -> dict:
    """The front matter of the card at `path` as a mapping; empty when it has none or it cannot be read."""
    try:
        with path.open("rb") as f:
            head = f.read(MAX_BYTES).decode("utf-8", errors="replace").lstrip("\ufeff")
    except OSError:
        return {}
    lines = head.split("\n")
    if lines[0].rstrip() != "---":
        return {}
    end = next((i for i, line in enumerate(lines[1:], 1) if line.rstrip() == "---"), None)
    if end is None:
        return {}  # not closed within the bound: not front matter a card means
    try:
        data = yaml.safe_load("\n".join(lines[1:end]))
    except (yaml.YAMLError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}
