"""Write `recipes/demo/heal-train.txt`: stories for healing a pruned demo model, none of them held out.

    python recipes/demo/make_heal_text.py

The same story grammar as the demo model's training corpus (train_demo_model.py), from a seed of its own; every
story of heldout.txt is left out, so healing never sees the text its perplexity is measured on.
"""
from __future__ import annotations

from pathlib import Path

from train_demo_model import HELDOUT, corpus

HEAL_SEED, HEAL_BYTES = 271828, 40_000
OUT = Path(__file__).resolve().parent / "heal-train.txt"


def main() -> None:
    held = frozenset(HELDOUT.read_text().strip().split("\n\n"))
    stories = corpus(HEAL_SEED, HEAL_BYTES, exclude=held)
    OUT.write_text("\n\n".join(stories) + "\n")
    print(f"{len(stories)} stories ({OUT.stat().st_size / 1e3:.1f} KB) in {OUT}")


if __name__ == "__main__":
    main()
