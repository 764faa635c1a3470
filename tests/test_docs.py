"""The documented examples run as written."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_api_examples_run(tmp_path, monkeypatch, capsys):
    text = (ROOT / "docs" / "api.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, re.S))
    monkeypatch.chdir(ROOT)
    code = code.replace('"out/pruned"', repr(str(tmp_path / "pruned")))
    exec(compile(code, "docs/api.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "5 layers" in printed
    assert "layer 99 is out of range: 'm' has 8 layers (0..7)" in printed
    assert (tmp_path / "pruned" / "config.json").is_file()
