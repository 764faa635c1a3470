"""What a model card says about where a model came from, by the Hub's rules.

- `base_model`: every input that has a Hub id, once each (a local directory
  has none; the card's body names it instead).
- `base_model_relation`: the Hub knows four relations (`adapter`, `finetune`,
  `merge`, `quantized`) and calls a model built from two or more models a
  merge. recipekit writes no adapters and no quantized weights, so an output
  built from several input models is a `merge`; one built from a single model
  (layers dropped or re-stacked, a MoE upcycled from it, matrices made low
  rank) is a full set of weights derived from one base, which the Hub files as
  `finetune`: said explicitly, so the model tree does not depend on the Hub's
  guess, and the card's body says that nothing was trained (or, after `heal`,
  tagged `healed`, that some weights were).
- `license`: carried only when every input states one and they all agree,
  from its card's front matter or else its config; otherwise left out, and the
  body says why. Never invented.
- `tags`: `recipekit`, what the steps did (`core/tags.py`), and `merge` when
  several input models feed the output.
"""
from __future__ import annotations

from dataclasses import dataclass

from recipekit.engine.core import tags
from recipekit.engine.core.graph import LazyModel
from recipekit.engine.core.words import listed
from recipekit.engine.io.front_matter import front_matter
from recipekit.engine.io.source import ModelSource


def input_models(model: LazyModel) -> int:
    """How many distinct input models the output is built from (two names for one folder are one model)."""
    return len({source.root for _, source in model.sources})


def base_models(model: LazyModel) -> list[str]:
    """The Hub ids of the inputs, first appearance first."""
    return list(dict.fromkeys(source.hub_id for _, source in model.sources if source.hub_id))


def relation(model: LazyModel) -> str | None:
    """`base_model_relation`, or None when no input has a Hub id (then there is no `base_model` to relate to)."""
    if not base_models(model):
        return None
    return "merge" if input_models(model) > 1 else "finetune"


def card_tags(model: LazyModel) -> list[str]:
    several = (tags.MERGE,) if input_models(model) > 1 else ()
    return tags.ordered({tags.RECIPEKIT, *model.tags, *several})


@dataclass(frozen=True)
class License:
    """The license fields of a card's front matter (`name` and `link` go with `license: other`)."""

    license: str
    name: str | None = None
    link: str | None = None

    def front(self) -> dict[str, str]:
        fields = {"license": self.license, "license_name": self.name, "license_link": self.link}
        return {key: value for key, value in fields.items() if value is not None}

    def __str__(self) -> str:
        return self.license if self.name is None else f"{self.license} ({self.name})"


def input_license(source: ModelSource) -> License | None:
    """The license an input states: in its card's front matter, else in its config.json; None if neither."""
    for fields in (front_matter(source.card) if source.card else {}, source.config):
        value = _text(fields.get("license"))
        if value is not None:
            return License(value, _text(fields.get("license_name")), _text(fields.get("license_link")))
    return None


def _text(value: object) -> str | None:
    """A one-line string from third-party metadata, or None (anything else would break the card's layout)."""
    return value.strip() if isinstance(value, str) and value.strip() and value.isprintable() else None


def output_license(model: LazyModel) -> tuple[License | None, str]:
    """The output's license when every input states the same one, and the card's sentence about it."""
    stated = {name: input_license(source) for name, source in model.sources}
    silent = [f"`{name}`" for name, found in stated.items() if found is None]
    if silent:
        one = len(silent) == 1
        return None, (f"No license is given here: {listed(silent)} {'states' if one else 'state'} none (no "
                      f"`license` in {'its' if one else 'their'} README.md front matter or config.json). Check the "
                      "terms of every input before sharing this model.")
    licenses = set(stated.values())
    if len(licenses) > 1:
        each = ", ".join(f"`{name}` {found}" for name, found in stated.items())
        return None, (f"No license is given here: the inputs state different ones ({each}), and the terms of each "
                      "apply to this model.")
    (found,) = licenses
    return found, f"License: `{found}`, as every input states."
