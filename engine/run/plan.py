"""The plan: every output tensor's dtype, shape, shard and byte offset, fixed before any byte is read.

Planning is pure: it reads nothing (the LazyModel already knows every shape)
and changes nothing it is given.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, replace

from recipekit.engine.core.graph import Apply, LazyModel, Load, Node, cast_source, loads_of
from recipekit.engine.core.kernels import TAKE_ROWS, compute_dtype
from recipekit.engine.io.safetensors_header import DTYPE_SIZES, FLOAT_DTYPES
from recipekit.engine.recipe.document import OUTPUT_DTYPES, Output
from recipekit.ops.registry import ROWWISE, SCRATCH

INDEX_FILE = "model.safetensors.index.json"
# What a process holds besides tensors: Python, pydantic, and (when computing) torch.
BASE_MEMORY = 80 * 2**20
TORCH_MEMORY = 300 * 2**20
COPY_BUFFER = 16 * 2**20  # per copy thread, only where the kernel refuses copy_file_range
CAST_BUFFERS = 2 * 8 * 2**20  # per thread: evaluate.CAST_CHUNK_BYTES in and out


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: `offset` is relative to its shard's data buffer."""

    name: str
    node: Node
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def is_copy(self) -> bool:
        """Passes through unchanged: its bytes are copied, never decoded."""
        return isinstance(self.node, Load)

    @property
    def cast_source(self) -> Load | None:
        """The input of a plain dtype cast, which is streamed chunk by chunk; else None."""
        return cast_source(self.node)

    @property
    def is_rowwise(self) -> bool:
        """Computed a block of rows at a time from input files of its own shape (a linear merge)."""
        return is_rowwise(self.node)


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    header: bytes  # length prefix + padded JSON, written first
    tensors: tuple[TensorPlan, ...]

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class Plan:
    """`write_memory` estimates the peak while the shards are written; `measure_memory` the peak while the recipe
    was built, for a recipe with steps that measure the model (0 otherwise)."""

    model: LazyModel
    config: dict
    shards: tuple[ShardPlan, ...]
    write_memory: int
    measure_memory: int

    @property
    def peak_memory(self) -> int:
        """The process's estimated peak: building (measuring) and writing happen one after the other."""
        return max(self.write_memory, self.measure_memory)

    @property
    def tensors(self) -> list[TensorPlan]:
        return [t for shard in self.shards for t in shard.tensors]

    @property
    def output_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def input_bytes(self) -> int:
        """Bytes read from the inputs: every distinct input tensor once."""
        loads = {load for t in self.tensors for load in loads_of(t.node)}
        return sum(load.tensor.nbytes for load in loads)

    @property
    def needs_torch(self) -> bool:
        return any(not t.is_copy for t in self.tensors)

    def index(self) -> dict:
        """Contents of `model.safetensors.index.json`."""
        weight_map = {t.name: s.filename for s in self.shards for t in s.tensors}
        return {"metadata": {"total_size": sum(t.nbytes for t in self.tensors)},
                "weight_map": dict(sorted(weight_map.items(), key=lambda kv: natural_key(kv[0])))}


def natural_key(name: str) -> tuple:
    """Sort key where `layers.10` comes after `layers.9`."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


def make_plan(model: LazyModel, output: Output) -> Plan:
    """Cast to the output dtype, pack tensors into shards, compute every offset and the memory peak."""
    target = OUTPUT_DTYPES.get(output.dtype) if output.dtype else None
    nodes: dict[str, Node] = {}
    for name, node in model.tensors.items():
        if target and node.dtype in FLOAT_DTYPES and node.dtype != target:
            # a computed tensor is computed straight into the output dtype (a merge rounds once, from its compute
            # dtype); a loaded one is cast
            node = (replace(node, dtype=target) if isinstance(node, Apply)
                    else Apply("cast", (node,), (("dtype", target),), target, node.shape))
        nodes[name] = node

    groups: list[list[str]] = [[]]
    filled = 0
    for name in sorted(nodes, key=natural_key):
        size = _nbytes(nodes[name])
        if groups[-1] and filled + size > output.shard_size:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += size
    count = len(groups)
    shards = tuple(_shard(f"model-{i + 1:05d}-of-{count:05d}.safetensors", names, nodes)
                   for i, names in enumerate(groups))
    measuring = BASE_MEMORY + TORCH_MEMORY + model.measure_memory if model.measure_memory else 0
    return Plan(model=model, config=_output_config(model.config, output.dtype), shards=shards,
                write_memory=_peak_memory(nodes), measure_memory=measuring)


def _shard(filename: str, names: list[str], nodes: dict[str, Node]) -> ShardPlan:
    # largest elements first keeps every tensor aligned to its element size
    ordered = sorted(names, key=lambda n: (-DTYPE_SIZES[nodes[n].dtype], natural_key(n)))
    tensors, entries, offset = [], {}, 0
    for name in ordered:
        node = nodes[name]
        size = _nbytes(node)
        tensors.append(TensorPlan(name, node, node.dtype, node.shape, offset, size))
        entries[name] = {"dtype": node.dtype, "shape": list(node.shape), "data_offsets": [offset, offset + size]}
        offset += size
    body = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return ShardPlan(filename, len(body).to_bytes(8, "little") + body, tuple(tensors))


def _nbytes(node: Node) -> int:
    return math.prod(node.shape) * DTYPE_SIZES[node.dtype]


def is_rowwise(node: Node) -> bool:
    """Computed a block of rows at a time from the input files: a rowwise kernel over inputs of its shape, each a
    `Load` or rows gathered from `Load`s (an input in the output vocabulary), or such gathered rows themselves."""
    if not isinstance(node, Apply) or not node.shape:
        return False
    if node.kernel == TAKE_ROWS:
        return gathered(node, node.shape)
    return node.kernel in ROWWISE and all((isinstance(i, Load) and i.shape == node.shape) or gathered(i, node.shape)
                                          for i in node.inputs)


def gathered(node: Node, shape: tuple[int, ...]) -> bool:
    """Rows of `shape` gathered straight from input tensors (`take_rows` over `Load`s)."""
    return (isinstance(node, Apply) and node.kernel == TAKE_ROWS and node.shape == shape
            and all(isinstance(i, Load) for i in node.inputs))


def _peak_memory(nodes: dict[str, Node]) -> int:
    """Estimate: the process, plus per thread its buffers, plus the largest computed tensor's working set."""
    threads = copy_threads()
    computed = [n for n in nodes.values() if isinstance(n, Apply)]
    if not computed:
        return BASE_MEMORY + threads * COPY_BUFFER
    whole = [working_set(n) for n in computed if cast_source(n) is None and not is_rowwise(n)]
    return BASE_MEMORY + TORCH_MEMORY + threads * CAST_BUFFERS + max(whole, default=0)


def copy_threads() -> int:
    """Copy streams run at once: one per core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def working_set(node: Node) -> int:
    """The tensor, its inputs, and the working copies in its compute dtype its kernel holds (`Op.scratch`)."""
    if isinstance(node, Load):
        return _nbytes(node)
    element = DTYPE_SIZES[compute_dtype(node.params)]
    per_input, fixed = SCRATCH.get(node.kernel, (1.0, 1.0))
    copies = per_input * len(node.inputs) + fixed if node.kernel != "cast" else 0
    working = int(element * math.prod(node.shape) * copies)
    return _nbytes(node) + working + sum(working_set(i) for i in node.inputs)


def _output_config(config: dict, dtype: str | None) -> dict:
    """The config written out: the model's, with the dtype keys saying what the shards hold."""
    if not dtype:
        return dict(config)
    out = _with_dtype(config, dtype)
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = _with_dtype(out["text_config"], dtype)
    return out


def _with_dtype(config: dict, dtype: str) -> dict:
    out = dict(config)
    if "torch_dtype" in out:
        out["torch_dtype"] = dtype
    if "dtype" in out or "torch_dtype" not in out:
        out["dtype"] = dtype
    return out
