"""Text files that measurements run on: read as UTF-8 with located errors, and cut into paragraphs."""
from __future__ import annotations

from pathlib import Path

from recipekit.engine.errors import Problem, SourceError


def read_text(path: Path) -> str:
    """A text file for evaluation; `SourceError` located at the file when it is unusable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SourceError(Problem("text file not found", str(path))) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(Problem(f"cannot read as UTF-8 text: {e}", str(path))) from None
    if not text.strip():
        raise SourceError(Problem("the text file is empty", str(path)))
    return text


def paragraphs(text: str) -> list[str]:
    """The texts of a file: its blank-line separated paragraphs (the whole text if it has none)."""
    parts = [p.strip() for p in text.split("\n\n")]
    return [p for p in parts if p] or [text.strip()]
