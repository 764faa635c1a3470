"""Broken input models: missing or unreadable files, lying headers and indexes, configs that disagree."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest

from tests.bad_inputs.checks import (
    COMMANDS,
    assert_no_output,
    assert_refused,
    cli,
    invoke,
    line,
    mark,
    snapshot,
    yaml_text,
)

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


def _config_nested_deep(m: Path) -> list[str]:
    (m / "config.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    return ["config.json", "nested absurdly deep"]


def _index_nested_deep(m: Path) -> list[str]:
    (m / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return ["not a valid index"]


def _header_nested_deep(m: Path) -> list[str]:
    f = m / "model.safetensors"
    body = ("[" * 50_000 + "]" * 50_000).encode()
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + struct.unpack("<Q", data[:8])[0]:])
    return ["corrupt safetensors header", "nested absurdly deep"]


def _drop_tensor(name: str, words: list[str]) -> Callable[[Path], list[str]]:
    """A checkpoint whose header silently lacks one tensor (its bytes still there): recipekit must not copy the
    rest and call it a model."""
    def corrupt(m: Path) -> list[str]:
        rewrite_header(m / "model.safetensors", lambda header: header.pop(name))
        return ["incomplete", *words]
    return corrupt


def _config_change(words: list[str], **changes) -> Callable[[Path], list[str]]:
    """A config.json whose per-layer rules cannot be evaluated (text where a number belongs, a zero period)."""
    def corrupt(m: Path) -> list[str]:
        config = json.loads((m / "config.json").read_text())
        config.update(changes)
        (m / "config.json").write_text(json.dumps(config))
        return ["config.json of model", *words]
    return corrupt


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
    "config-json-nested-100k-deep": ("llama", _config_nested_deep),
    "index-nested-100k-deep": ("llama_sharded", _index_nested_deep),
    "header-nested-50k-deep": ("llama", _header_nested_deep),
    "a-layer-lacks-a-tensor": ("llama", _drop_tensor("model.layers.3.mlp.up_proj.weight",
                                                     ["layer 3 lacks mlp.up_proj.weight"])),
    "no-embeddings": ("llama", _drop_tensor("model.embed_tokens.weight", ["model.embed_tokens.weight"])),
    "no-final-norm": ("llama", _drop_tensor("model.norm.weight", ["model.norm.weight", "final norm"])),
    "no-lm-head-untied": ("llama", _drop_tensor("lm_head.weight", ["no lm_head.weight", "not tied"])),
    "text-max-window-layers": ("llama", _config_change(["max_window_layers should be an integer >= 0", "'two'"],
                                                       model_type="qwen2", max_window_layers="two")),
    "zero-sliding-window-pattern": ("llama", _config_change(["sliding_window_pattern should be a positive integer"],
                                                            model_type="gemma2", sliding_window_pattern=0)),
    "layer-types-not-a-list": ("llama", _config_change(["layer_types should be a list with one entry per layer (6)",
                                                        "got 5"], layer_types=5)),
    "layer-types-too-short": ("llama", _config_change(["one entry per layer (6), got 1 entry"],
                                                      layer_types=["full_attention"])),
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
