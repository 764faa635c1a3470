from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def work(tmp_path: Path, llama: Path) -> Path:
    """tmp_path with a copy of the 6-layer llama fixture at ./llama (the fixture itself is never touched)."""
    shutil.copytree(llama, tmp_path / "llama")
    return tmp_path
