"""Configs of other tools, run unchanged: detect the format, translate it into recipe data.

A translation keeps a map from recipe paths to the paths of the config it
came from, so every later problem (a missing model, a bad layer) is located
in the user's own file. Fields we do not support are refused, each with its
location; nothing is silently ignored. Today: mergekit-moe configs.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import yaml

from .errors import Path_, Problem, RecipeError, RecipekitError, in_file_order
from .yamlsource import Locator

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
        """The same error with every problem's path in the config's terms."""
        return type(error)([Problem(p.message, p.where, self.original(p.path) if p.path else ()) for p in error.problems])


@dataclass(frozen=True)
class Translation:
    """A foreign config as recipe data, the recipe text that `recipe convert` prints, and a locator into the
    original file."""

    format: str
    data: dict
    text: str
    locator: MappedLocator


def detect(data: Any) -> str | None:
    """The foreign format `data` is written in, or None for a recipekit recipe (or something else)."""
    if not isinstance(data, dict) or "recipe" in data:
        return None
    return next((name for name, (keys, _) in FORMATS.items() if all(k in data for k in keys)), None)


def translate(data: dict, locator: Locator) -> Translation:
    """Translate a detected foreign config; `RecipeError` naming every unsupported field with its location."""
    _, translator = FORMATS[detect(data)]
    return translator(data, locator).translate()


_MOE_KEYS = ("base_model", "gate_mode", "experts", "shared_experts", "experts_per_token", "dtype", "architecture")
_EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
# gate_mode -> init_gates settings reproducing mergekit's meaning
_GATE_MODES = {
    "hidden": {"mode": "hidden", "hidden_state": "residual", "token": "last"},
    "hidden_last": {"mode": "hidden", "hidden_state": "residual", "token": "last"},
    "hidden_avg": {"mode": "hidden", "hidden_state": "residual", "token": "mean"},
    "cheap_embed": {"mode": "cheap_embed", "token": "mean"},
    "random": {"mode": "random"},
    "uniform_random": {"mode": "uniform_random"},
}
_ARCHITECTURES = {"mixtral": "mixtral", "qwen": "qwen2_moe", "qwen3": "qwen3_moe"}


class _MergekitMoe:
    """mergekit-moe's config (`base_model`, `gate_mode`, `experts`, ...) as a stack_experts + init_gates recipe."""

    def __init__(self, data: dict, locator: Locator):
        self.data = data
        self.locator = locator
        self.problems: list[Problem] = []
        self.paths: dict[Path_, Path_] = {}
        self.models: dict[str, str] = {}  # recipe model name -> reference

    def translate(self) -> Translation:
        data = self.data
        self.paths[()] = ()
        self._unknown(data, _MOE_KEYS, (), "a mergekit-moe config")
        base = self._model(data.get("base_model"), ("base_model",), "base")
        experts = self._experts(data.get("experts"), ("experts",))
        shared = data.get("shared_experts")
        stack: dict[str, Any] = {"id": "moe", "op": "stack_experts", "base": base}
        self.paths[("steps", 0)] = ()
        self.paths[("steps", 0, "base")] = ("base_model",)
        architecture = data.get("architecture")
        if architecture is not None:
            if architecture in _ARCHITECTURES:
                stack["layout"] = _ARCHITECTURES[architecture]
                self.paths[("steps", 0, "layout")] = ("architecture",)
            else:
                self._refuse(("architecture",), f"architecture {architecture!r} is not supported (recipekit writes "
                                                 f"{', '.join(_ARCHITECTURES)})")
        if "experts_per_token" in data:
            stack["experts_per_token"] = data["experts_per_token"]
            self.paths[("steps", 0, "experts_per_token")] = ("experts_per_token",)
        stack["experts"] = experts
        self.paths[("steps", 0, "experts")] = ("experts",)
        if shared is not None:
            shared_list = self._experts(shared, ("shared_experts",))
            if isinstance(shared, list) and len(shared) > 1:
                self._refuse(("shared_experts", 1), "at most one shared expert is supported")
            elif shared_list:
                stack["shared_expert"] = shared_list[0]
                self.paths[("steps", 0, "shared_expert")] = ("shared_experts", 0)
        # mergekit-moe's default gate_mode is hidden
        mode = data.get("gate_mode", "hidden")
        gates: dict[str, Any] = {"op": "init_gates", "model": "moe"}
        for key in ((), ("mode",), ("hidden_state",), ("token",)):  # at the top when left at mergekit's default
            self.paths[("steps", 1) + key] = ("gate_mode",)
        if mode in _GATE_MODES:
            gates.update(_GATE_MODES[mode])
        else:
            self._refuse(("gate_mode",), f"gate_mode {mode!r} is not supported (supported: "
                                         f"{', '.join(_GATE_MODES)})")
        output: dict[str, Any] = {"tokenizer": "base"}
        if data.get("dtype") is not None:
            output["dtype"] = data["dtype"]
            self.paths[("output", "dtype")] = ("dtype",)
        if self.problems:
            raise RecipeError(in_file_order(self.problems))
        recipe = {"recipe": 1, "models": dict(self.models), "steps": [stack, gates], "output": output}
        text = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True, width=100)
        return Translation("mergekit-moe", recipe, text,
                           MappedLocator(self.locator.filename, inner=self.locator, paths=self.paths))

    def _experts(self, value: Any, path: Path_) -> list[dict]:
        if not isinstance(value, list) or not value:
            self._refuse(path, "expected a list of experts, each with a source_model")
            return []
        experts = []
        for k, entry in enumerate(value):
            where = path + (k,)
            if not isinstance(entry, dict):
                self._refuse(where, "an expert is a mapping with source_model and optional prompts")
                continue
            self._unknown(entry, _EXPERT_KEYS, where, "a mergekit-moe expert")
            name = self._model(entry.get("source_model"), where + ("source_model",), None)
            expert: dict[str, Any] = {"model": name}
            target = ("steps", 0, "experts", k) if path == ("experts",) else ("steps", 0, "shared_expert")
            self.paths[target + ("model",)] = where + ("source_model",)
            for ours, theirs in (("positive", "positive_prompts"), ("negative", "negative_prompts"),
                                 ("noise_scale", "noise_scale"), ("residual_scale", "residual_scale")):
                if entry.get(theirs) is not None:
                    expert[ours] = entry[theirs]
                    self.paths[target + (ours,)] = where + (theirs,)
            experts.append(expert)
        return experts

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


# format -> (keys that identify it, translator); a new foreign format is one more entry
FORMATS = {
    "mergekit-moe": (("base_model", "experts"), _MergekitMoe),
}
