"""The recipe format, version 1: parse, validate, and report every problem located.

`parse_recipe` turns YAML (or a dict) into a typed `Recipe`. Pydantic's errors
become `Problem`s pointing at the YAML node; references between steps are
checked in a second pass so one report holds everything wrong with a recipe.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, TypeAdapter, ValidationError

from recipekit.engine.core.schema import NAME_PATTERN, Name, Ref, StepBase, Strict
from recipekit.engine.core.sizes import parse_size
from recipekit.engine.errors import Path_, Problem, RecipeError, in_file_order
from recipekit.engine.recipe.yamlsource import Locator
from recipekit.ops.registry import Step

RECIPE_VERSION = 1
# output.dtype -> safetensors dtype
OUTPUT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}

ShardSize = Annotated[
    int,
    BeforeValidator(parse_size, json_schema_input_type=int | str),
    Field(description="Largest shard file, e.g. 2GB, 500MB, 1GiB (GB = 10^9 bytes), or a number of bytes."),
]


class TokenRow(Strict):
    """Another token's row: `{model: chat, token: "<|im_end|>"}`."""

    model: Ref = Field(description="The model whose row is taken.")
    token: str = Field(min_length=1, description="The token (as its tokenizer writes it) whose row is taken.")


class TokenOverride(Strict):
    """Where one token's embedding and lm_head rows come from, instead of the default rule."""

    source: TokenRow | Ref = Field(description=(
        "`zero` (a zero row), a model name (that model's row of this token), or {model, token} (that model's row "
        "of another token)."))
    force: bool = Field(False, description=(
        "Use this row for every input model, also those that have the token (as mergekit's force); default: only "
        "for the models that lack it."))


VOCABULARY_KEYWORDS = ("union", "base")  # `source` values that are not model names (`base` unless a model is so named)


class TokenizerSettings(Strict):
    """The output vocabulary: its tokenizer, and where each token's embedding and lm_head rows come from."""

    source: Ref = Field("union", description=(
        "`union` (every token of every input: the base's ids first, then the others' new tokens), `base` (the "
        "model the output's embeddings come from, or the model named base) or a model name."))
    tokens: dict[str, TokenOverride] = Field(default_factory=dict, description=(
        "Per-token row sources, by token as its tokenizer writes it."))
    pad_to_multiple_of: int | None = Field(None, ge=1, description=(
        "Round the number of rows up to a multiple of this; the padding rows are zero."))
    missing: Literal["zero", "mean"] = Field("zero", description=(
        "The row of a token no input has a row for: zero, or the mean of the model's rows that tokens use."))


class Output(Strict):
    """How the result is written."""

    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None, description="Cast every floating-point tensor to this dtype; default: keep each tensor's dtype.")
    shard_size: ShardSize = "5GB"
    tokenizer: Ref | TokenizerSettings | None = Field(
        None, description="Model whose tokenizer (and generation config) is copied, or the output vocabulary's "
                          "settings; default: the tokenizer of the model that gives the output its embeddings "
                          "(inputs with different vocabularies need a setting).")
    chat_template: str | None = Field(None, min_length=1, description=(
        "The output's chat template: a model name (its template), `auto` (the template most inputs share) or a "
        "Jinja template; default: the tokenizer's own."))

    def references(self) -> list[tuple[Path_, str]]:
        """The models the output settings name, with their paths (keywords like `union` and `zero` are not)."""
        refs: list[tuple[Path_, str]] = []
        settings = self.tokenizer
        if isinstance(settings, str):
            refs.append((("tokenizer",), settings))
        elif settings is not None:
            if settings.source not in VOCABULARY_KEYWORDS:
                refs.append((("tokenizer", "source"), settings.source))
            for token, override in settings.tokens.items():
                source = override.source
                if isinstance(source, TokenRow):
                    refs.append((("tokenizer", "tokens", token, "source", "model"), source.model))
                elif source != "zero":
                    refs.append((("tokenizer", "tokens", token, "source"), source))
        if self.chat_template is not None and self.chat_template != "auto" and is_name(self.chat_template):
            refs.append((("chat_template",), self.chat_template))
        return refs


def is_name(text: str) -> bool:
    """Whether `text` reads as a model name rather than a template (which holds `{{` or `{%`)."""
    return re.match(NAME_PATTERN, text) is not None


def _said(text: str) -> str:
    if not text.strip():
        raise ValueError("the description is blank: say what the recipe builds, or leave description out")
    return text


def _version(value: object) -> object:
    if isinstance(value, bool):  # True == 1 in Python; a version is a number
        raise ValueError(f"expected the recipe format version 1, got {value!r}")
    return value


class Recipe(Strict):
    """A recipekit recipe: input models, steps, and how to write the output (the last step's result)."""

    recipe: Annotated[Literal[1], BeforeValidator(_version)] = Field(
        description="Recipe format version; this is version 1.")
    description: Annotated[str, AfterValidator(_said)] | None = Field(
        None, description="What this recipe builds, for people and the model card.")
    models: dict[Name, str] = Field(
        min_length=1, description="Input models by name: a local model directory (relative to the recipe's folder).")
    steps: list[Step] = Field(min_length=1, description="Operations in order; the last one's result is the output.")
    output: Output = Field(default_factory=Output, description="How the output is written.")


def parse_recipe(data: Any, locator: Locator) -> Recipe:
    """Validate recipe data; raise `RecipeError` listing every problem with its location."""
    if not isinstance(data, dict):
        raise RecipeError(Problem(f"a recipe is a mapping with keys recipe, models, steps, output; "
                                  f"got {type(data).__name__}", locator.where(())))
    version = data.get("recipe")
    if version is not None and version != RECIPE_VERSION:
        raise RecipeError(Problem(f"unsupported recipe version {version!r}: this recipekit reads version "
                                  f"{RECIPE_VERSION}", locator.where(("recipe",)), ("recipe",)))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        problems = [_problem(err, data, locator) for err in e.errors(include_url=False)]
        # report wrong references too, for the steps that are valid on their own
        models = data.get("models") if isinstance(data.get("models"), dict) else {}
        steps = data.get("steps") if isinstance(data.get("steps"), list) else []
        valid = [_valid_step(s) for s in steps]
        problems += (check_references(list(models), valid, _output_references(data.get("output")), locator)
                     or unused_results(valid, locator))
        raise RecipeError(in_file_order(problems)) from None
    problems = (check_references(list(recipe.models), recipe.steps, recipe.output.references(), locator)
                or unused_results(recipe.steps, locator))
    if problems:
        raise RecipeError(problems)
    return recipe


_STEP = TypeAdapter(Step)


@dataclass(frozen=True)
class _InvalidStep:
    """Stands for a step that failed validation: it reads nothing we can check, but its id still counts."""

    id: str | None

    def references(self) -> list[tuple[Path_, str]]:
        return []


def _valid_step(data: Any) -> StepBase | _InvalidStep:
    try:
        return _STEP.validate_python(data)
    except ValidationError:
        step_id = data.get("id") if isinstance(data, dict) else None
        return _InvalidStep(step_id if isinstance(step_id, str) else None)


def _output_references(output: Any) -> list[tuple[Path_, str]]:
    """The models a not-yet-valid recipe's `output` names, when that part is valid on its own."""
    try:
        return Output.model_validate(output).references() if isinstance(output, dict) else []
    except ValidationError:
        return []


def check_references(models: list[str], steps: list[StepBase | _InvalidStep], output: list[tuple[Path_, str]],
                     locator: Locator) -> list[Problem]:
    """Every step reads only models and earlier steps; ids are unique."""
    problems: list[Problem] = []
    known = list(models)
    for k, step in enumerate(steps):
        for path, ref in step.references():
            if ref not in known:
                full = ("steps", k, *path)
                problems.append(Problem(f"unknown model or step {ref!r}{_suggest(ref, known)}; known here: "
                                        f"{', '.join(known)}", locator.where(full), full))
        if step.id is not None:
            if step.id in known:
                full = ("steps", k, "id")
                problems.append(Problem(f"id {step.id!r} is already the name of a model or an earlier step",
                                        locator.where(full), full))
            else:
                known.append(step.id)
    for path, ref in output:
        if ref not in models:
            full = ("output", *path)
            problems.append(Problem(f"unknown model {ref!r}{_suggest(ref, models)}; the tokenizer comes from "
                                    f"one of: {', '.join(models)}", locator.where(full), full))
    return problems


def unused_results(steps: list[StepBase | _InvalidStep], locator: Locator) -> list[Problem]:
    """Every step but the last is read by a later one: the last step's result is the output, so any other
    result no step reads would be computed and then dropped without a word. Checked once the references are
    right (a step that names a later one is out of order, not unused)."""
    problems: list[Problem] = []
    for k, step in enumerate(steps[:-1]):
        later = steps[k + 1:]
        if isinstance(step, _InvalidStep):
            continue  # reported already
        if step.id is None:
            path = ("steps", k)
            problems.append(Problem("the result of this step is never used: only the last step's result is the "
                                    "output, and a later step reads an earlier one by its id (give it an id and name "
                                    "it in a later step, or remove the step)", locator.where(path), path))
        elif not any(isinstance(s, _InvalidStep) for s in later) and \
                all(ref != step.id for s in later for _, ref in s.references()):
            path = ("steps", k, "id")
            problems.append(Problem(f"no later step reads {step.id!r}, so this step's result is never used: only the "
                                    "last step's result is the output (name it in a later step, or remove this step)",
                                    locator.where(path), path))
    return problems


def recipe_json_schema() -> dict:
    """The JSON Schema of the recipe format, for editors."""
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "recipekit recipe"
    return schema


def _problem(err: dict, data: Any, locator: Locator) -> Problem:
    loc = tuple(err["loc"])
    path = _data_path(loc, data)
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        allowed = _keys_at(loc[:-1])
        key = str(path[-1])
        return Problem(f"unknown key {key!r}{_suggest(key, allowed)}"
                       + (f"; allowed: {', '.join(allowed)}" if allowed else ""),
                       locator.where(path, key=True), path)
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        key = str(ctx.get("discriminator", "'op'")).strip("'")
        valid = _discriminators()[key]
        if kind == "union_tag_not_found":
            what = "every step needs an 'op'" if key == "op" else f"a {key!r} is required"
            return Problem(f"{what}: one of {', '.join(valid)}", locator.where(path), path)
        tag, full = ctx.get("tag"), path + (key,)
        return Problem(f"unknown {key} {tag!r}{_suggest(str(tag), valid)}; valid {key}s: {', '.join(valid)}",
                       locator.where(full), full)
    if kind == "missing":
        return Problem(f"missing required key {str(path[-1])!r}", locator.where(path[:-1]), path)
    at_key = loc[-1:] == ("[key]",)  # pydantic's marker for a dict key that failed validation
    if kind == "string_pattern_mismatch" and ctx.get("pattern") == NAME_PATTERN:
        name = path[-1] if at_key else _value_at(data, path)
        return Problem(f"{name!r} is not a valid name: use letters, digits, '_', '-' and '.', "
                       f"starting with a letter or '_'", locator.where(path, key=at_key), path)
    message = err["msg"].removeprefix("Value error, ")
    if kind in ("int_type", "int_parsing", "string_type", "list_type", "dict_type", "model_type", "tuple_type",
                "bool_type", "float_type", "literal_error", "enum", "finite_number"):
        value = _value_at(data, path)
        message = f"{message[0].lower()}{message[1:]}, got {value!r}"
        if kind == "literal_error" and path and isinstance(value, str):
            message += _suggest(value, [v.strip("'") for v in ctx.get("expected", "").replace(" or ", ", ").split(", ")])
    return Problem(message, locator.where(path, key=at_key), path)


def _data_path(loc: Path_, data: Any) -> Path_:
    """Pydantic's location minus the union tags it inserts, i.e. a path into the data."""
    path: list[str | int] = []
    node = data
    discriminators = _discriminators()
    for part in loc:
        if isinstance(node, dict):
            if part not in node and any(node.get(key) == part for key in discriminators):
                continue  # the union tag pydantic inserts
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int):
            node = node[part] if part < len(node) else None
        elif isinstance(part, str):
            continue  # a union member's name or "[key]", not a data key
        else:
            node = None
        path.append(part)
    return tuple(path)


@cache
def _discriminators() -> dict[str, list[str]]:
    """The fields the schema's tagged unions are selected by (`op`, `select.metric`, ...) and their values, read
    from the schema, so an op with a tagged union of its own needs no change here."""
    found: dict[str, list[str]] = {}

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("discriminator"), dict):
                mapping = node["discriminator"]["mapping"]
                order = [member.get("$ref") for member in node.get("oneOf", [])]  # as the union declares them
                tags = found.setdefault(node["discriminator"]["propertyName"], [])
                tags += [t for t in sorted(mapping, key=lambda t: order.index(mapping[t]) if mapping[t] in order
                                           else len(order)) if t not in tags]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(recipe_json_schema())
    return found


def _value_at(data: Any, path: Path_) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _keys_at(loc: Path_) -> list[str]:
    """Keys the schema allows at a pydantic location, for suggestions."""
    schema = recipe_json_schema()
    defs = schema.get("$defs", {})

    def deref(node: dict) -> dict:
        while "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[-1]]
        return node

    node = deref(schema)
    for part in loc:
        if "discriminator" in node and isinstance(part, str):
            node = deref({"$ref": node["discriminator"]["mapping"][part]})
            continue
        if "anyOf" in node:
            branches = [deref(b) for b in node["anyOf"]]
            node = next((b for b in branches if ("items" in b) == isinstance(part, int)), branches[0])
        if isinstance(part, int):
            node = deref(node.get("items", {}))
        elif part in node.get("properties", {}):
            node = deref(node["properties"][part])
        elif isinstance(node.get("additionalProperties"), dict):
            node = deref(node["additionalProperties"])
    if "anyOf" in node:
        node = next((deref(b) for b in node["anyOf"] if "properties" in deref(b)), node)
    return list(node.get("properties", {}))


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
