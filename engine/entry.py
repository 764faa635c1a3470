"""The `recipe` console script: a door that imports nothing heavy, so that Ctrl-C while Python is still loading
recipekit, pydantic or torch ends with one line and exit 130, never a traceback. Before it loads them, it starts
hashing the inputs a `recipe run` will lock (`run/prehash.py`), on the cores the loading leaves idle."""
from __future__ import annotations

import sys


def main() -> None:
    from recipekit.engine.run import prehash

    try:
        prehash.start(sys.argv[1:])
        from recipekit.engine.cli import main as run

        code = run()
    except KeyboardInterrupt:  # during start-up; once running, the CLI says it itself
        print("recipe: interrupted; no output was written", file=sys.stderr)
        code = 130
    finally:
        prehash.stop()  # a run that failed before its lock adopted the early hashing
    sys.exit(code)
