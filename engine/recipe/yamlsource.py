"""Safe YAML reading that remembers where every value came from.

PyYAML's composer builds a node tree without constructing any object; this
module turns that tree into plain dicts, lists and scalars itself, so a tag
such as `!!python/object` can never run code, and it records the line and
column of every value and mapping key under its path, e.g.
`("steps", 0, "layers", 2)`. `Locator` answers "where in the file is this
path", which is how errors from any later phase point at the YAML.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recipekit.engine.errors import Path_, Problem, RecipeError

_SCALAR_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"  # kept as the text the user wrote
_MAX_NODES = 100_000  # aliases can make a tiny file expand exponentially
_MAX_DEPTH = 64  # levels of nested mappings and lists; a recipe needs about six
_MAX_EVENTS = 20_000  # parser events (values, mapping and list starts and ends) in the text itself


@dataclass
class Locator:
    """Maps paths inside a parsed document to `file:line:col` strings."""

    filename: str
    values: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path_, tuple[int, int]] = field(default_factory=dict)

    def where(self, path: Path_, *, key: bool = False) -> str | None:
        """Location of `path` (its key when `key`), else of its nearest located parent."""
        if key and path in self.keys:
            return self.fmt(self.keys[path])
        for n in range(len(path), -1, -1):
            mark = self.values.get(path[:n])
            if mark is not None:
                return self.fmt(mark)
        return self.filename or None

    def fmt(self, mark: tuple[int, int]) -> str:
        line, col = mark
        return f"{self.filename}:{line}:{col}" if self.filename else f"{line}:{col}"


def load_yaml(text: str | bytes, filename: str = "") -> tuple[Any, Locator]:
    """Parse one YAML document safely; raise `RecipeError` with its location if it is not."""
    locator = Locator(filename)
    if isinstance(text, bytes):
        if b"\x00" in text:
            raise RecipeError(Problem("this is a binary file, not a YAML recipe", filename or None))
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecipeError(Problem(f"not UTF-8 text (byte {e.start}): a recipe is a YAML text file", filename or None)) from None
    if not text.strip():
        raise RecipeError(Problem("the recipe is empty", filename or None))
    try:
        _count_events(text, filename)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise RecipeError(Problem(f"the document is nested more than {_MAX_DEPTH} levels deep: a recipe is a few "
                                  "levels of mappings and lists", filename or None)) from None
    except yaml.MarkedYAMLError as e:
        raise RecipeError(_yaml_problem(e, text, locator)) from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow: say where it is
        line = text.count("\n", 0, e.position) + 1
        col = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        raise RecipeError(Problem(f"the control character U+{e.character:04X} is not allowed in a recipe; delete "
                                  "it (or write it as an escape inside a double-quoted string)",
                                  locator.fmt((line, col)))) from None
    except yaml.YAMLError as e:  # other unmarked reader errors
        raise RecipeError(Problem(f"not valid YAML: {e}", filename or None)) from None
    if node is None:
        raise RecipeError(Problem("the recipe is empty", filename or None))
    builder = _Builder(locator)
    data = builder.build(node, ())
    if builder.problems:
        raise RecipeError(builder.problems)
    return data, locator


def _count_events(text: str, filename: str) -> None:
    """Refuse a document with more values than any recipe has before building it: composing a megabyte of list
    entries takes seconds and hundreds of MB; counting parser events stops at the limit."""
    for count, _ in enumerate(yaml.parse(text, Loader=yaml.SafeLoader)):
        if count > _MAX_EVENTS:
            raise RecipeError(Problem(f"the document holds more than {_MAX_EVENTS} values: no recipe is this large "
                                      "(a list of layers is a few ranges, [[4, 28]], not every index)",
                                      filename or None))


def _yaml_problem(e: yaml.MarkedYAMLError, text: str, locator: Locator) -> Problem:
    mark = e.problem_mark or e.context_mark
    lines = text.splitlines()
    if e.context_mark is not None and (mark.line >= len(lines) or mark.index >= len(text.rstrip())):
        # found only at the end of the file: the construct left open is where the mistake is
        mark = e.context_mark
    where = locator.fmt((mark.line + 1, mark.column + 1)) if mark else locator.filename or None
    if mark is not None:
        line = lines[mark.line] if mark.line < len(lines) else ""
        indent = line[: len(line) - len(line.lstrip(" \t"))]
        if "\t" in indent:
            col = indent.index("\t") + 1
            return Problem("a tab is used for indentation; YAML indents with spaces only",
                           locator.fmt((mark.line + 1, col)))
    detail = e.problem or "invalid YAML"
    if e.context:
        detail = f"{e.context}: {detail}"
    return Problem(f"YAML syntax error: {detail}", where)


class _Builder:
    def __init__(self, locator: Locator):
        self.locator = locator
        self.problems: list[Problem] = []
        self.count = 0
        self._scalars = yaml.constructor.SafeConstructor()
        self._open: set[int] = set()  # collections being built: an alias to one of them is a cycle

    def build(self, node: yaml.Node, path: Path_) -> Any:
        if len(path) > _MAX_DEPTH:
            if not any(p.message.startswith("the document is nested") for p in self.problems):
                self.problems.append(Problem(f"the document is nested more than {_MAX_DEPTH} levels deep: a recipe "
                                             "is a few levels of mappings and lists", self._where(node)))
            return None
        if id(node) in self._open:
            self.problems.append(Problem("this alias refers to the structure it is inside (a recursive YAML "
                                         "alias)", self._where(node)))
            return None
        if isinstance(node, yaml.CollectionNode):
            self._open.add(id(node))
            try:
                return self._build(node, path)
            finally:
                self._open.discard(id(node))
        return self._build(node, path)

    def _build(self, node: yaml.Node, path: Path_) -> Any:
        self.count += 1
        if self.count > _MAX_NODES:
            if self.count == _MAX_NODES + 1:
                self.problems.append(Problem(f"the document expands to more than {_MAX_NODES} values (alias bomb?)",
                                             self._where(node)))
            return None
        self.locator.values.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != "tag:yaml.org,2002:seq":
                return self._bad_tag(node)
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        if node.tag == _TIMESTAMP_TAG:
            return node.value
        if node.tag not in _SCALAR_TAGS:
            return self._bad_tag(node)
        return self._scalars.construct_object(node)

    def _mapping(self, node: yaml.MappingNode, path: Path_) -> dict:
        if node.tag != "tag:yaml.org,2002:map":
            return self._bad_tag(node)
        out: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.problems.append(Problem("YAML merge keys (<<) are not supported in recipes", self._where(key_node)))
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in _SCALAR_TAGS:
                self.problems.append(Problem("a mapping key must be a plain string", self._where(key_node)))
                continue
            key = self._scalars.construct_object(key_node)
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                key = str(key_node.value)
            if key in out:
                self.problems.append(Problem(f"duplicate key {key!r}", self._where(key_node)))
                continue
            self.locator.keys[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = self.build(value_node, path + (key,))
        return out

    def _bad_tag(self, node: yaml.Node) -> None:
        self.problems.append(Problem(
            f"YAML tag {node.tag!r} is not allowed: a recipe is plain data (strings, numbers, lists, mappings)",
            self._where(node)))
        return None

    def _where(self, node: yaml.Node) -> str:
        return self.locator.fmt((node.start_mark.line + 1, node.start_mark.column + 1))


MAX_RECIPE_BYTES = 2**20  # a recipe is a page of YAML; a megabyte of it is not one


def read_recipe_text(path: Path, *, max_bytes: int | None = None) -> tuple[Any, Locator, str]:
    """Read and parse a recipe file; returns data, locator and the verbatim text.

    At most `max_bytes` (default `MAX_RECIPE_BYTES`) are read, so `/dev/zero` or a multi-gigabyte file is refused
    at once instead of read."""
    limit = MAX_RECIPE_BYTES if max_bytes is None else max_bytes
    try:
        with path.open("rb") as f:
            raw = f.read(limit + 1)
        if len(raw) > limit:
            what = "a shared recipe" if max_bytes is not None else "a recipe"
            raise RecipeError(Problem(f"the file is larger than {limit} bytes, the most {what} may have: is it a "
                                      "recipe?", str(path)))
    except IsADirectoryError:
        raise RecipeError(Problem("is a directory, not a recipe file", str(path))) from None
    except OSError as e:
        raise RecipeError(Problem(f"cannot read the recipe: {e.strerror}", str(path))) from None
    data, locator = load_yaml(raw, str(path))
    return data, locator, raw.decode("utf-8")
