"""recipekit's engine and public Python API.

    from recipekit.engine import load_recipe, inspect_model
    recipe = load_recipe("recipes/demo/drop-layers.yaml")
    plan = recipe.plan()            # reads headers only
    result = recipe.run("out/pruned", overwrite=True)

Importing this package does not import torch.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .api import LoadedRecipe, ModelInfo, inspect_model, load_recipe
from .errors import PlanError, Problem, RecipeError, RecipekitError, SourceError, WriteError
from .execute import RunResult
from .plan import Plan

try:
    __version__ = version("recipekit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["LoadedRecipe", "ModelInfo", "Plan", "PlanError", "Problem", "RecipeError", "RecipekitError",
           "RunResult", "SourceError", "WriteError", "inspect_model", "load_recipe", "__version__"]
