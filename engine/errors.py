"""Typed errors for everything a user can get wrong.

Each error carries one or more `Problem`s; the CLI prints one line per problem
and exits with code 2. Code never recognises an error by its message text.
"""
from __future__ import annotations

from dataclasses import dataclass

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One complaint: `where` is `file:line:col` (or a file) when known, `path` the place in the recipe."""

    message: str
    where: str | None = None
    path: Path_ = ()

    def __str__(self) -> str:
        head = ": ".join(part for part in (self.where, format_path(self.path)) if part)
        return f"{head}: {self.message}" if head else self.message


def format_path(path: Path_) -> str:
    """`("steps", 0, "layers")` -> `steps[0].layers`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def in_file_order(problems: list[Problem]) -> list[Problem]:
    """Problems sorted by their `file:line:col` (unlocated ones first), as the user reads the file."""
    def position(problem: Problem) -> tuple[int, int]:
        parts = (problem.where or "").rsplit(":", 2)
        return (int(parts[1]), int(parts[2])) if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit() \
            else (0, 0)
    return sorted(problems, key=position)


class RecipekitError(Exception):
    """Base of the errors caused by user input; `problems` holds each complaint."""

    def __init__(self, problems: list[Problem] | Problem | str):
        if isinstance(problems, str):
            problems = [Problem(problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class RecipeError(RecipekitError):
    """The recipe text is not a valid recipe (syntax, schema, references)."""


class SourceError(RecipekitError):
    """An input model cannot be used: missing, unreadable, or its files lie."""


class PlanError(RecipekitError):
    """A valid recipe that cannot be built from these inputs."""


class WriteError(RecipekitError):
    """The output location cannot be written as asked."""


class RunFailed(Exception):
    """The run failed while writing, through no mistake in the input (the disk filled up): the CLI says so in one
    line and exits 1; nothing was left behind."""
