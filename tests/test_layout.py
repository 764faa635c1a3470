"""The dependency rules of the tree (docs/architecture.md, "One direction of dependency"), read from the source.

Every module's imports are parsed with `ast`: names imported under `if TYPE_CHECKING:` do not count (they never
run). A test per rule, and one that proves the checker sees a violation.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"engine": "recipekit.engine", "ops": "recipekit.ops"}
# where torch may be imported at module level: the modules that compute tensors
TORCH_MODULES = ("recipekit.engine.run.evaluate", "recipekit.engine.forward.", "recipekit.engine.measure.",
                 "recipekit.engine.modeling.", "recipekit.engine.train.")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the absolute name imported
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [PACKAGES[folder], *rest]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool = False) -> list[Import]:
    """Every import that runs, as absolute names (`from x import y` gives `x.y`, so submodules count)."""
    found: list[Import] = []
    package = module if is_package else module.rpartition(".")[0]

    def absolute(level: int, name: str | None) -> str:
        if level == 0:
            return name or ""
        base = package.split(".")
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([name] if name else []))

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other, in_function)
                continue
            if isinstance(child, ast.Import):
                found.extend(Import(module, alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                origin = absolute(child.level, child.module)
                found.extend(Import(module, f"{origin}.{alias.name}", child.lineno, in_function)
                             for alias in child.names)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(source), False)
    return found


def all_imports() -> list[Import]:
    found = []
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            found += imports_of(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")
    return found


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def ops_rule(imp: Import) -> str | None:
    """Ops import only engine's core and errors."""
    if under(imp.module, "recipekit.ops") and under(imp.target, "recipekit.engine"):
        if not (under(imp.target, "recipekit.engine.core") or under(imp.target, "recipekit.engine.errors")):
            return "an op may import only recipekit.engine.core and recipekit.engine.errors"
    return None


def core_rule(imp: Import) -> str | None:
    """core is the bottom: it imports no op and no other engine subpackage."""
    if under(imp.module, "recipekit.engine.core"):
        if under(imp.target, "recipekit.ops"):
            return "core may not import an op"
        if under(imp.target, "recipekit.engine") and not (
                under(imp.target, "recipekit.engine.core") or under(imp.target, "recipekit.engine.errors")):
            return "core may import only core and errors"
    return None


def registry_rule(imp: Import) -> str | None:
    """The engine reaches ops only through the registry."""
    if under(imp.module, "recipekit.engine") and under(imp.target, "recipekit.ops"):
        if not under(imp.target, "recipekit.ops.registry"):
            return "the engine reaches ops only through recipekit.ops.registry"
    return None


def torch_rule(imp: Import) -> str | None:
    """torch at module level only where tensors are computed; elsewhere only inside (kernel) functions."""
    if under(imp.target, "torch") and not imp.in_function:
        if not any(imp.module == m or (m.endswith(".") and imp.module.startswith(m)) for m in TORCH_MODULES):
            return "torch is imported at module level outside run.evaluate, forward/, measure/, modeling/ and train/"
    return None


# what the console script loads before recipekit, pydantic or torch, to start hashing early (run/prehash.py)
EARLY_MODULES = ("recipekit.engine.entry", "recipekit.engine.run.prehash", "recipekit.engine.run.hash_cache",
                 "recipekit.engine.run.digest")


def early_rule(imp: Import) -> str | None:
    """The early hashing imports, at module level, only the standard library and the other early modules."""
    if imp.module in EARLY_MODULES and not imp.in_function:
        if imp.target.split(".")[0] not in sys.stdlib_module_names | {"__future__"} and \
                not any(under(imp.target, m) for m in EARLY_MODULES):
            return "an early module imports only the standard library and the other early modules"
    return None


RULES = [ops_rule, core_rule, registry_rule, torch_rule, early_rule]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_the_tree_keeps_the_rule(rule) -> None:
    imports = all_imports()
    assert len(imports) > 200  # the parser found the tree
    violations = [f"{imp.module}:{imp.line} imports {imp.target}: {why}"
                  for imp in imports if (why := rule(imp)) is not None]
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize("module, source, rule", [
    ("recipekit.ops.moe.stack_experts", "from recipekit.engine.measure.lineage import RELATED\n", ops_rule),
    ("recipekit.ops.layers.drop_layers", "from recipekit.engine.run import build\n", ops_rule),
    ("recipekit.engine.core.graph", "from recipekit.engine.io.source import ModelSource\n", core_rule),
    ("recipekit.engine.core.layers", "from ..measure import probe\n", core_rule),
    ("recipekit.engine.core.layers", "from recipekit.ops import registry\n", core_rule),
    ("recipekit.engine.run.build", "from recipekit.ops.layers.drop_layers import DropLayers\n", registry_rule),
    ("recipekit.engine.run.plan", "import torch\n", torch_rule),
    ("recipekit.ops.weights.low_rank", "import torch.nn.functional as F\n", torch_rule),
    ("recipekit.engine.run.prehash", "import yaml\n", early_rule),
    ("recipekit.engine.run.hash_cache", "from recipekit.engine.run.plan import Plan\n", early_rule),
])
def test_the_checker_sees_a_violation(module: str, source: str, rule) -> None:
    (imp,) = imports_of(source, module)
    assert rule(imp) is not None, imp


@pytest.mark.parametrize("module, source, rule", [
    ("recipekit.engine.core.graph", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                    "    from recipekit.engine.io.source import ModelSource\n", core_rule),
    ("recipekit.ops.weights.low_rank", "def kernel(x):\n    import torch\n", torch_rule),
    ("recipekit.engine.forward.llama", "import torch\n", torch_rule),
    ("recipekit.engine.run.build", "from recipekit.ops.registry import KERNELS\n", registry_rule),
    ("recipekit.engine.run.prehash", "def start():\n    import yaml\n", early_rule),
    ("recipekit.engine.run.prehash", "from recipekit.engine.run.digest import blocks\n", early_rule),
])
def test_the_checker_allows_what_the_rules_allow(module: str, source: str, rule) -> None:
    assert all(rule(imp) is None for imp in imports_of(source, module))


def test_every_package_of_the_tree_is_installed() -> None:
    """A regular install holds only what pyproject lists: a package left out works from the checkout (and in an
    editable install) and fails to import for everyone who pip-installs recipekit."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    found = {"recipekit"} | {module_name(init) for folder in PACKAGES for init in (ROOT / folder).rglob("__init__.py")
                             if "toplevel" not in init.parts}  # engine/toplevel is the `recipekit` package itself
    assert found == listed, f"not in pyproject: {sorted(found - listed)}; not in the tree: {sorted(listed - found)}"
