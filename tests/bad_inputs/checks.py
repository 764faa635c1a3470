"""What every bad-input test checks: exit 2, one located line per problem, no traceback, nothing written.

The CLI runs in-process. Each stderr line (but the line a step that measures the model prints before it starts) is
the promised one-liner:
`recipe.yaml:LINE:COL: path: message` where the mistake is in the recipe (the
line and column are computed from the recipe text with `mark`), or the model
file / output path named for problems outside the recipe; and nothing was
written: no OUT, no hidden `.OUT.recipekit-partial*` sibling, no other change
under tmp_path.
"""
from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

from recipekit.engine.cli import main

COMMANDS = ["run", "validate", "plan"]
MEASURING = re.compile(r"recipe: steps\[\d+\] \w+: measuring ")


def yaml_text(text: str) -> str:
    """A recipe as written in a case: dedented, `<TAB>` standing for a tab character."""
    return textwrap.dedent(text).lstrip("\n").replace("<TAB>", "\t")


def mark(text: str, marked: str) -> str:
    """`line:col` (1-based) of the character after `^` in `marked`, a fragment occurring once in `text`."""
    assert marked.count("^") == 1, marked
    fragment = marked.replace("^", "")
    assert text.count(fragment) == 1, f"{fragment!r} must occur exactly once in the recipe:\n{text}"
    index = text.index(fragment) + marked.index("^")
    line = text.count("\n", 0, index) + 1
    col = index - (text.rfind("\n", 0, index) + 1) + 1
    return f"{line}:{col}"


@dataclass(frozen=True)
class Line:
    """One expected stderr line: located at `marker` (see `mark`), naming `path`, containing `words`."""

    marker: str
    path: str | None
    words: tuple[str, ...]

    def prefix(self, recipe: Path, text: str) -> str:
        head = f"{recipe}:{mark(text, self.marker)}: "
        return head + (f"{self.path}: " if self.path else "")


def line(marker: str, path: str | None, *words: str) -> Line:
    return Line(marker, path, words)


@dataclass(frozen=True)
class Result:
    rc: int
    err: str
    out: str


def cli(capsys, *argv: object) -> Result:
    capsys.readouterr()  # forget anything printed before
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return Result(rc, captured.err, captured.out)


def invoke(capsys, command: str, recipe: Path, out: Path, *extra: str) -> Result:
    if command == "run":
        return cli(capsys, "run", recipe, "-o", out, *extra)
    return cli(capsys, command, recipe, *extra)


def snapshot(root: Path) -> list[tuple[str, int, int]]:
    """Every path under root with its size and mtime, to prove a command changed nothing."""
    entries = []
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        entries.append((str(p.relative_to(root)), st.st_size if p.is_file() else -1, st.st_mtime_ns))
    return entries


def assert_refused(result: Result, expected: list[tuple[str, tuple[str, ...]]]) -> None:
    """Exit 2, no traceback, nothing on stdout, and exactly one stderr line per expected (prefix, words)."""
    report = f"rc={result.rc}\nstderr:\n{result.err}stdout:\n{result.out}"
    assert "Traceback" not in result.err and "Traceback" not in result.out, report
    assert "recipe: failed" not in result.err, report
    assert result.rc == 2, report
    assert result.out == "", report
    # a step that measures the model says so before it starts; that line is not a problem
    lines = [ln for ln in result.err.splitlines() if not MEASURING.match(ln)]
    assert len(lines) == len(expected), f"expected {len(expected)} line(s)\n{report}"
    unmatched = list(lines)
    for prefix, words in expected:
        hits = [ln for ln in unmatched if ln.startswith(prefix) and all(w in ln for w in words)]
        assert hits, f"no stderr line starts with {prefix!r} and contains {list(words)}\n{report}"
        unmatched.remove(hits[0])


def assert_no_output(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    leftovers = sorted(p.name for p in out.parent.glob(f".{out.name}.recipekit-*"))
    assert not leftovers, f"hidden leftovers beside {out}: {leftovers}"


def assert_recipe_refused(work: Path, capsys, command: str, text: str, lines: list[Line]) -> None:
    """Write `text` as work/recipe.yaml, run `command` on it: refused with `lines`, and nothing written."""
    recipe = work / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")
    out = work / "OUT"
    before = snapshot(work)

    result = invoke(capsys, command, recipe, out)

    assert_refused(result, [(ln.prefix(recipe, text), ln.words) for ln in lines])
    assert_no_output(out)
    assert snapshot(work) == before
