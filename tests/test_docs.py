"""The documented examples run as written."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

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


def test_a_documented_recipe_that_names_its_file_is_that_file():
    """A yaml block whose first line runs a file under recipes/ shows that file's content (the test of recipes/
    runs the file, so the block is checked too)."""
    shown = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"^```yaml\n(.*?)^```", doc.read_text(), re.DOTALL | re.MULTILINE):
            named = re.match(r"# recipe run (recipes/\S+\.ya?ml)", block)
            if named:
                shown.append(named[1])
                assert yaml.safe_load(block) == yaml.safe_load((ROOT / named[1]).read_text()), (doc.name, named[1])
    assert "recipes/demo/mergekit-passthrough.yaml" in shown


def test_documented_commands_write_nothing_untracked_into_the_repo():
    """Run from the repository root, as the demo is, a documented command writes outside the repository or under
    out/, which git ignores (`-o OUT` and other capitals are placeholders)."""
    assert "/out/" in (ROOT / ".gitignore").read_text().split()
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "recipes").rglob("*.yaml"))]
    written = []
    for path in texts:
        for line in path.read_text().splitlines():
            command = line.lstrip("# ")
            if command.startswith("recipe "):
                written += [(path.name, target) for target in re.findall(r"(?:>|-o|--plot)\s+(\S+)", command)]
    assert ("README.md", "~/recipe.schema.json") in written
    for name, target in written:
        assert target.split(".")[0].isupper() or target.startswith(("/", "~", "out/")), (name, target)
