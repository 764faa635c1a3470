"""Our header reader agrees with the safetensors library and refuses files that lie."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from recipekit.engine.errors import SourceError
from recipekit.engine.io.safetensors_header import read_header


def test_matches_the_safetensors_library(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16), "c": torch.ones((), dtype=torch.int64),
               "empty": torch.zeros(0, 3)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    infos, metadata = read_header(path)
    assert metadata == {"format": "pt"}
    raw = path.read_bytes()
    for name, tensor in tensors.items():
        info = infos[name]
        assert info.shape == tuple(tensor.shape)
        data = bytearray(raw[info.offset:info.offset + info.nbytes])
        assert info.nbytes == tensor.numel() * tensor.element_size()
        if tensor.numel():
            assert torch.equal(torch.frombuffer(data, dtype=tensor.dtype).reshape(tensor.shape), tensor)


def _file(tmp_path, header: dict, data: bytes) -> object:
    body = json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


@pytest.mark.parametrize("header, data, message", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated or lying"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12 bytes"),
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "invalid shape"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "invalid data_offsets"),
])
def test_lying_headers_are_refused(tmp_path, header, data, message):
    with pytest.raises(SourceError, match=message):
        read_header(_file(tmp_path, header, data))


def test_truncated_and_garbage_files(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(SourceError, match="truncated"):
        read_header(short)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(SourceError, match="does not fit"):
        read_header(huge)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe\x00x")
    with pytest.raises(SourceError, match="not JSON"):
        read_header(garbage)
