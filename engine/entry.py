"""The `recipe` console script: a door that imports nothing heavy, so that Ctrl-C while Python is still loading
recipekit, pydantic or torch ends with one line and exit 130, never a traceback."""
from __future__ import annotations

import sys


def main() -> None:
    try:
        from recipekit.engine.cli import main as run

        code = run()
    except KeyboardInterrupt:  # during start-up; once running, the CLI says it itself
        print("recipe: interrupted; no output was written", file=sys.stderr)
        code = 130
    sys.exit(code)
