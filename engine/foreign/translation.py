"""What a foreign config becomes: recipe data, its text, and a locator back into the config.

`ConfigTranslator` holds what every translator shares: the map from recipe
paths to config paths, the models named so far, and the problems found (all
reported at once, each located in the config).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import yaml

from recipekit.engine.errors import Path_, Problem, RecipeError, RecipekitError, in_file_order
from recipekit.engine.recipe.yamlsource import Locator

_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.\-]+")


@dataclass
class MappedLocator(Locator):
    """Locates recipe paths in a foreign config: `paths` maps a recipe path prefix to the config path it came from."""

    inner: Locator = field(default_factory=lambda: Locator(""))
    paths: dict[Path_, Path_] = field(default_factory=dict)

    def where(self, path: Path_, *, key: bool = False) -> str | None:
        return self.inner.where(self.original(path), key=key)

    def original(self, path: Path_) -> Path_:
        """The config path a recipe path came from (the config's top when none matches)."""
        for n in range(len(path), -1, -1):
            if path[:n] in self.paths:
                return self.paths[path[:n]] + path[n:]
        return ()

    def problems(self, error: RecipekitError) -> RecipekitError:
        """The same error with every problem's path in the config's terms, and a config field named once: one field
        may feed several recipe fields (mergekit's `dtype` is every merge's compute_dtype and the output's dtype)."""
        problems, named = [], set()
        for p in error.problems:
            path = self.original(p.path) if p.path else ()
            if path and (p.where, path) in named:
                continue
            named.add((p.where, path))
            problems.append(Problem(p.message, p.where, path))
        return type(error)(problems)


@dataclass(frozen=True)
class Translation:
    """A foreign config as recipe data, the recipe text that `recipe convert` prints, and a locator into the
    original file."""

    format: str
    data: dict
    text: str
    locator: MappedLocator


class ConfigTranslator:
    """Shared state and checks of a translator; each subclass defines `translate() -> Translation`, which
    ends with `finish`."""

    format = ""

    def __init__(self, data: dict, locator: Locator):
        self.data = data
        self.locator = locator
        self.problems: list[Problem] = []
        self.paths: dict[Path_, Path_] = {(): ()}  # recipe path prefix -> config path
        self.models: dict[str, str] = {}  # recipe model name -> reference

    def finish(self, recipe: dict) -> Translation:
        """The translation of `recipe`, or one `RecipeError` with every problem found."""
        if self.problems:
            raise RecipeError(in_file_order(self.problems))
        text = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True, width=100)
        return Translation(self.format, recipe, text,
                           MappedLocator(self.locator.filename, inner=self.locator, paths=self.paths))

    def _model(self, ref: Any, path: Path_, preferred: str | None) -> str:
        """The recipe's name for a model reference, adding it to `models` the first time."""
        if not isinstance(ref, str) or not ref:
            self._refuse(path, "expected a model: a local path or a Hub id org/name[@revision]")
            return "missing"
        if "+" in ref:
            self._refuse(path, f"{ref!r}: model+LoRA references are not supported; merge the LoRA first")
        for name, existing in self.models.items():
            if existing == ref:
                return name
        name = preferred or _NAME_CHARS.sub("-", PurePosixPath(ref.split("@")[0]).name).strip("-.") or "expert"
        if not name[0].isalpha() and name[0] != "_":
            name = f"m-{name}"
        unique, n = name, 2
        while unique in self.models:
            unique, n = f"{name}-{n}", n + 1
        self.models[unique] = ref
        self.paths[("models", unique)] = path
        return unique

    def _unknown(self, mapping: dict, known: tuple[str, ...], path: Path_, what: str) -> None:
        for key in mapping:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                self._refuse(path + (key,), f"{key!r} is not a field of {what} that recipekit supports ({hint}"
                                            f"supported: {', '.join(known)})", key=True)

    def _refuse(self, path: Path_, message: str, key: bool = False) -> None:
        self.problems.append(Problem(message, self.locator.where(path, key=key), path))
