"""The model card (README.md) written with every output.

Front matter follows the Hub's conventions (`provenance.py` holds the rules)
so the model tree shows where a model came from; the body says what was
built, from what, how to rebuild it, and holds the recipe. Nothing here
depends on time, host, or output path: two runs give the same bytes.
"""
from __future__ import annotations

import json
import re
from importlib.metadata import PackageNotFoundError, metadata

from recipekit.engine.core.added_modules import CONFIG_KEY
from recipekit.engine.core.architectures import layer_config
from recipekit.engine.core.tags import HEALED
from recipekit.engine.core.words import counted, listed
from recipekit.engine.io.source import ModelSource
from recipekit.engine.recipe.document import Recipe
from recipekit.engine.recipe.standalone import Standalone
from recipekit.engine.run import provenance
from recipekit.engine.run.plan import Plan

HUB_URL = "https://huggingface.co"  # where a Hub reader finds a model page, whatever endpoint built this one
_PLAIN = re.compile(r"^[A-Za-z0-9][\w.+\-/]*$")  # a YAML scalar that needs no quotes


def render_card(plan: Plan, recipe: Recipe, text: str, standalone: Standalone, *, locked: bool = True) -> str:
    """The card of `plan`'s output, built by `recipe` (written as `text`; the output's `recipe.yaml` is
    `standalone`); `locked=False` says the build has no `recipe.lock` (`--no-lock`)."""
    model = plan.model
    card_license, license_words = provenance.output_license(model)
    lines = ["---", *front_matter(plan, card_license.front() if card_license else {}), "---", "",
             f"# {title(recipe)}", "", made_with(), "", "## Inputs", "",
             "| name | reference | layers |", "| --- | --- | --- |"]
    for name, source in model.sources:
        layers = layer_config(source.config).get("num_hidden_layers", "?")
        lines.append(f"| `{name}` | {reference(source)} | {layers} |")
    lines += ["", *_paragraphs(_bases(plan), license_words, "" if locked else (
        "This build is unlocked (`--no-lock`): no `recipe.lock` records the sha256 of its input files, so a "
        "rebuild cannot check that it reads the same bytes."))]
    lines += ["## Steps", "", *(f"- {note}" for note in model.notes), "", "## Layers", "",
              "| output layers | from |", "| --- | --- |"]
    lines += [f"| {out} | {src} |" for out, src in layer_runs(model.layer_origins)]
    dtype = plan.config.get("dtype") or plan.config.get("torch_dtype") or "as in the inputs"
    sizes = (f"{counted(len(model.layer_origins), 'decoder layer')}, {counted(len(plan.tensors), 'tensor')} in "
             f"{counted(len(plan.shards), 'shard')}, dtype {dtype}.")
    lines += ["", sizes, "", *loading(plan.config), "## Rebuild", "", rebuild(standalone), "",
              "## Recipe", "", "```yaml", text.rstrip("\n"), "```", ""]
    return "\n".join(lines)


def front_matter(plan: Plan, license_fields: dict[str, str]) -> list[str]:
    model = plan.model
    front = [f"{key}: {_scalar(value)}" for key, value in license_fields.items()]
    bases = provenance.base_models(model)
    if bases:
        front.append("base_model:\n" + "\n".join(f"- {_scalar(b)}" for b in bases))
        front.append(f"base_model_relation: {provenance.relation(model)}")
    front.append("library_name: transformers")
    front.append("tags:\n" + "\n".join(f"- {t}" for t in provenance.card_tags(model)))
    return front


def _scalar(value: str) -> str:
    return value if _PLAIN.match(value) else json.dumps(value)


def title(recipe: Recipe) -> str:
    """The description's first line, or else what the steps build, composed step by step."""
    if recipe.description and recipe.description.strip():
        return recipe.description.strip().splitlines()[0]
    names = {name: name for name in recipe.models}
    words = ""
    for step in recipe.steps:
        words = step.title(names)
        if step.id is not None:
            names[step.id] = words
    return words


def made_with() -> str:
    from recipekit.engine import __version__

    url = project_url()
    return f"Built with {f'[recipekit]({url})' if url else 'recipekit'} {__version__} from the recipe below."


def project_url() -> str | None:
    """The project's page from the package metadata (`[project.urls]`), or None: no link beats a guessed one."""
    try:
        entries = metadata("recipekit").get_all("Project-URL") or []
    except PackageNotFoundError:
        return None
    urls: dict[str, str] = {}
    for entry in entries:
        label, _, url = entry.partition(",")
        urls.setdefault(label.strip().lower(), url.strip())
    for label in ("homepage", "repository", "source", *urls):
        if urls.get(label, "").startswith(("https://", "http://")):
            return urls[label]
    return None


def reference(source: ModelSource) -> str:
    """An input as the table shows it: a Hub input links to its model page (at the revision the recipe pins)
    and to the commit it was built from."""
    if source.hub_id is None:
        return f"`{source.ref}` (local directory)"
    page = f"{HUB_URL}/{source.hub_id}"
    pinned = page if source.revision in (None, "main") else f"{page}/tree/{source.revision}"
    return f"[`{source.ref}`]({pinned}) at commit [`{source.commit}`]({page}/tree/{source.commit})"


def _bases(plan: Plan) -> str:
    """Which inputs `base_model` names, and why `base_model_relation` says what it says."""
    model = plan.model
    local = [f"`{name}`" for name, source in model.sources if source.hub_id is None]
    words = []
    what = "is a local directory" if len(local) == 1 else "are local directories"
    if local and len(local) == len(model.sources):
        words.append(f"No input has a Hub id ({listed(local)} {what}), so the card names no `base_model`.")
    elif local:
        words.append(f"`base_model` names the Hub inputs only: {listed(local)} {what}, with no Hub id.")
    relation = provenance.relation(model)
    if relation == "merge":
        words.append("Built from several models, it is a merge of its base models on the Hub "
                     "(`base_model_relation: merge`).")
    elif relation == "finetune":
        words.append("Every weight comes from one base model, which the Hub files as a fine-tune of it "
                     "(`base_model_relation: finetune`, the Hub's relation for a model derived from one base that "
                     "is neither an adapter nor quantized)"
                     + (", some of its weights trained: see the steps." if HEALED in model.tags else
                        ", though nothing was trained: see the steps."))
    return " ".join(words)


def loading(config: dict) -> list[str]:
    """How to load an output whose layers have added modules (none for a plain checkpoint): recipekit provides
    the classes, so the card says what to install and the lines that load it."""
    added = config.get(CONFIG_KEY)
    if not added:
        return []
    return ["## Loading", "",
            f"Its decoder layers have modules transformers does not know ({listed(list(added))}; model type "
            f"`{config.get('model_type')}`). recipekit provides their classes and registers them with transformers "
            "when it is imported; nothing in this folder is code and nothing needs `trust_remote_code`. Install "
            "`pip install 'recipekit[modules]'` (recipekit with transformers), then:", "",
            "```python", "import recipekit", "from transformers import AutoModelForCausalLM", "",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")', "```", ""]


def rebuild(standalone: Standalone) -> str:
    words = ["In this folder, `recipe run recipe.yaml -o ../rebuilt` rebuilds this model."]
    if standalone.absolute:
        words.append(f"`recipe.yaml` is the recipe below with its relative local paths "
                     f"({', '.join(f'`{f}`' for f in standalone.absolute)}) made absolute, so it reads the same "
                     "files from wherever it is run, as long as they stay where they are.")
    if standalone.shareable:
        words.append("It names Hub models only, so uploaded as a Hub repo it rebuilds from anywhere: "
                     "`recipe run <repo id> -o OUT`.")
    return " ".join(words)


def _paragraphs(*texts: str) -> list[str]:
    """Each non-empty text as a paragraph (followed by a blank line)."""
    return [line for text in texts if text for line in (text, "")]


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
