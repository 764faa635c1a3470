"""Bad inputs: every user mistake is exit 2 and one located line per problem, never a traceback or an output.

Each case is a mistake real users make. The CLI runs in-process; for every case
we check (1) exit code 2, (2) each stderr line is the promised one-liner:
`recipe.yaml:LINE:COL: path: message` where the mistake is in the recipe (the
line and column are computed from the recipe text with `mark`), or the model
file / output path named for problems outside the recipe, (3) no traceback, and
(4) that nothing was written: no OUT, no hidden `.OUT.recipekit-partial-*`
sibling, no other change under tmp_path.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from recipekit.engine.cli import main

from tests.tiny import make_model

COMMANDS = ["run", "validate", "plan"]


# --------------------------------------------------------------------------- helpers


def yaml_text(text: str) -> str:
    """A recipe as written in a case: dedented, `<TAB>` standing for a tab character."""
    return textwrap.dedent(text).lstrip("\n").replace("<TAB>", "\t")


def mark(text: str, marked: str) -> str:
    """`line:col` (1-based) of the character after `^` in `marked`, a fragment occurring once in `text`."""
    assert marked.count("^") == 1, marked
    fragment = marked.replace("^", "")
    assert text.count(fragment) == 1, f"{fragment!r} must occur exactly once in the recipe:\n{text}"
    index = text.index(fragment) + marked.index("^")
    line = text.count("\n", 0, index) + 1
    col = index - (text.rfind("\n", 0, index) + 1) + 1
    return f"{line}:{col}"


@dataclass(frozen=True)
class Line:
    """One expected stderr line: located at `marker` (see `mark`), naming `path`, containing `words`."""

    marker: str
    path: str | None
    words: tuple[str, ...]

    def prefix(self, recipe: Path, text: str) -> str:
        head = f"{recipe}:{mark(text, self.marker)}: "
        return head + (f"{self.path}: " if self.path else "")


def line(marker: str, path: str | None, *words: str) -> Line:
    return Line(marker, path, words)


@dataclass(frozen=True)
class Result:
    rc: int
    err: str
    out: str


def cli(capsys, *argv: object) -> Result:
    capsys.readouterr()  # forget anything printed before
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return Result(rc, captured.err, captured.out)


def invoke(capsys, command: str, recipe: Path, out: Path, *extra: str) -> Result:
    if command == "run":
        return cli(capsys, "run", recipe, "-o", out, *extra)
    return cli(capsys, command, recipe, *extra)


def snapshot(root: Path) -> list[tuple[str, int, int]]:
    """Every path under root with its size and mtime, to prove a command changed nothing."""
    entries = []
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        entries.append((str(p.relative_to(root)), st.st_size if p.is_file() else -1, st.st_mtime_ns))
    return entries


def assert_refused(result: Result, expected: list[tuple[str, tuple[str, ...]]]) -> None:
    """Exit 2, no traceback, nothing on stdout, and exactly one stderr line per expected (prefix, words)."""
    report = f"rc={result.rc}\nstderr:\n{result.err}stdout:\n{result.out}"
    assert "Traceback" not in result.err and "Traceback" not in result.out, report
    assert "recipe: failed" not in result.err, report
    assert result.rc == 2, report
    assert result.out == "", report
    lines = result.err.splitlines()
    assert len(lines) == len(expected), f"expected {len(expected)} line(s)\n{report}"
    unmatched = list(lines)
    for prefix, words in expected:
        hits = [ln for ln in unmatched if ln.startswith(prefix) and all(w in ln for w in words)]
        assert hits, f"no stderr line starts with {prefix!r} and contains {list(words)}\n{report}"
        unmatched.remove(hits[0])


def assert_no_output(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    leftovers = sorted(p.name for p in out.parent.glob(f".{out.name}.recipekit-*"))
    assert not leftovers, f"hidden leftovers beside {out}: {leftovers}"


@pytest.fixture
def work(tmp_path: Path, llama: Path) -> Path:
    """tmp_path with a copy of the 6-layer llama fixture at ./llama (the fixture itself is never touched)."""
    shutil.copytree(llama, tmp_path / "llama")
    return tmp_path


# --------------------------------------------------------------------------- mistakes in the recipe text

# id -> (recipe text, expected lines). Models are at ./llama (6 layers) beside the recipe.
RECIPE_CASES: dict[str, tuple[str, list[Line]]] = {
    "yaml-syntax-error": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a: b
            layers: [1]
        """,
        [line("model: a^: b", None, "YAML syntax error", "mapping values are not allowed")],
    ),
    "yaml-misindented-key": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
             layers: [1]
        """,
        [line("     layers^: [1]", None, "YAML syntax error")],
    ),
    # The parser notices these only at the end of the file; the mistake is where the construct began.
    "yaml-unclosed-bracket": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1, 2
        """,
        [line("layers: ^[1, 2", None, "YAML syntax error")],
    ),
    "yaml-no-space-after-colon": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers:[1]
        """,
        [line("^layers:[1]", None, "YAML syntax error")],
    ),
    "yaml-unterminated-quote": (
        """
        recipe: 1
        description: "llama without layer 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
        """,
        [line('description: ^"llama', None, "YAML syntax error")],
    ),
    "tab-indenting-a-model": (
        """
        recipe: 1
        models:
        <TAB>a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
        """,
        [line("^\ta: ./llama", None, "tab", "spaces")],
    ),
    "tab-after-spaces-in-a-step": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
          <TAB>layers: [1]
        """,
        [line("  ^\tlayers: [1]", None, "tab", "spaces")],
    ),
    "python-object-tag": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: !!python/object/apply:os.system ["echo pwned"]
            layers: [1]
        """,
        [line("model: ^!!python", None, "python/object/apply:os.system", "not allowed")],
    ),
    "yaml-merge-key": (
        """
        recipe: 1
        models:
          a: ./llama
        common: &common
          op: drop_layers
          model: a
        steps:
          - <<: *common
            layers: [1]
        """,
        [line("- ^<<: *common", None, "merge keys")],
    ),
    "duplicate-yaml-key": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
            layers: [2]
        """,
        [line("^layers: [2]", None, "duplicate key 'layers'")],
    ),
    "two-yaml-documents": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
        ---
        recipe: 1
        """,
        [line("^---", None, "YAML syntax error", "single document")],
    ),
    "recipe-is-a-list": (
        """
        - recipe: 1
        - models:
            a: ./llama
        """,
        [line("^- recipe: 1", None, "mapping", "got list")],
    ),
    "unsupported-version": (
        """
        recipe: 2
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
        """,
        [line("recipe: ^2", "recipe", "unsupported recipe version 2", "version 1")],
    ),
    "missing-version": (
        """
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
        """,
        [line("^models:", "recipe", "missing required key 'recipe'")],
    ),
    "unknown-op": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layer
            model: a
            layers: [1]
        """,
        [line("op: ^drop_layer", "steps[0].op", "unknown op 'drop_layer'", "did you mean 'drop_layers'?",
              "slice_layers")],
    ),
    "step-without-op": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - model: a
            layers: [1]
        """,
        [line("- ^model: a", "steps[0]", "needs an 'op'", "drop_layers")],
    ),
    "misspelt-step-key": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layer: [1]
        """,
        [line("^layer: [1]", "steps[0].layer", "unknown key 'layer'", "did you mean 'layers'?")],
    ),
    "misspelt-top-level-key": (
        """
        recipe: 1
        models:
          a: ./llama
        step:
          - op: drop_layers
            model: a
            layers: [1]
        """,
        [line("^step:", "step", "unknown key 'step'", "did you mean 'steps'?"),
         line("^recipe: 1", "steps", "missing required key 'steps'")],
    ),
    "misspelt-output-key": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
        output:
          dtyp: bfloat16
        """,
        [line("^dtyp: bfloat16", "output.dtyp", "unknown key 'dtyp'", "did you mean 'dtype'?")],
    ),
    "layers-wrong-type": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: "three"
        """,
        [line('layers: ^"three"', "steps[0].layers", "list", "'three'")],
    ),
    "steps-not-a-list": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          op: drop_layers
          model: a
          layers: [1]
        """,
        [line("^op: drop_layers", "steps", "list")],
    ),
    "no-steps": (
        """
        recipe: 1
        models:
          a: ./llama
        steps: []
        """,
        [line("steps: ^[]", "steps", "at least 1")],
    ),
    "model-name-with-space": (
        """
        recipe: 1
        models:
          my model: ./llama
        steps:
          - op: drop_layers
            model: my model
            layers: [1]
        """,
        # the mistake is the name, i.e. the key, not the path after it
        [line("^my model: ./llama", "models.my model")],
    ),
    "negative-layer-index": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1, -1]
        """,
        [line("layers: [1, ^-1]", "steps[0].layers[1]", "count from 0", "-1")],
    ),
    "reversed-layer-range": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [[3, 1]]
        """,
        [line("layers: [^[3, 1]]", "steps[0].layers[0]", "start < end", "[3, 1]")],
    ),
    "layer-index-out-of-range": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1, 6]
        """,
        [line("layers: [1, ^6]", "steps[0].layers[1]", "layer 6 is out of range", "has 6 layers")],
    ),
    "layer-out-of-range-of-a-step": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            id: pruned
            model: a
            layers: [1]
          - op: drop_layers
            model: pruned
            layers: [0, 5]
        """,
        [line("layers: [0, ^5]", "steps[1].layers[1]", "layer 5 is out of range", "'pruned' has 5 layers")],
    ),
    "drop-leaves-no-layers": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [[0, 6]]
        """,
        [line("layers: ^[[0, 6]]", "steps[0].layers", "leaves none", "6 layers")],
    ),
    "slice-beyond-the-model": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: slice_layers
            slices:
              - model: a
                range: [0, 4]
              - model: a
                range: [2, 8]
        """,
        [line("range: ^[2, 8]", "steps[0].slices[1].range", "[2, 8]", "out of range", "6 layers")],
    ),
    "slice-range-of-one-number": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: slice_layers
            slices:
              - model: a
                range: [2]
        """,
        # a list of one number is not a mapping with a missing key '1': say what a range is
        [line("range: ^[2]", "steps[0].slices[0].range", "start", "end")],
    ),
    "unknown-model-reference": (
        """
        recipe: 1
        models:
          base: ./llama
        steps:
          - op: drop_layers
            model: bsae
            layers: [1]
        """,
        [line("model: ^bsae", "steps[0].model", "unknown model or step 'bsae'", "did you mean 'base'?")],
    ),
    "reference-to-a-later-step": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: slice_layers
            slices:
              - model: pruned
                range: [0, 2]
          - op: drop_layers
            id: pruned
            model: a
            layers: [1]
        """,
        [line("- model: ^pruned", "steps[0].slices[0].model", "unknown model or step 'pruned'")],
    ),
    "duplicate-step-id": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            id: pruned
            model: a
            layers: [1]
          - op: drop_layers
            id: pruned
            model: pruned
            layers: [2]
        """,
        [line("  - op: drop_layers\n    id: ^pruned\n    model: pruned", "steps[1].id", "'pruned'", "already")],
    ),
    "step-id-shadows-a-model": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            id: a
            model: a
            layers: [1]
        """,
        [line("id: ^a", "steps[0].id", "'a'", "already the name of a model")],
    ),
    "tokenizer-from-a-step": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            id: pruned
            model: a
            layers: [1]
        output:
          tokenizer: pruned
        """,
        [line("tokenizer: ^pruned", "output.tokenizer", "unknown model 'pruned'", "one of: a")],
    ),
    "unknown-output-dtype": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
        output:
          dtype: bf16
        """,
        [line("dtype: ^bf16", "output.dtype", "'bf16'", "did you mean 'bfloat16'?")],
    ),
    "unparsable-shard-size": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
        output:
          shard_size: 2XB
        """,
        [line("shard_size: ^2XB", "output.shard_size", "'2XB'", "2GB")],
    ),
    "zero-shard-size": (
        """
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: a
            layers: [1]
        output:
          shard_size: 0
        """,
        [line("shard_size: ^0", "output.shard_size", "positive")],
    ),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_recipe_mistake(work: Path, capsys, case: str, command: str) -> None:
    template, lines = RECIPE_CASES[case]
    assert_recipe_refused(work, capsys, command, yaml_text(template), lines)


def assert_recipe_refused(work: Path, capsys, command: str, text: str, lines: list[Line]) -> None:
    """Write `text` as work/recipe.yaml, run `command` on it: refused with `lines`, and nothing written."""
    recipe = work / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")
    out = work / "OUT"
    before = snapshot(work)

    result = invoke(capsys, command, recipe, out)

    assert_refused(result, [(ln.prefix(recipe, text), ln.words) for ln in lines])
    assert_no_output(out)
    assert snapshot(work) == before


@pytest.mark.parametrize("case", ["yaml-syntax-error", "tab-indenting-a-model", "python-object-tag", "unknown-op",
                                  "misspelt-step-key", "layers-wrong-type", "unsupported-version",
                                  "unknown-model-reference", "duplicate-step-id", "unknown-output-dtype"])
def test_recipe_mistake_schema_only(tmp_path: Path, capsys, case: str) -> None:
    """`validate --schema-only` opens no model, so the recipe text alone must be refused the same way."""
    template, lines = RECIPE_CASES[case]
    text = yaml_text(template)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")

    result = cli(capsys, "validate", "--schema-only", recipe)

    assert_refused(result, [(ln.prefix(recipe, text), ln.words) for ln in lines])


# --------------------------------------------------------------------------- the recipe file itself


RECIPE_FILE_CASES = {
    # id -> (what to put at the recipe path: bytes, "missing" or "directory"; words of the message)
    "empty-file": (b"", ("the recipe is empty",)),
    "only-comments": (b"# TODO: write the recipe\n\n", ("the recipe is empty",)),
    "binary-file": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ("binary file", "not a YAML recipe")),
    "latin-1-text": ("recipe: 1\ndescription: llama sans la couche \xe9\n".encode("latin-1"), ("not UTF-8",)),
    "recipe-file-missing": ("missing", ("cannot read the recipe", "No such file")),
    "recipe-is-a-directory": ("directory", ("is a directory",)),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(RECIPE_FILE_CASES))
def test_unusable_recipe_file(tmp_path: Path, capsys, case: str, command: str) -> None:
    content, words = RECIPE_FILE_CASES[case]
    recipe = tmp_path / "recipe.yaml"
    if content == "directory":
        recipe.mkdir()
    elif content != "missing":
        recipe.write_bytes(content)
    out = tmp_path / "OUT"
    before = snapshot(tmp_path)

    result = invoke(capsys, command, recipe, out)

    # no line or column to give: the file itself is named
    assert_refused(result, [(f"{recipe}: ", words)])
    assert_no_output(out)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- broken input models

MODEL_RECIPE = yaml_text("""
    recipe: 1
    models:
      a: ./model
    steps:
      - op: drop_layers
        model: a
        layers: [1]
    """)
MODEL_ENTRY = "a: ^./model"  # where every model problem is located in the recipe


def rewrite_header(file: Path, change: Callable[[dict], None]) -> None:
    """Edit a safetensors header in place (the data buffer stays as it is)."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    file.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def tensors_by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _missing_directory(m: Path) -> list[str]:
    shutil.rmtree(m)
    return ["model directory './model' not found", str(m.resolve())]


def _model_path_is_a_file(m: Path) -> list[str]:
    shutil.rmtree(m)
    m.write_text("not a model")
    return ["is a file", "expected a model directory"]


def _no_config(m: Path) -> list[str]:
    (m / "config.json").unlink()
    return ["no config.json", str(m.resolve())]


def _config_not_json(m: Path) -> list[str]:
    (m / "config.json").write_text('{"model_type": "llama",', encoding="utf-8")
    return ["cannot read config.json"]


def _only_pickle_weights(m: Path) -> list[str]:
    (m / "model.safetensors").rename(m / "pytorch_model.bin")
    return ["neither model.safetensors nor model.safetensors.index.json", "pytorch_model.bin", "never pickles"]


def _layer_count_disagrees(m: Path) -> list[str]:
    config = json.loads((m / "config.json").read_text())
    config["num_hidden_layers"] = 8
    (m / "config.json").write_text(json.dumps(config))
    return ["num_hidden_layers = 8", "6 layers"]


def _missing_shard(m: Path) -> list[str]:
    (m / "model-00003-of-00005.safetensors").unlink()
    return ["'model-00003-of-00005.safetensors'", "model.safetensors.index.json", "missing"]


def _index_points_outside(m: Path) -> list[str]:
    index = json.loads((m / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../other/model.safetensors"
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    return ["'../other/model.safetensors'", "outside the model directory"]


def _index_names_wrong_shard(m: Path) -> list[str]:
    index = json.loads((m / "model.safetensors.index.json").read_text())
    real = index["weight_map"]["model.norm.weight"]
    wrong = next(s for s in sorted(set(index["weight_map"].values())) if s != real)
    index["weight_map"]["model.norm.weight"] = wrong
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    return ["'model.norm.weight'", f"'{wrong}'", "does not hold it"]


def _truncated(m: Path) -> list[str]:
    file = m / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])  # an interrupted download
    return [str(file.resolve()), "truncated"]


def _truncated_inside_header(m: Path) -> list[str]:
    file = m / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    return [str(file.resolve()), "header length", "truncated"]


def _shorter_than_length_prefix(m: Path) -> list[str]:
    file = m / "model.safetensors"
    file.write_bytes(file.read_bytes()[:5])
    return [str(file.resolve()), "truncated", "8-byte"]


def _truncated_shard(m: Path) -> list[str]:
    file = m / "model-00002-of-00005.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    return [str(file.resolve()), "truncated"]


def _offset_past_end(m: Path) -> list[str]:
    file = m / "model.safetensors"

    def change(h: dict) -> None:
        h["model.norm.weight"]["data_offsets"] = [10**9, 10**9 + 128]

    rewrite_header(file, change)
    return [str(file.resolve()), "'model.norm.weight'", "ends at byte 1000000128", "lying header"]


def _overlapping_tensors(m: Path) -> list[str]:
    file = m / "model.safetensors"
    names: list[str] = []

    def change(h: dict) -> None:
        first, second = tensors_by_offset(h)[:2]
        size = h[second]["data_offsets"][1] - h[second]["data_offsets"][0]
        start = h[first]["data_offsets"][0]
        h[second]["data_offsets"] = [start, start + size]  # both claim the same bytes
        names.extend([first, second])

    rewrite_header(file, change)
    return [str(file.resolve()), "overlap", repr(names[0]), repr(names[1])]


def _span_not_shape_times_dtype(m: Path) -> list[str]:
    file = m / "model.safetensors"

    def change(h: dict) -> None:
        assert h["model.norm.weight"]["shape"] == [32] and h["model.norm.weight"]["dtype"] == "F32"
        h["model.norm.weight"]["shape"] = [31]

    rewrite_header(file, change)
    return [str(file.resolve()), "'model.norm.weight'", "needs 124 bytes", "gives 128"]


def _unknown_header_dtype(m: Path) -> list[str]:
    file = m / "model.safetensors"

    def change(h: dict) -> None:
        h["model.norm.weight"]["dtype"] = "F33"

    rewrite_header(file, change)
    return [str(file.resolve()), "'model.norm.weight'", "unknown dtype 'F33'"]


def _header_not_json(m: Path) -> list[str]:
    file = m / "model.safetensors"
    raw = bytearray(file.read_bytes())
    raw[8] = ord("X")
    file.write_bytes(bytes(raw))
    return [str(file.resolve()), "not JSON"]


MODEL_CASES = {
    # id -> (fixture copied to ./model, how to break it; returns words the message must contain)
    "missing-model-directory": ("llama", _missing_directory),
    "model-path-is-a-file": ("llama", _model_path_is_a_file),
    "no-config-json": ("llama", _no_config),
    "config-json-not-json": ("llama", _config_not_json),
    "only-pytorch-bin-weights": ("llama", _only_pickle_weights),
    "config-layer-count-disagrees": ("llama", _layer_count_disagrees),
    "index-names-missing-shard": ("llama_sharded", _missing_shard),
    "index-points-outside-model": ("llama_sharded", _index_points_outside),
    "index-names-wrong-shard": ("llama_sharded", _index_names_wrong_shard),
    "truncated-safetensors": ("llama", _truncated),
    "truncated-inside-header": ("llama", _truncated_inside_header),
    "shorter-than-length-prefix": ("llama", _shorter_than_length_prefix),
    "truncated-shard": ("llama_sharded", _truncated_shard),
    "header-offset-past-end": ("llama", _offset_past_end),
    "header-overlapping-tensors": ("llama", _overlapping_tensors),
    "header-span-not-shape-times-dtype": ("llama", _span_not_shape_times_dtype),
    "header-unknown-dtype": ("llama", _unknown_header_dtype),
    "header-not-json": ("llama", _header_not_json),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_broken_model(tmp_path: Path, request, capsys, case: str, command: str) -> None:
    fixture, corrupt = MODEL_CASES[case]
    model = tmp_path / "model"
    shutil.copytree(request.getfixturevalue(fixture), model)
    words = corrupt(model)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(MODEL_RECIPE, encoding="utf-8")
    out = tmp_path / "OUT"
    before = snapshot(tmp_path)

    result = invoke(capsys, command, recipe, out)

    # located at the recipe's models entry, naming the file where the file is the problem
    assert_refused(result, [(f"{recipe}:{mark(MODEL_RECIPE, MODEL_ENTRY)}: models.a: ", tuple(words))])
    assert_no_output(out)
    assert snapshot(tmp_path) == before


def test_incompatible_models_in_one_stack(work: Path, capsys) -> None:
    make_model(work / "wide", layers=4, hidden_size=64, head_dim=16, seed=3)
    text = yaml_text("""
        recipe: 1
        models:
          a: ./llama
          wide: ./wide
        steps:
          - op: slice_layers
            slices:
              - model: a
                range: [0, 3]
              - model: wide
                range: [2, 4]
        """)
    recipe = work / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")
    out = work / "OUT"
    before = snapshot(work)

    result = invoke(capsys, "run", recipe, out)

    # the offending field is the second slice (its entry or its `model`), not the whole step
    located = [f"{recipe}:{mark(text, '- ^model: wide')}: steps[0].slices[1]: ",
               f"{recipe}:{mark(text, '- model: ^wide')}: steps[0].slices[1].model: "]
    assert result.rc == 2 and "Traceback" not in result.err, result.err
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith(tuple(located)), f"expected one of {located}, got:\n{result.err}"
    assert "'wide'" in lines[0] and "does not fit" in lines[0], result.err
    assert_no_output(out)
    assert snapshot(work) == before


# --------------------------------------------------------------------------- several problems, one report


def test_validate_reports_every_schema_problem(work: Path, capsys) -> None:
    text = yaml_text("""
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layer
            model: a
            layers: [1]
          - op: slice_layers
            slices:
              - model: a
                range: [3, 1]
        output:
          dtype: bf16
          shard_size: 2XB
        """)
    recipe = work / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")

    result = cli(capsys, "validate", recipe)

    expected = [
        line("op: ^drop_layer", "steps[0].op", "unknown op 'drop_layer'", "did you mean 'drop_layers'?"),
        line("range: ^[3, 1]", "steps[1].slices[0].range", "start < end"),
        line("dtype: ^bf16", "output.dtype", "'bf16'"),
        line("shard_size: ^2XB", "output.shard_size", "'2XB'"),
    ]
    assert_refused(result, [(ln.prefix(recipe, text), ln.words) for ln in expected])


def test_validate_reports_schema_and_reference_problems_together(work: Path, capsys) -> None:
    """A wrong type in one step must not hide an unknown model in another: one report holds every problem."""
    text = yaml_text("""
        recipe: 1
        models:
          a: ./llama
        steps:
          - op: drop_layers
            model: b
            layers: [1]
          - op: drop_layers
            model: a
            layers: "x"
        """)
    recipe = work / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")

    result = cli(capsys, "validate", recipe)

    expected = [
        line("model: ^b", "steps[0].model", "unknown model or step 'b'"),
        line('layers: ^"x"', "steps[1].layers", "list", "'x'"),
    ]
    assert_refused(result, [(ln.prefix(recipe, text), ln.words) for ln in expected])


def test_validate_reports_every_broken_model(tmp_path: Path, llama: Path, capsys) -> None:
    shutil.copytree(llama, tmp_path / "noconfig")
    (tmp_path / "noconfig" / "config.json").unlink()
    text = yaml_text("""
        recipe: 1
        models:
          a: ./typo
          b: ./noconfig
        steps:
          - op: slice_layers
            slices:
              - model: a
                range: [0, 2]
              - model: b
                range: [2, 4]
        """)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")

    result = cli(capsys, "validate", recipe)

    expected = [
        line("a: ^./typo", "models.a", "'./typo' not found"),
        line("b: ^./noconfig", "models.b", "no config.json"),
    ]
    assert_refused(result, [(ln.prefix(recipe, text), ln.words) for ln in expected])


# --------------------------------------------------------------------------- the output location

RUN_RECIPE = """
recipe: 1
models:
  a: {model}
steps:
  - op: drop_layers
    model: a
    layers: [1]
"""


def _model_copy(tmp_path: Path, llama: Path) -> tuple[Path, Path]:
    model = tmp_path / "models" / "llama"
    shutil.copytree(llama, model)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml_text(RUN_RECIPE.format(model="./models/llama")), encoding="utf-8")
    return model, recipe


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_out_already_exists(tmp_path: Path, llama: Path, capsys, kind: str) -> None:
    _, recipe = _model_copy(tmp_path, llama)
    out = tmp_path / "OUT"
    if kind == "directory":
        out.mkdir()
        (out / "notes.txt").write_text("my earlier work")
    else:
        out.write_text("my earlier work")
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", out)

    assert_refused(result, [(f"{out.resolve()} ", ("already exists", "--overwrite"))])
    assert snapshot(tmp_path) == before  # OUT untouched
    assert not list(tmp_path.glob(".OUT.recipekit-*"))


@pytest.mark.parametrize("where", [".", ".."])
def test_overwrite_never_replaces_the_recipes_folder(tmp_path: Path, llama: Path, capsys, where: str) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    _, recipe = _model_copy(folder, llama)
    (folder / "notes.txt").write_text("my notes")
    out = folder / where
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", out, "--overwrite")

    assert_refused(result, [
        ("", (f"the output {out.resolve()} would replace {folder}, the recipe's folder",)),
        ("", (f"the input model directory {folder / 'models' / 'llama'} is inside the output",)),
    ])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where", ["", " ", "."])
def test_an_empty_or_dot_out_never_replaces_the_current_directory(tmp_path: Path, llama: Path, capsys,
                                                                  monkeypatch, where: str, overwrite: bool) -> None:
    """`recipe run R -o "$OUT" --overwrite` with `$OUT` unset: the current directory is never replaced."""
    _, recipe = _model_copy(tmp_path / "recipe", llama)
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("two years of work")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", where, *(["--overwrite"] if overwrite else []))

    expected = ("the output path is empty",) if not where.strip() else (f"would replace {work}", "current directory")
    assert_refused(result, [("", expected)])
    assert snapshot(tmp_path) == before
    assert not list(tmp_path.glob(".*recipekit-*"))


@pytest.mark.parametrize("where", ["..", "/"])
def test_out_never_holds_the_current_directory(tmp_path: Path, llama: Path, capsys, monkeypatch,
                                               where: str) -> None:
    _, recipe = _model_copy(tmp_path / "recipe", llama)
    work = tmp_path / "projects" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", where, "--overwrite")

    if where == "/":
        assert_refused(result, [("", ("filesystem root",)), ("", ("the input model directory", "inside the output /"))])
    else:
        assert_refused(result, [("", (f"would replace {work}", "current directory"))])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["home", "parent of home"])
def test_out_never_replaces_home(tmp_path: Path, llama: Path, capsys, monkeypatch, where: str) -> None:
    _, recipe = _model_copy(tmp_path / "recipe", llama)
    home = tmp_path / "users" / "me"
    home.mkdir(parents=True)
    (home / ".bashrc").write_text("alias ll='ls -l'")
    monkeypatch.setenv("HOME", str(home))
    out = home if where == "home" else home.parent
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", out, "--overwrite")

    assert_refused(result, [("", (f"would replace {home}", "home directory"))])
    assert snapshot(tmp_path) == before


def test_overwrite_names_an_old_output_it_could_not_remove(tmp_path: Path, llama: Path, capsys,
                                                          monkeypatch) -> None:
    """The old OUT is deleted only after the new one is in place; a failed deletion is said, not hidden."""
    import recipekit.engine.run.write as execute

    _, recipe = _model_copy(tmp_path, llama)
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "old.txt").write_text("the previous model")
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if ".recipekit-old-" in str(path):
            raise PermissionError(13, "Permission denied", str(Path(path) / "old.txt"))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(execute.shutil, "rmtree", rmtree)
    result = cli(capsys, "run", recipe, "-o", out, "--overwrite", "-q")

    assert result.rc == 0, result.err
    (old,) = tmp_path.glob(".OUT.recipekit-old-*")
    assert (old / "old.txt").read_text() == "the previous model"
    assert (out / "config.json").exists() and not (out / "old.txt").exists()
    warning = [ln for ln in result.err.splitlines() if ln.startswith("recipe: warning:")]
    assert len(warning) == 1 and str(old) in warning[0] and "remove it yourself" in warning[0], result.err


def test_overwrite_puts_the_old_output_back_when_the_new_one_cannot_take_its_place(
        tmp_path: Path, llama: Path, capsys, monkeypatch) -> None:
    import recipekit.engine.run.write as execute

    _, recipe = _model_copy(tmp_path, llama)
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "old.txt").write_text("the previous model")
    real_rename = os.rename

    def rename(src, dst):
        if ".recipekit-partial-" in str(src):
            raise OSError(errno.EIO, "Input/output error", str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(execute.os, "rename", rename)
    result = cli(capsys, "run", recipe, "-o", out, "--overwrite", "-q")

    assert result.rc == 1, result.err
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert not list(tmp_path.glob(".OUT.recipekit-*"))


def test_a_shard_size_that_is_neither_text_nor_a_number_is_located(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("recipe: 1\nmodels: {a: ./a}\nsteps: [{op: drop_layers, model: a, layers: [1]}]\n"
                      "output: {shard_size: 1.5}\n")
    result = cli(capsys, "validate", "--schema-only", recipe)
    assert_refused(result, [(f"{recipe}:4:22: output.shard_size: ", ("expected a size such as 2GB", "1.5"))])


def test_overwrite_refuses_a_file(tmp_path: Path, llama: Path, capsys) -> None:
    _, recipe = _model_copy(tmp_path, llama)
    out = tmp_path / "OUT"
    out.write_text("my earlier work")
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", out, "--overwrite")

    assert_refused(result, [(f"{out.resolve()} ", ("not a directory",))])
    assert snapshot(tmp_path) == before
    assert not list(tmp_path.glob(".OUT.recipekit-*"))


def test_out_inside_input_model(tmp_path: Path, llama: Path, capsys) -> None:
    model, recipe = _model_copy(tmp_path, llama)
    out = model / "pruned"
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", out)

    assert_refused(result, [(f"the output {out.resolve()} ", ("inside the input model directory", str(model.resolve())))])
    assert_no_output(out)
    assert snapshot(tmp_path) == before


def test_out_is_the_input_model_even_with_overwrite(tmp_path: Path, llama: Path, capsys) -> None:
    model, recipe = _model_copy(tmp_path, llama)
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", model, "--overwrite")

    assert_refused(result, [(f"the output {model.resolve()} ", ("inside the input model directory",))])
    assert snapshot(tmp_path) == before  # the input survives
    assert not list(model.parent.glob(".llama.recipekit-*"))


def test_out_contains_the_input_model_even_with_overwrite(tmp_path: Path, llama: Path, capsys) -> None:
    model, recipe = _model_copy(tmp_path, llama)
    out = tmp_path / "models"
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", out, "--overwrite")

    assert_refused(result, [(f"the input model directory {model.resolve()} ", (f"inside the output {out.resolve()}",))])
    assert snapshot(tmp_path) == before  # --overwrite did not delete the input
    assert not list(tmp_path.glob(".models.recipekit-*"))


def test_out_below_a_file(tmp_path: Path, llama: Path, capsys) -> None:
    """`-o notes.txt/OUT`: the output cannot be created, which is the user's mistake (exit 2), not a crash."""
    _, recipe = _model_copy(tmp_path, llama)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder")
    out = notes / "OUT"
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", out)

    assert_refused(result, [("", (str(notes.resolve()), "not a directory"))])
    assert snapshot(tmp_path) == before


def test_unknown_device(tmp_path: Path, llama: Path, capsys) -> None:
    model, _ = _model_copy(tmp_path, llama)
    recipe = tmp_path / "cast.yaml"
    recipe.write_text(yaml_text(RUN_RECIPE.format(model="./models/llama")) + "output:\n  dtype: bfloat16\n",
                      encoding="utf-8")
    out = tmp_path / "OUT"
    before = snapshot(tmp_path)

    result = cli(capsys, "run", recipe, "-o", out, "--device", "tpu")

    assert_refused(result, [("--device tpu: ", ("expected cpu or cuda",))])
    assert_no_output(out)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- usage


def test_run_without_out(tmp_path: Path, llama: Path, capsys) -> None:
    """Forgetting `-o OUT` is a usage error: exit 2 with argparse's one-line complaint, nothing written."""
    _, recipe = _model_copy(tmp_path, llama)
    before = snapshot(tmp_path)
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(recipe)])

    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    assert "error: the following arguments are required: -o/--out" in err
    assert snapshot(tmp_path) == before
