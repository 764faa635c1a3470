"""The `take_rows` kernel (a model's rows in another vocabulary) against plain torch indexing, and the row
streamer's blocks of the same node against the kernel."""
from __future__ import annotations

import os
from array import array

import torch
from safetensors.torch import save_file

from recipekit.engine.core.graph import Apply, Load
from recipekit.engine.core.kernels import MEAN_ROW, OWN_MEAN, ZERO_ROW, take_rows
from recipekit.engine.io.safetensors_header import read_header

PAIRS = [(0, 3), (1, 0), (ZERO_ROW, 0), (MEAN_ROW, 0), (0, 0), (OWN_MEAN, 0), (1, 4), (MEAN_ROW, 1)]
MEANS = (((0, 1), (1, 2)), ((1, 1), (1, 3), (0, 4)))


def _matrices():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(5, 3, generator=generator), torch.randn(6, 3, generator=generator).to(torch.bfloat16)


def _want(own, other):
    mats = (own, other.float())
    rows = [own[3], other[0].float(), torch.zeros(3), (own[1] + mats[1][2]) / 2, own[0], own[:4].mean(0),
            mats[1][4], (mats[1][1] + mats[1][3] + own[4]) / 3]
    return torch.stack(rows)


def test_take_rows_is_indexing():
    own, other = _matrices()
    got = take_rows(own, other, take=array("i", [v for p in PAIRS for v in p]).tobytes(), means=MEANS, used=4,
                    rows=len(PAIRS))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _want(own, other))


def test_streamed_blocks_equal_the_kernel(tmp_path, monkeypatch):
    from recipekit.engine.run import evaluate

    own, other = _matrices()
    save_file({"own": own, "other": other}, str(tmp_path / "m.safetensors"))
    header, _ = read_header(tmp_path / "m.safetensors")
    take = array("i", [v for p in PAIRS for v in p]).tobytes()
    node = Apply("take_rows", (Load(header["own"]), Load(header["other"])),
                 (("take", take), ("means", MEANS), ("used", 4), ("rows", len(PAIRS))), "F32", (len(PAIRS), 3))
    fd = os.open(tmp_path / "m.safetensors", os.O_RDONLY)
    out = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT)
    monkeypatch.setattr(evaluate, "CAST_CHUNK_BYTES", 64)  # blocks of a few rows
    try:
        evaluate.rowwise_stream(node, lambda info: fd, out, 0, "t")
    finally:
        os.close(fd)
        os.close(out)
    got = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=torch.float32).view(-1, 3)
    torch.testing.assert_close(got, _want(own, other))
