"""Configs of other tools, run unchanged: detect the format, translate it into recipe data.

A translation keeps a map from recipe paths to the paths of the config it
came from, so every later problem (a missing model, a bad layer) is located
in the user's own file. Fields we do not support are refused, each with its
location; nothing is silently ignored. Today: mergekit-moe configs, and
mergekit-yaml configs (passthrough frankenmerges and the merge methods the
`merge` op computes).
"""
from __future__ import annotations

from typing import Any

from recipekit.engine.foreign.mergekit_moe import MergekitMoe
from recipekit.engine.foreign.mergekit_yaml import MergekitYaml
from recipekit.engine.foreign.translation import Translation
from recipekit.engine.recipe.yamlsource import Locator

# format -> (keys that identify it, translator); a new foreign format is one more entry
FORMATS = {
    "mergekit-moe": (("base_model", "experts"), MergekitMoe),
    "mergekit-yaml": (("merge_method",), MergekitYaml),
}


def detect(data: Any) -> str | None:
    """The foreign format `data` is written in, or None for a recipekit recipe (or something else)."""
    if not isinstance(data, dict) or "recipe" in data:
        return None
    return next((name for name, (keys, _) in FORMATS.items() if all(k in data for k in keys)), None)


def translate(data: dict, locator: Locator) -> Translation:
    """Translate a detected foreign config; `RecipeError` naming every unsupported field with its location."""
    _, translator = FORMATS[detect(data)]
    return translator(data, locator).translate()
