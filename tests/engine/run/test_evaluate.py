"""Kernels and the evaluator against plain torch, and the chunked cast against a whole-tensor cast."""
from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from recipekit.engine.core.graph import Apply, LazyModel, Load
from recipekit.engine.errors import PlanError
from recipekit.engine.io.source import open_model
from recipekit.engine.recipe.document import Output
from recipekit.engine.run import evaluate
from recipekit.engine.run.plan import make_plan
from recipekit.engine.run.write import write_model


def _model(tmp_path, tensors: dict[str, torch.Tensor]):
    folder = tmp_path / "in"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"num_hidden_layers": 1}')
    return open_model(str(folder), base_dir=tmp_path)


def test_chunked_cast_equals_whole_tensor_cast(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "CAST_CHUNK_BYTES", 1000)  # many chunks, a ragged last one
    monkeypatch.setattr(evaluate, "_chunk_buffers", type(evaluate._chunk_buffers)())
    x = torch.randn(37, 29, dtype=torch.float32) * 1000
    source = _model(tmp_path, {"x": x})
    info = source.tensors["x"]
    out = tmp_path / "out.bin"
    fd = os.open(out, os.O_RDWR | os.O_CREAT)
    src = os.open(info.file, os.O_RDONLY)
    try:
        for dtype, torch_dtype in (("BF16", torch.bfloat16), ("F16", torch.float16)):
            evaluate.cast_stream(info, src, fd, 3, dtype)
            data = bytearray(os.pread(fd, x.numel() * 2, 3))
            assert torch.equal(torch.frombuffer(data, dtype=torch_dtype).reshape(x.shape), x.to(torch_dtype))
    finally:
        os.close(fd)
        os.close(src)


def test_evaluator_shares_intermediates_and_frees_them(tmp_path):
    x = torch.randn(4, 6, dtype=torch.float32)
    source = _model(tmp_path, {"x": x})
    load = Load(source.tensors["x"])
    half = Apply("cast", (load,), (("dtype", "F16"),), "F16", load.shape)
    back = Apply("cast", (half,), (("dtype", "F32"),), "F32", load.shape)  # not a plain cast of a Load
    fd = os.open(source.tensors["x"].file, os.O_RDONLY)
    try:
        evaluator = evaluate.Evaluator([back, half], lambda info: fd)
        assert torch.equal(evaluator.value(back), x.to(torch.float16).to(torch.float32))
        assert half in evaluator.cache  # still needed by the second root
        assert torch.equal(evaluator.value(half), x.to(torch.float16))
        assert evaluator.cache == {}
    finally:
        os.close(fd)


def test_whole_tensor_compute_path_writes_what_torch_computes(tmp_path):
    x = torch.randn(5, 3, dtype=torch.float32)
    source = _model(tmp_path, {"model.layers.0.w": x, "emb": torch.arange(6, dtype=torch.int64)})
    load = Load(source.tensors["model.layers.0.w"])
    twice = Apply("cast", (Apply("cast", (load,), (("dtype", "BF16"),), "BF16", load.shape),),
                  (("dtype", "F32"),), "F32", load.shape)
    model = LazyModel(config={"num_hidden_layers": 1}, tensors={"model.layers.0.w": twice,
                                                                "emb": Load(source.tensors["emb"])},
                      side_files=source, sources=(("in", source),), layer_origins=("in:0",))
    plan = make_plan(model, Output(dtype="float16"))
    planned = {t.name: t for t in plan.tensors}
    assert not planned["model.layers.0.w"].is_copy and planned["model.layers.0.w"].cast_source is None
    assert planned["emb"].is_copy
    write_model(plan, tmp_path / "out", {})
    (shard,) = (tmp_path / "out").glob("*.safetensors")
    got = load_file(str(shard))
    assert torch.equal(got["model.layers.0.w"], x.to(torch.bfloat16).to(torch.float32).to(torch.float16))
    assert torch.equal(got["emb"], torch.arange(6, dtype=torch.int64))  # integers are not cast


def test_a_strided_result_is_written_whole(tmp_path):
    """`write_tensor` writes from a temporary (`contiguous()` of a strided tensor here, a copy from the GPU under
    --device cuda): the bytes must be the tensor's, not memory freed before the write (a large one is unmapped,
    a small one's first bytes reused by the allocator)."""
    for shape in ((1024, 1024), (16, 8)):
        value = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
        path = tmp_path / f"{shape[0]}.bin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            evaluate.write_tensor(value.T, fd, 0)
        finally:
            os.close(fd)
        assert path.read_bytes() == value.T.contiguous().numpy().tobytes()
        assert evaluate.tensor_bytes(value.T) == value.T.contiguous().numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_non_finite_value_anywhere_is_found(dtype):
    """`check_finite` reads the smallest and largest values: a NaN or an infinity at any position (vector lanes,
    the tail, a strided view) must still be found, and one the inputs already had passes."""
    finite = [torch.ones(3, dtype=torch.float32)]
    evaluate.check_finite(torch.randn(40, 33).to(dtype), lambda: finite, "w")
    evaluate.check_finite(torch.zeros(0, 4, dtype=dtype), lambda: finite, "empty")
    bad_values = [math.nan] + ([] if dtype == torch.float8_e4m3fn else [math.inf, -math.inf])  # e4m3fn: no inf
    for bad in bad_values:
        for row, column in ((0, 0), (17, 5), (39, 32)):
            result = torch.randn(40, 33)
            result[row, column] = bad
            for view in (result.to(dtype), result.to(dtype).t()):
                with pytest.raises(PlanError, match="NaN or infinite"):
                    evaluate.check_finite(view, lambda: finite, "w")
                evaluate.check_finite(view, lambda: [torch.tensor([bad, 1.0])], "w")  # the input had it
