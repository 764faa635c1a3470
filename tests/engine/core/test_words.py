"""Counted nouns agree with their count."""
from __future__ import annotations

from recipekit.engine.core.words import counted


def test_one_is_singular_every_other_count_plural():
    assert counted(1, "matrix", "matrices") == "1 matrix"
    assert [counted(n, "matrix", "matrices") for n in (0, 2, 12)] == ["0 matrices", "2 matrices", "12 matrices"]
    assert (counted(1, "layer"), counted(3, "layer")) == ("1 layer", "3 layers")
