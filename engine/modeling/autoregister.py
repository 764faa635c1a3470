"""Register recipekit's model classes with transformers' Auto classes when transformers is imported.

`import recipekit` calls `register_with_transformers()`. Importing transformers imports torch, and
`import recipekit.engine` (the CLI, validate, plan) must stay free of both, so this module imports neither:
when transformers is already imported it registers at once; otherwise it puts a finder at the front of
`sys.meta_path` that answers for the one name `transformers` by asking the other finders, and runs the
registration right after that module has executed (then it is gone). Without transformers nothing happens.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

_NAME = "transformers"


def register_with_transformers() -> None:
    """Register now if transformers is imported, else as soon as it is."""
    if _NAME in sys.modules:
        _register()
    elif not any(isinstance(finder, _WatchForTransformers) for finder in sys.meta_path):
        sys.meta_path.insert(0, _WatchForTransformers())


def _register() -> None:
    """Import the classes, which registers them (a plain import: when a class import from `families` is what
    imported transformers, that module is half-run here, and registers when it finishes)."""
    try:
        import recipekit.engine.modeling.families  # noqa: F401
    except ImportError as e:  # a transformers without these families' classes: it must still import
        warnings.warn(f"recipekit cannot register its model classes with this transformers ({e}); outputs of "
                      "add_modules will not load", stacklevel=2)


class _WatchForTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asked for transformers, it lets the other finders find it and wraps their loader.
    It stays until transformers actually runs: a mere `find_spec("transformers")` (libraries ask it to learn
    whether transformers is installed) must not use it up."""

    def __init__(self) -> None:
        self._asking = False  # while it asks the other finders, it is one of them

    def find_spec(self, name, path=None, target=None):
        if name != _NAME or self._asking:
            return None
        self._asking = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._asking = False
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader, self)
        return spec


class _ThenRegister(importlib.abc.Loader):
    """transformers' own loader, followed by the registration."""

    def __init__(self, loader: importlib.abc.Loader, watch: _WatchForTransformers):
        self.loader, self.watch = loader, watch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        if self.watch in sys.meta_path:
            sys.meta_path.remove(self.watch)
        module.__spec__.loader = module.__loader__ = self.loader  # transformers sees its own loader
        self.loader.exec_module(module)
        _register()
