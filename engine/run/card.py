"""The model card (README.md) written with every output.

Front matter follows the Hub's conventions so the model tree shows where a
model came from. Nothing here depends on time, host, or output path: two runs
give the same bytes.
"""
from __future__ import annotations

import json

from recipekit.engine.core.architectures import layer_config
from recipekit.engine.core.words import counted
from recipekit.engine.run.plan import Plan

PROJECT_URL = "https://github.com/recipekit/recipekit"


def render_card(plan: Plan, recipe_text: str, description: str | None, *, locked: bool = True) -> str:
    """The card; `locked=False` says the build has no `recipe.lock` (`--no-lock`)."""
    model = plan.model
    hub_ids = [source.hub_id for _, source in model.sources if source.hub_id]
    front = []
    if hub_ids:
        front.append("base_model:\n" + "".join(f"- {json.dumps(h)}\n" for h in hub_ids).rstrip("\n"))
        if len(hub_ids) > 1:
            front.append("base_model_relation: merge")
    front.append("library_name: transformers")
    tags = ["recipekit", *(t for t in model.tags if t != "recipekit")]
    front.append("tags:\n" + "\n".join(f"- {t}" for t in tags))

    lines = ["---", *front, "---", "", f"# {description.strip().splitlines()[0] if description else 'A recipekit model'}",
             "", f"Built with [recipekit]({PROJECT_URL}) from the recipe below "
             "(also in `recipe.yaml`; `recipe run recipe.yaml -o OUT` rebuilds it).", "", "## Inputs", "",
             "| name | reference | layers |", "| --- | --- | --- |"]
    for name, source in model.sources:
        kind = f" at commit `{source.commit}`" if source.commit else " (local directory)"
        layers = layer_config(source.config).get("num_hidden_layers", "?")
        lines.append(f"| `{name}` | `{source.ref}`{kind} | {layers} |")
    if not locked:
        lines += ["", ("This build is unlocked (`--no-lock`): no `recipe.lock` records the sha256 of its input "
                       "files, so a rebuild cannot check that it reads the same bytes.")]
    lines += ["", "## Steps", "", *(f"- {note}" for note in model.notes), "", "## Layers", "",
              "| output layers | from |", "| --- | --- |"]
    lines += [f"| {out} | {src} |" for out, src in layer_runs(model.layer_origins)]
    dtype = plan.config.get("dtype") or plan.config.get("torch_dtype") or "as in the inputs"
    sizes = (f"{counted(len(model.layer_origins), 'decoder layer')}, {counted(len(plan.tensors), 'tensor')} in "
             f"{counted(len(plan.shards), 'shard')}, dtype {dtype}.")
    lines += ["", sizes, "", "## Recipe", "", "```yaml", recipe_text.rstrip("\n"), "```", ""]
    return "\n".join(lines)


def layer_runs(origins: tuple[str, ...]) -> list[tuple[str, str]]:
    """Group output layers into runs taken consecutively from one model: [("0-3", "a 0-3"), ...]."""
    runs: list[list] = []
    for j, origin in enumerate(origins):
        name, _, index = origin.rpartition(":")
        i = int(index)
        if runs and runs[-1][2] == name and runs[-1][4] == i - 1:
            runs[-1][1], runs[-1][4] = j, i
        else:
            runs.append([j, j, name, i, i])
    return [(_span(a, b), f"{name} {_span(c, d)}") for a, b, name, c, d in runs]


def _span(a: int, b: int) -> str:
    return str(a) if a == b else f"{a}-{b}"
