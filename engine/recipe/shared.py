"""Recipes shared in Hub model repos: fetched as untrusted data.

Every output carries its `recipe.yaml` (and `recipe.lock`), so a model repo
is its own build file. A fetched recipe may only name Hub models (no local,
absolute, `..` or `~` paths) unless the user allows local paths, and it is
bounded in size; the output location is always the user's `-o`.
"""
from __future__ import annotations

from pathlib import Path

from recipekit.engine.errors import Problem, RecipeError
from recipekit.engine.io import hub
from recipekit.engine.io.hub import parse_hub_ref
from recipekit.engine.recipe.document import Recipe
from recipekit.engine.recipe.yamlsource import Locator

MAX_SHARED_RECIPE_BYTES = 256 * 1024
MAX_SHARED_STEPS = 256
MAX_SHARED_MODELS = 64


def fetch_shared(ref: str) -> tuple[Path, Path | None]:
    """The `recipe.yaml` of Hub repo `ref` (`org/name[@rev]`) and its `recipe.lock` when it has one."""
    parsed = parse_hub_ref(ref)
    if parsed is None:
        raise RecipeError(Problem(f"{ref!r} is neither a recipe file nor a Hub id (org/name[@revision])"))
    repo, revision = parsed
    recipe = hub.fetch(repo, revision, "recipe.yaml", where=ref, required=True)
    lock = hub.fetch(repo, revision, "recipe.lock", where=ref, required=False)
    return recipe, lock


def untrusted_problems(recipe: Recipe, locator: Locator, *, allow_local_paths: bool) -> list[Problem]:
    """What a fetched recipe may not do: name local paths (unless allowed), or be unreasonably large."""
    problems = []
    if not allow_local_paths:
        for name, ref in recipe.models.items():
            if parse_hub_ref(ref) is None:
                path = ("models", name)
                problems.append(Problem(f"{ref!r} is not a Hub id: a shared recipe may only name Hub models "
                                        f"(org/name[@revision]); pass --allow-local-paths to let it read local "
                                        f"paths", locator.where(path), path))
        for k, step in enumerate(recipe.steps):
            for path, value in step.local_paths():
                full = ("steps", k, *path)
                problems.append(Problem(f"{value!r} is a local file: a shared recipe may not read local files; "
                                        f"pass --allow-local-paths to let it", locator.where(full), full))
    if len(recipe.steps) > MAX_SHARED_STEPS:
        problems.append(Problem(f"{len(recipe.steps)} steps; a shared recipe may have at most {MAX_SHARED_STEPS}",
                                locator.where(("steps",)), ("steps",)))
    if len(recipe.models) > MAX_SHARED_MODELS:
        problems.append(Problem(f"{len(recipe.models)} models; a shared recipe may name at most "
                                f"{MAX_SHARED_MODELS}", locator.where(("models",)), ("models",)))
    return problems
