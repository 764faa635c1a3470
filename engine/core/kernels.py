"""Kernels every op may emit, and the two pieces of torch every kernel needs (dtypes, seeded generators).

A kernel is a pure function of torch tensors and keyword parameters (the `params` of its `Apply` node). torch is
imported inside each function, so that ops can name and register kernels without importing it: the executor
calls a kernel only when a tensor has to be computed, and casts its result to the node's dtype. A kernel that
computes in a dtype the recipe chooses (a merge) takes it as the parameter `compute_dtype` and returns its result
in it, so that the output is rounded once; the planner and the executor size its working copies by it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (`BF16` -> torch.bfloat16)."""
    import torch

    return {
        "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
        "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
        "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16,
        "U32": torch.uint32, "U64": torch.uint64,
    }[name]


def compute_dtype(params: tuple[tuple[str, object], ...]) -> str:
    """The safetensors name of the dtype an `Apply` with these params computes in: its `compute_dtype`, else
    float32 (what the planner assumes of a kernel that does not say)."""
    return str(dict(params).get("compute_dtype", "F32"))


def generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by the recipe's seed and a tensor's name: the same bytes on every run."""
    import torch

    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def cast(x: torch.Tensor, *, dtype: str) -> torch.Tensor:
    """Any shape; the same values in another dtype (round to nearest)."""
    return x.to(torch_dtype(dtype))


def zeros(*, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    return torch.zeros(shape, dtype=torch_dtype(dtype))


def constant(*, data: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 values computed when the recipe was built (e.g. gates from prompts), in `dtype`."""
    import torch

    values = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape)
    return values.to(torch_dtype(dtype))


def randn(*, seed: int, name: str, std: float, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Normal values with standard deviation `std`, seeded by (`seed`, `name`)."""
    import torch

    values = torch.randn(shape, generator=generator(seed, name), dtype=torch.float32) * std
    return values.to(torch_dtype(dtype))


def uniform(*, seed: int, name: str, bound: float, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform values in [-bound, bound), seeded by (`seed`, `name`)."""
    import torch

    values = torch.rand(shape, generator=generator(seed, name), dtype=torch.float32) * (2 * bound) - bound
    return values.to(torch_dtype(dtype))


def zero_at(x: torch.Tensor, *, coordinates: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """A 2-D tensor with the given entries set to zero (e.g. a super weight, to see what it does)."""
    y = x.clone()
    for row, column in coordinates:
        y[row, column] = 0
    return y


def take_rows(*matrices: torch.Tensor, take: bytes, means: tuple[tuple[tuple[int, int], ...], ...], used: int,
              rows: int) -> torch.Tensor:
    """A vocabulary matrix (rows, ...) gathered row by row from `matrices` (each (any, ...)), the first being the
    model's own: `take` holds an int32 (source, row) pair per output row, source -1 a zero row, -2 the mean of the
    (source, row) pairs of `means[row]`, -3 the mean of the first `used` rows of the own matrix (`engine/vocab/
    rows.py`). Means are taken in float32; the result has the own matrix's dtype."""
    own = matrices[0]
    pairs = row_pairs(take).to(own.device)
    own_mean = own[:used].double().mean(0).float() if bool((pairs[:, 0] == OWN_MEAN).any()) else None
    return gather_rows(pairs, means, own_mean, lambda k, picked: matrices[k][picked], own.dtype, own.shape[1:])


TAKE_ROWS = "take_rows"
ZERO_ROW, MEAN_ROW, OWN_MEAN = -1, -2, -3  # `take_rows` sources that are not a matrix


def row_pairs(take: bytes) -> torch.Tensor:
    """`take_rows`' (source, row) pairs as an (rows, 2) int64 tensor."""
    import torch

    return torch.frombuffer(bytearray(take), dtype=torch.int32).view(-1, 2).long()


def gather_rows(pairs: torch.Tensor, means: tuple[tuple[tuple[int, int], ...], ...], own_mean: torch.Tensor | None,
                read: Callable[[int, torch.Tensor], torch.Tensor], dtype: torch.dtype,
                width: tuple[int, ...]) -> torch.Tensor:
    """The rows `pairs` (rows, 2) names (see `take_rows`), each source's read at once by `read(source, rows)`: the
    kernel reads from matrices in memory, the row streamer from the input files, a block of rows at a time. The
    result is on `pairs`' device."""
    import torch

    out = torch.zeros((len(pairs), *width), dtype=dtype, device=pairs.device)
    for k in sorted(set(pairs[:, 0].tolist()) - {ZERO_ROW, MEAN_ROW, OWN_MEAN}):
        chosen = (pairs[:, 0] == k).nonzero().squeeze(1)
        out[chosen] = read(k, pairs[chosen, 1]).to(dtype)
    for r in (pairs[:, 0] == MEAN_ROW).nonzero().squeeze(1).tolist():
        entry = means[int(pairs[r, 1])]
        picked = [read(k, torch.tensor([i], device=pairs.device)).float() for k, i in entry]
        out[r] = torch.cat(picked).mean(0).to(dtype)
    if own_mean is not None:
        out[pairs[:, 0] == OWN_MEAN] = own_mean.to(dtype)
    return out


SHARED_KERNELS = {"cast": cast, "zeros": zeros, "constant": constant, "randn": randn, "uniform": uniform,
                  "zero_at": zero_at, TAKE_ROWS: take_rows}
