"""Counted nouns agree with their count; lists read as a sentence."""
from __future__ import annotations

from recipekit.engine.core.words import counted, listed


def test_one_is_singular_every_other_count_plural():
    assert counted(1, "matrix", "matrices") == "1 matrix"
    assert [counted(n, "matrix", "matrices") for n in (0, 2, 12)] == ["0 matrices", "2 matrices", "12 matrices"]
    assert (counted(1, "layer"), counted(3, "layer")) == ("1 layer", "3 layers")


def test_a_list_joins_its_last_item_with_and():
    assert [listed(items) for items in (["a"], ["a", "b"], ["a", "b", "c"])] == ["a", "a and b", "a, b and c"]
