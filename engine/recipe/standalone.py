"""The recipe as an output keeps it (`recipe.yaml`): one that rebuilds the model from where it stands.

Relative local paths in a recipe are relative to the recipe's folder. Copied
into the output folder they would point inside it, and `models/llama-a`
would no longer exist there. So the copy gets every relative local path (an
input model, a text a step reads) made absolute, and nothing else changes:
the values are replaced in the text itself, so comments, order and layout
stay as written. Hub ids are kept as written, so a recipe that names only Hub
models is copied byte for byte and rebuilds anywhere (`recipe run org/name`).
Absolute paths depend only on where the inputs are, never on `-o`, so every
run of the same recipe writes the same `recipe.yaml`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from recipekit.engine.errors import Path_, format_path
from recipekit.engine.io.source import hub_reading
from recipekit.engine.recipe.document import Recipe

_PROPERTIES = re.compile(r"^(?:[&!]\S*\s+)*")  # an anchor or tag before a scalar: part of its node's span


@dataclass(frozen=True)
class Standalone:
    """The output's recipe text; `absolute` lists the fields whose relative paths were made absolute
    (`models.a`, `steps[0].select.text`); `shareable` says it names Hub models only and reads no local file,
    so it rebuilds anywhere, also as the recipe of a Hub repo."""

    text: str
    absolute: tuple[str, ...]
    shareable: bool


def standalone(text: str, recipe: Recipe, base_dir: Path, *, hub_only: bool = False) -> Standalone:
    """`text` (the recipe `recipe` was parsed from) with its relative local paths made absolute from `base_dir`.

    `hub_only` (a recipe fetched from the Hub) means every model is a Hub id, whatever exists locally."""
    targets: dict[Path_, str] = {}
    local_models = False
    for name, ref in recipe.models.items():
        if hub_only or hub_reading(ref, base_dir) is not None:
            continue
        local_models = True
        if not Path(ref).expanduser().is_absolute():
            targets[("models", name)] = str((base_dir / ref).resolve())
    local_files = [(("steps", k, *path), value) for k, step in enumerate(recipe.steps)
                   for path, value in step.local_paths()]
    for path, value in local_files:
        if not Path(value).expanduser().is_absolute():
            targets[path] = str((base_dir / value).resolve())
    return Standalone(_replace(text, targets), tuple(format_path(p) for p in targets),
                      shareable=not local_models and not local_files)


def _replace(text: str, targets: dict[Path_, str]) -> str:
    """`text` with the scalar at each path replaced by a double-quoted value (valid YAML in any context)."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    spans: dict[int, tuple[int, int, str]] = {}  # by node: an alias shares its anchor's node, replaced once
    for path, value in targets.items():
        node = _node(root, path)
        start, end = node.start_mark.index, node.end_mark.index
        start += len(_PROPERTIES.match(text[start:end]).group())
        quoted = json.dumps(value, ensure_ascii=False) + ("\n" if node.style in ("|", ">") else "")
        spans[id(node)] = (start, end, quoted)
    for start, end, quoted in sorted(spans.values(), reverse=True):
        text = text[:start] + quoted + text[end:]
    return text


def _node(root: yaml.Node, path: Path_) -> yaml.ScalarNode:
    node = root
    for key in path:
        if isinstance(key, int):
            node = node.value[key]
        else:
            node = next(v for k, v in node.value if k.value == key)
    return node
