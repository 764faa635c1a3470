"""The output's chat template: one model's, the one most inputs share (`auto`), or a template the recipe writes.

It is written into `tokenizer_config.json` (transformers reads it there), and a copied `chat_template.jinja` or
`chat_template.json` is left out, so that the output has one template.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from recipekit.engine.errors import PlanError, Problem
from recipekit.engine.io.source import ModelSource
from recipekit.engine.recipe.document import is_name
from recipekit.engine.vocab.tokenizer import json_bytes, read_json

TEMPLATE_FILES = ("tokenizer_config.json", "chat_template.jinja", "chat_template.json")


def template_of(source: ModelSource) -> tuple[str | list | None, list[Path]]:
    """A model's chat template (a string, or transformers' list of named templates) and the files read."""
    read = [p for p in map(source.side_file, TEMPLATE_FILES) if p is not None]
    config = read_json(source.side_file("tokenizer_config.json"), "tokenizer_config.json") or {}
    if config.get("chat_template"):
        return config["chat_template"], read
    jinja = source.side_file("chat_template.jinja")
    if jinja is not None:
        return jinja.read_text(encoding="utf-8"), read
    wrapped = read_json(source.side_file("chat_template.json"), "chat_template.json") or {}
    return wrapped.get("chat_template") or None, read


def chat_files(choice: str, inputs: dict[str, ModelSource], side: ModelSource,
               files: dict[str, bytes | None]) -> tuple[dict[str, bytes | None], list[Path], str | None]:
    """The side files with the chosen template in `tokenizer_config.json` (starting from `files`' version of it,
    else `side`'s), the files read, and a message for the user (or None)."""
    path = ("output", "chat_template")
    read: list[Path] = []
    if choice == "auto":
        votes: Counter[str] = Counter()
        for source in {s.root: s for s in inputs.values()}.values():
            template, seen = template_of(source)
            read += seen
            if template is not None:
                votes[json.dumps(template)] += 1  # Counter keeps first-seen order for ties
        if not votes:
            return files, read, "chat_template auto: no input has a chat template, so the output has none"
        template = json.loads(votes.most_common(1)[0][0])
    elif is_name(choice):
        template, read = template_of(inputs[choice])
        if template is None:
            raise PlanError(Problem(f"model {choice!r} has no chat template (none in its tokenizer_config.json, no "
                                    "chat_template.jinja): name another model, auto, or write the template",
                                    path=path))
    else:
        template = choice
    given = files.get("tokenizer_config.json")
    config = json.loads(given) if given else read_json(side.side_file("tokenizer_config.json"),
                                                       "tokenizer_config.json") or {}
    read += [p for p in [side.side_file("tokenizer_config.json")] if p is not None]
    out = {**files, "tokenizer_config.json": json_bytes({**config, "chat_template": template}),
           "chat_template.jinja": None, "chat_template.json": None}
    return out, read, None
