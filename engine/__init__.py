"""recipekit's engine and public Python API.

    from recipekit.engine import load_recipe, inspect_model
    recipe = load_recipe("recipes/demo/drop-layers.yaml")
    plan = recipe.plan()            # reads headers only
    result = recipe.run("out/pruned", overwrite=True)

Names are imported on first use, so `import recipekit.engine` is cheap and
never imports torch.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "LoadedRecipe": "api", "ModelInfo": "api", "inspect_model": "api", "load_recipe": "api",
    "PlanError": "errors", "Problem": "errors", "RecipeError": "errors", "RecipekitError": "errors",
    "SourceError": "errors", "WriteError": "errors", "RunResult": "run.write", "Plan": "run.plan",
}
__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from recipekit.engine.run.plan import Plan
    from recipekit.engine.run.write import RunResult

    from .api import LoadedRecipe, ModelInfo, inspect_model, load_recipe
    from .errors import PlanError, Problem, RecipeError, RecipekitError, SourceError, WriteError


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("recipekit")
        except PackageNotFoundError:  # a source tree that was never installed
            return "0+unknown"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
