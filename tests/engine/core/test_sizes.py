from __future__ import annotations

import pytest

from recipekit.engine.core.sizes import human, parse_size


@pytest.mark.parametrize("text, expected", [
    ("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("1GiB", 2**30), ("1.5 GB", 1_500_000_000),
    ("64kib", 65536), ("123", 123), (4096, 4096), ("10B", 10),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["2XB", "GB", "-1GB", "", "1e9", 0, -5, True, "0.1B"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_human():
    assert human(999) == "999 B"
    assert human(1_500_000) == "1.5 MB"
    assert human(2 * 10**9) == "2.0 GB"
