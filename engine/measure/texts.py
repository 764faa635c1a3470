"""Text files that measurements run on: read as UTF-8 with located errors, and cut into paragraphs."""
from __future__ import annotations

from pathlib import Path

from recipekit.engine.errors import Problem, SourceError

MAX_TEXT_BYTES = 64 * 2**20  # far more text than any measurement here reads (they stop at max texts or tokens)


def read_text(path: Path) -> str:
    """A text file for evaluation; `SourceError` located at the file when it is unusable. At most
    `MAX_TEXT_BYTES` are read, so `/dev/zero` or a corpus dump is refused at once instead of read."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_TEXT_BYTES + 1)
        if len(raw) > MAX_TEXT_BYTES:
            raise SourceError(Problem(f"the text file is larger than {MAX_TEXT_BYTES // 2**20} MiB: give an excerpt "
                                      "(measurements use the first texts or tokens only)", str(path)))
        text = raw.decode("utf-8")
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
