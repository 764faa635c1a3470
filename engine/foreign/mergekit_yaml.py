"""mergekit-yaml configs as recipes: passthrough frankenmerges and every merge method the `merge` op computes.

- `merge_method: passthrough` stacks layer ranges (`slices`, one source each) and becomes one `slice_layers`
  step. As in mergekit, the embeddings (and here the config) come from the first slice's model, the final norm
  and `lm_head` from the last slice's (`head`).
- Any other method becomes `merge` steps. The `models` form is one merge of whole models. The `slices` form is
  one merge per slice (each source's layer range cut out first, unless it is the whole model), then the merged
  slices stacked, the embeddings from the first slice's merge and the final norm and `lm_head` from the last's,
  which is where mergekit takes them from too. A slice's own `parameters` are tried before the global ones, a
  source's before both, as in mergekit.
- mergekit's `dtype` is the dtype it computes in: every merge step's `compute_dtype`. The output is written in
  `out_dtype`, or else in `dtype`, as mergekit writes it.

The tokenizer comes from `tokenizer_source` or `tokenizer: {source, tokens, pad_to_multiple_of}` (a union, the
base or a model; `output.tokenizer`), the chat template from `chat_template` (`auto` or a template). A field recipekit does not compute is refused,
located in the config; nothing is silently ignored. Which methods exist is the recipe schema's business: an
unknown one is reported there, located at `merge_method`.
"""
from __future__ import annotations

from typing import Any

from recipekit.engine.errors import Path_
from recipekit.engine.foreign.translation import ConfigTranslator, Translation

_KEYS = ("merge_method", "slices", "models", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
         "tokenizer", "random_seed", "chat_template")
_UNSUPPORTED = {
    "modules": "per-module configs (`modules`) are not supported",
}
_PER_MODEL = ("weight", "density", "gamma", "epsilon", "scale")  # the merge op's per-model parameters


class MergekitYaml(ConfigTranslator):
    """mergekit-yaml's config (`merge_method`, `models` or `slices`, ...) as a recipe."""

    format = "mergekit-yaml"

    def translate(self) -> Translation:
        self._ids: set[str] = set()
        data = self.data
        self._unknown({k: v for k, v in data.items() if k not in _UNSUPPORTED}, _KEYS, (), "a mergekit-yaml config")
        for key, why in _UNSUPPORTED.items():
            if data.get(key) not in (None, {}, []):
                self._refuse((key,), why)
        has_slices, has_models = data.get("slices") is not None, data.get("models") is not None
        if has_slices == has_models:
            self._refuse((), "a mergekit config needs exactly one of `models` (whole models merged) and `slices` "
                             "(layer ranges)")
            return self.finish({})
        if data.get("merge_method") == "passthrough" and has_slices and not self._scaled():
            steps, first = self._passthrough()  # layer slices as they are: byte copies
        elif has_models:
            steps, first = self._merge_models()
        else:
            steps, first = self._merge_slices()
        output: dict[str, Any] = {}
        for key in ("out_dtype", "dtype"):  # mergekit writes out_dtype, else its compute dtype
            if data.get(key) is not None:
                output["dtype"] = data[key]
                self.paths[("output", "dtype")] = (key,)
                break
        tokenizer = self._tokenizer(first)
        if tokenizer is not None:
            output["tokenizer"] = tokenizer
        template = self._chat_template()
        if template is not None:
            output["chat_template"] = template
        recipe: dict[str, Any] = {"recipe": 1, "models": dict(self.models), "steps": steps}
        if output:
            recipe["output"] = output
        return self.finish(recipe)

    # ------------------------------------------------------------------ passthrough

    def _scaled(self) -> bool:
        """Does a passthrough config give a parameter (a `scale`) anywhere? Then it is a merge of one model."""
        levels = [self.data] + [s for s in self.data.get("slices") or [] if isinstance(s, dict)]
        sources = [src for s in levels[1:] for src in s.get("sources") or [] if isinstance(src, dict)]
        return any(level.get("parameters") not in (None, {}) for level in levels + sources)

    def _passthrough(self) -> tuple[list[dict], str | None]:
        data = self.data
        slices = []
        for k, sources in self._slice_sources():
            if len(sources) > 1:
                self._refuse(("slices", k, "sources", 1), "passthrough takes one source per slice; several "
                                                          "sources in a slice are a merge: give merge_method")
            if sources:
                at, source = sources[0]
                target = ("steps", 0, "slices", len(slices))
                name = self._model(source.get("model"), at + ("model",), None)
                self._map_source(target, at)
                slices.append({"model": name, "range": source.get("layer_range")})
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
        return [step], first

    # ------------------------------------------------------------------ merges

    def _merge_models(self) -> tuple[list[dict], str | None]:
        data = self.data
        entries = data.get("models")
        if not isinstance(entries, list) or not entries:
            self._refuse(("models",), "expected a list of {model, parameters}")
            return [], None
        sources = []
        for k, entry in enumerate(entries):
            at: Path_ = ("models", k)
            if not isinstance(entry, dict):
                self._refuse(at, "a model entry is a mapping {model, parameters}")
                continue
            self._unknown(entry, ("model", "parameters"), at, "a mergekit model entry")
            sources.append((at, entry))
        base = self._base(("base_model",), data.get("base_model"))
        self.paths[("steps", 0, "models")] = ("models",)
        step = self._merge_step(("steps", 0), sources, base, [("parameters",)])
        return [step], base or (step["models"][0]["model"] if step["models"] else None)

    def _merge_slices(self) -> tuple[list[dict], str | None]:
        # passthrough merges no base in: its base_model only names where the embeddings come from
        passthrough = self.data.get("merge_method") == "passthrough"
        global_base = None if passthrough else self._base(("base_model",), self.data.get("base_model"))
        steps: list[dict] = []
        merged: list[tuple[str, int, Path_]] = []  # (merge step id, layers, config path of the slice)
        for k, sources in self._slice_sources(extra=("base_model", "parameters")):
            at_slice: Path_ = ("slices", k)
            entry = self.data["slices"][k]
            base = None if passthrough else (self._base(at_slice + ("base_model",), entry.get("base_model"))
                                             or global_base)
            cut: list[tuple[Path_, dict]] = []  # each source's layer range, cut out as a step of its own
            base_cut = None
            for at, source in sources:
                name = self._model(source.get("model"), at + ("model",), None)
                cut_id = self._cut_id(name, source.get("layer_range"))
                cut_path = ("steps", len(steps))
                self._map_source(cut_path + ("slices", 0), at)
                self.paths[cut_path] = at
                steps.append({"id": cut_id, "op": "slice_layers", "slices": [{"model": name,
                                                                             "range": source.get("layer_range")}]})
                cut.append((at, {**source, "model": cut_id}))
                base_cut = cut_id if name == base and base_cut is None else base_cut
            if base is not None and base_cut is None:
                self._refuse(at_slice, f"the base {self.models.get(base, base)!r} is not among the slice's sources: "
                                       "mergekit merges a slice's sources, so give the base's layers there too")
            merge_path = ("steps", len(steps))
            self.paths[merge_path + ("models",)] = at_slice + ("sources",)
            step = self._merge_step(merge_path, cut, base_cut, [at_slice + ("parameters",), ("parameters",)],
                                    model_names=False)
            step["id"] = f"slice{k}"
            self.paths[merge_path] = at_slice
            steps.append(step)
            layers = _span(sources[0][1].get("layer_range")) if sources else 0
            merged.append((step["id"], layers, at_slice))
        if len(merged) == 1:
            steps[-1].pop("id")
            return steps, global_base
        stack = {"op": "slice_layers", "slices": [{"model": sid, "range": [0, layers]} for sid, layers, _ in merged],
                 "head": merged[-1][0]}
        stack_path = ("steps", len(steps))
        self.paths[stack_path] = ("slices",)
        for n, (_, _, at_slice) in enumerate(merged):
            self.paths[stack_path + ("slices", n)] = at_slice
        steps.append(stack)
        return steps, global_base

    def _merge_step(self, path: Path_, sources: list[tuple[Path_, dict]], base: str | None,
                    parameter_levels: list[Path_], model_names: bool = True) -> dict:
        """One merge step from (config path, {model, parameters}) sources; `parameter_levels` are the config
        paths of the parameter mappings that apply, the most specific first."""
        self.paths[path + ("method",)] = ("merge_method",)
        models = []
        for k, (at, source) in enumerate(sources):
            name = self._model(source.get("model"), at + ("model",), None) if model_names else source["model"]
            model: dict[str, Any] = {"model": name}
            target = path + ("models", k)
            self.paths[target] = at
            self.paths[target + ("model",)] = at + ("model",)
            own = source.get("parameters")
            if own not in (None, {}) and not isinstance(own, dict):
                self._refuse(at + ("parameters",), "expected a mapping of parameter names to values")
            for key, value in (own or {}).items():
                if key in _PER_MODEL:
                    model[key] = value
                    self.paths[target + (key,)] = at + ("parameters", key)
                else:
                    self._refuse(at + ("parameters", key), f"{key!r} is not a per-model parameter of recipekit's "
                                                           f"merge (those are {', '.join(_PER_MODEL)}); give it "
                                                           "under the config's parameters", key=True)
            models.append(model)
        step: dict[str, Any] = {"op": "merge", "method": self.data.get("merge_method"), "models": models}
        if base is not None:
            step["base"] = base
        self.paths[path + ("base",)] = ("base_model",)  # a missing base is reported as a missing base_model
        parameters = self._parameters(path, parameter_levels)
        if parameters:
            step["parameters"] = parameters
        if self.data.get("random_seed") is not None:
            step["seed"] = self.data["random_seed"]
            self.paths[path + ("seed",)] = ("random_seed",)
        if self.data.get("dtype") is not None:
            step["compute_dtype"] = self.data["dtype"]
            self.paths[path + ("compute_dtype",)] = ("dtype",)
        return step

    def _parameters(self, path: Path_, levels: list[Path_]) -> dict:
        """The parameters of the first level that names each one; where several do, a rule list that tries the
        more specific level first, so a filter that matches nothing falls through as in mergekit."""
        found: dict[str, list[tuple[Path_, Any]]] = {}
        for level in levels:
            mapping = self._at(level)
            if mapping in (None, {}):
                continue
            if not isinstance(mapping, dict):
                self._refuse(level, "expected a mapping of parameter names to values")
                continue
            for key, value in mapping.items():
                found.setdefault(key, []).append((level + (key,), value))
        parameters = {}
        for key, values in found.items():
            self.paths[path + ("parameters", key)] = values[0][0]
            parameters[key] = values[0][1] if len(values) == 1 else [rule for _, v in values for rule in _rules(v)]
        return parameters

    # ------------------------------------------------------------------ shared

    def _slice_sources(self, extra: tuple[str, ...] = ()) -> list[tuple[int, list[tuple[Path_, dict]]]]:
        value = self.data.get("slices")
        if not isinstance(value, list) or not value:
            self._refuse(("slices",), "expected a list of slices, each {sources: [{model, layer_range}]}")
            return []
        found = []
        for k, entry in enumerate(value):
            where: Path_ = ("slices", k)
            if not isinstance(entry, dict):
                self._refuse(where, "a slice is a mapping with `sources`")
                continue
            if entry.get("residual_weight") is not None:
                self._refuse(where + ("residual_weight",), "residual_weight is not supported")
            self._unknown({k2: v for k2, v in entry.items() if k2 != "residual_weight"}, ("sources", *extra), where,
                          "a mergekit slice")
            sources = entry.get("sources")
            if not isinstance(sources, list) or not sources:
                self._refuse(where, "expected `sources`: a list of {model, layer_range}")
                continue
            checked = []
            for j, source in enumerate(sources):
                at: Path_ = where + ("sources", j)
                if not isinstance(source, dict):
                    self._refuse(at, "a source is a mapping with model and layer_range")
                    continue
                self._unknown(source, ("model", "layer_range", "parameters"), at, "a mergekit slice source")
                if "layer_range" not in source:
                    self._refuse(at, "missing layer_range: [start, end] (end exclusive)")
                checked.append((at, source))
            found.append((k, checked))
        return found

    def _cut_id(self, name: str, layer_range: Any) -> str:
        """A step id that says what was cut (`ft1-layers-0-16`), unique in the recipe."""
        span = "-".join(str(v) for v in layer_range) if isinstance(layer_range, list) else "range"
        cut_id, n = f"{name}-layers-{span}", 2
        while cut_id in self._ids:
            cut_id, n = f"{name}-layers-{span}-{n}", n + 1
        self._ids.add(cut_id)
        return cut_id

    def _map_source(self, target: Path_, at: Path_) -> None:
        self.paths[target] = at
        self.paths[target + ("model",)] = at + ("model",)
        self.paths[target + ("range",)] = at + ("layer_range",)

    def _base(self, path: Path_, ref: Any) -> str | None:
        return None if ref is None else self._model(ref, path, None)

    def _at(self, path: Path_) -> Any:
        """The config's value at `path`, or None where there is none."""
        node: Any = self.data
        for part in path:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                return None
        return node

    def _tokenizer(self, base: str | None) -> str | dict | None:
        """The recipe's `output.tokenizer` for `tokenizer_source: union|base|<model>`, or for the newer
        `tokenizer: {source, tokens, pad_to_multiple_of}` (whose source defaults to union, as in mergekit)."""
        data = self.data
        settings = data.get("tokenizer")
        if settings is not None and not isinstance(settings, dict):
            self._refuse(("tokenizer",), "expected a mapping {source, tokens, pad_to_multiple_of}")
            return None
        if settings is None:
            source, path = data.get("tokenizer_source"), ("tokenizer_source",)
            if source is None:
                return None
        else:
            self._unknown(settings, ("source", "tokens", "pad_to_multiple_of"), ("tokenizer",),
                          "mergekit's tokenizer settings")
            source, path = settings.get("source", "union"), ("tokenizer", "source")
        self.paths[("output", "tokenizer")] = ("tokenizer",) if settings is not None else path
        self.paths[("output", "tokenizer", "source")] = path
        if source == "base":
            if data.get("base_model") is None:
                self._refuse(path, "tokenizer source base needs a base_model")
            name = base
        elif source == "union":
            name = "union"
        else:
            name = self._model(source, path, None)
        if settings is None or set(settings) <= {"source"}:
            return {"source": name} if name == "union" else name
        out: dict[str, Any] = {"source": name}
        if settings.get("pad_to_multiple_of") is not None:
            out["pad_to_multiple_of"] = settings["pad_to_multiple_of"]
        tokens = settings.get("tokens")
        if tokens is not None:
            if not isinstance(tokens, dict):
                self._refuse(("tokenizer", "tokens"), "expected a mapping from tokens to {source, force}")
            else:
                out["tokens"] = {token: self._token_source(entry, ("tokenizer", "tokens", token))
                                 for token, entry in tokens.items()}
        return out

    def _token_source(self, entry: Any, path: Path_) -> dict:
        """One entry of mergekit's `tokenizer.tokens`: {source: model | {kind: zero} | {kind: model_token, model,
        token}, force}."""
        self.paths[("output",) + path] = path
        if not isinstance(entry, dict):
            self._refuse(path, "expected a mapping {source, force}")
            return {}
        self._unknown(entry, ("source", "force"), path, "a mergekit token setting")
        source = entry.get("source")
        out: dict[str, Any] = {}
        if isinstance(source, dict):
            self._unknown(source, ("kind", "model", "token", "token_id"), path + ("source",), "a token source")
            kind = source.get("kind")
            if kind == "zero":
                out["source"] = "zero"
            elif kind == "model_token" and source.get("token") is not None:
                model = self._model(source.get("model"), path + ("source", "model"), None)
                out["source"] = {"model": model, "token": source["token"]}
                self.paths[("output",) + path + ("source", "token")] = path + ("source", "token")
            elif kind == "model_token":
                self._refuse(path + ("source",), "a token source by token_id is not supported; name the token "
                                                 "(token: ...)")
            else:
                self._refuse(path + ("source", "kind"), f"unknown token source kind {kind!r} (zero or model_token)")
        elif source is None:
            self._refuse(path, "a token setting needs a source (a model, {kind: zero} or {kind: model_token, ...})")
        else:
            out["source"] = self._model(source, path + ("source",), None)
        if entry.get("force") is not None:
            out["force"] = entry["force"]
        return out

    def _chat_template(self) -> str | None:
        """`chat_template`: auto, or a Jinja template. mergekit's built-in templates by name are its own data,
        which recipekit does not carry."""
        value = self.data.get("chat_template")
        if value in (None, ""):
            return None
        self.paths[("output", "chat_template")] = ("chat_template",)
        if value == "auto" or (isinstance(value, str) and ("{{" in value or "{%" in value)):
            return value
        self._refuse(("chat_template",), f"chat_template {value!r}: write `auto` or the Jinja template itself "
                                         "(mergekit's built-in templates by name are not included)")
        return None

def _rules(value: Any) -> list:
    """A parameter value as filter rules (a plain value or gradient is one rule that matches everything)."""
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        return value
    if isinstance(value, dict):
        return [{"value": v} if k in ("default", "*") else {"filter": k, "value": v} for k, v in value.items()]
    return [{"value": value}]


def _span(layer_range: Any) -> int:
    if isinstance(layer_range, list) and len(layer_range) == 2 and all(isinstance(v, int) for v in layer_range):
        return layer_range[1] - layer_range[0]
    return 0
