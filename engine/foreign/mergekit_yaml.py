"""mergekit-yaml configs as recipes, where recipekit computes the same thing: the passthrough method.

A passthrough config stacks layer ranges (`slices`, one source each) and
becomes one `slice_layers` step. As in mergekit, the embeddings (and here the
config) come from the first slice's model, the final norm and `lm_head` from
the last slice's (`head`), the tokenizer from `tokenizer_source` or else the
base. Merge methods that combine weights are refused until an op computes
them.
"""
from __future__ import annotations

from typing import Any

from recipekit.engine.errors import Path_
from recipekit.engine.foreign.translation import ConfigTranslator, Translation

_KEYS = ("merge_method", "slices", "base_model", "dtype", "out_dtype", "tokenizer_source", "tokenizer")
_SLICE_KEYS = ("sources",)
_SOURCE_KEYS = ("model", "layer_range")
# mergekit fields that mean something recipekit does not compute (yet)
_UNSUPPORTED = {
    "models": "the `models` form of passthrough copies one model unchanged; write it as `slices` with one "
              "layer_range covering the model",
    "chat_template": "chat_template is not supported; the output keeps the tokenizer's own template",
    "modules": "per-module configs (`modules`) are not supported",
    "parameters": "passthrough takes no parameters here",
}


class MergekitYaml(ConfigTranslator):
    """mergekit-yaml's config (`merge_method: passthrough`, `slices`, ...) as a slice_layers recipe."""

    format = "mergekit-yaml"

    def translate(self) -> Translation:
        data = self.data
        self._unknown({k: v for k, v in data.items() if k not in _UNSUPPORTED}, _KEYS, (), "a mergekit-yaml config")
        method = data.get("merge_method")
        if method != "passthrough":
            self._refuse(("merge_method",), f"merge_method {method!r} is not supported: recipekit runs mergekit "
                                            f"configs that use passthrough (layer slices, frankenmerges); merges "
                                            f"that combine weights (linear, slerp, ties, dare, ...) are not "
                                            f"implemented yet")
        for key, why in _UNSUPPORTED.items():
            if data.get(key) not in (None, {}, []):
                self._refuse((key,), why)
        if "slices" not in data and "models" not in data:
            self._refuse((), "a passthrough config needs `slices`: a list of {sources: [{model, layer_range}]}")
        slices = self._slices(data.get("slices"))
        step: dict[str, Any] = {"op": "slice_layers", "slices": slices}
        self.paths[("steps", 0)] = ("slices",)
        first = slices[0]["model"] if slices else None
        base = data.get("base_model")
        if base is not None and first is not None and self._model(base, ("base_model",), None) != first:
            self._refuse(("base_model",), "base_model differs from the first slice's model: mergekit would take "
                                          "the embeddings from the first slice and the config from base_model; "
                                          "recipekit takes both from one model (make them the same, or write a "
                                          "recipe with slice_layers' `base`)")
        last = slices[-1]["model"] if slices else None
        if last is not None and last != first:
            step["head"] = last
            self.paths[("steps", 0, "head")] = ("slices", len(slices) - 1, "sources", 0, "model")
        output: dict[str, Any] = {}
        for key in ("out_dtype", "dtype"):  # mergekit writes out_dtype, else its compute dtype
            if data.get(key) is not None:
                output["dtype"] = data[key]
                self.paths[("output", "dtype")] = (key,)
                break
        tokenizer = self._tokenizer(first)
        if tokenizer is not None:
            output["tokenizer"] = tokenizer
        recipe: dict[str, Any] = {"recipe": 1, "models": dict(self.models), "steps": [step]}
        if output:
            recipe["output"] = output
        return self.finish(recipe)

    def _slices(self, value: Any) -> list[dict]:
        if value is None:
            return []
        if not isinstance(value, list) or not value:
            self._refuse(("slices",), "expected a list of slices, each {sources: [{model, layer_range}]}")
            return []
        slices = []
        for k, entry in enumerate(value):
            where: Path_ = ("slices", k)
            if not isinstance(entry, dict):
                self._refuse(where, "a slice is a mapping with `sources`")
                continue
            self._unknown(entry, _SLICE_KEYS, where, "a mergekit slice")
            sources = entry.get("sources")
            if not isinstance(sources, list) or not sources:
                self._refuse(where, "expected `sources`: a list with one {model, layer_range}")
                continue
            if len(sources) > 1:
                self._refuse(where + ("sources", 1), "passthrough takes one source per slice; several sources "
                                                     "in a slice are merged, which recipekit does not do yet")
            source = sources[0]
            at: Path_ = where + ("sources", 0)
            if not isinstance(source, dict):
                self._refuse(at, "a source is a mapping with model and layer_range")
                continue
            self._unknown(source, _SOURCE_KEYS, at, "a mergekit slice source")
            name = self._model(source.get("model"), at + ("model",), None)
            if "layer_range" not in source:
                self._refuse(at, "missing layer_range: [start, end] (end exclusive)")
            target = ("steps", 0, "slices", len(slices))
            self.paths[target] = at
            self.paths[target + ("model",)] = at + ("model",)
            self.paths[target + ("range",)] = at + ("layer_range",)
            slices.append({"model": name, "range": source.get("layer_range")})
        return slices

    def _tokenizer(self, base: str | None) -> str | None:
        """The recipe's `output.tokenizer` for `tokenizer_source` (or the newer `tokenizer: {source}`)."""
        data = self.data
        path: Path_ = ("tokenizer_source",)
        source = data.get("tokenizer_source")
        if isinstance(data.get("tokenizer"), dict):
            self._unknown(data["tokenizer"], ("source",), ("tokenizer",), "mergekit's tokenizer settings")
            source, path = data["tokenizer"].get("source"), ("tokenizer", "source")
        elif data.get("tokenizer") is not None:
            self._refuse(("tokenizer",), "expected a mapping {source: base or a model}")
        if source is None:
            return None
        self.paths[("output", "tokenizer")] = path
        if source == "base":
            if data.get("base_model") is None:
                self._refuse(path, "tokenizer_source: base needs a base_model")
            return base
        if source == "union":
            self._refuse(path, "tokenizer_source: union (a merged vocabulary) is not supported; name the model "
                               "whose tokenizer the output keeps")
            return None
        return self._model(source, path, None)
