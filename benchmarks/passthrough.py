#!/usr/bin/env python3
"""Benchmark recipekit's passthrough paths against a plain `cp -r`.

A benchmark, not a test: CI never runs it. It

1. generates (once, cached in --workdir) a synthetic Llama-shaped bf16 model of
   about --size bytes, written as sharded safetensors without torch or numpy;
2. writes two recipes beside it: drop 4 middle layers (a pure byte copy), and
   the same drop with `output: {dtype: float16}` (bf16 -> fp16 conversion);
3. times, alternating, `cp -r MODEL DEST` and `recipe run RECIPE -o DEST -q
   --overwrite` (and `mergekit-yaml` on an equivalent config when it is on PATH),
   with every input file read into the page cache before each timed command;
   the variant `first` times the copy recipe as a user's first run over a model
   they just downloaded: the model is copied to a fresh path (new inodes, so no
   remembered hashes) before each timed run, outside the timing, beside a warm
   run (hashes remembered) and a `--no-lock` run;
4. prints median wall time, output bytes/second, throughput against cp and peak
   RSS per command, and with --json FILE writes the numbers as JSON.

With `--baseline PATH` (another `recipe` executable, e.g. an install of an
earlier commit) that one is timed in the same rounds too, `validate` included
(and its first run, in the variant `first`), so a change can be judged before
and after in one run.

Run it with the interpreter of the environment recipekit is installed in:

    python benchmarks/passthrough.py --size 1.7GB --repeats 3 --json bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

GENERATOR_VERSION = 1  # bump when the generated model changes, to invalidate caches
SHARD_MAX = 2 * 10**9  # ~2GB per input shard, as `shard_size: 2GB` means to recipekit
VOCAB = 32000
DROPPED = 4
MIN_LAYERS = 12  # below this a size is served by a narrower shape
BLOCK_ELEMS = (1 << 21) + 4099  # repeated pseudo-random bf16 block (~4 MiB); odd length so tensors differ
COPY_RSS_TARGET_MB = 150.0
CONVERT_RSS_BASE_MB = 300.0
RATIO_TARGET = 0.9

# Llama-family shapes, widest first; the first one that reaches MIN_LAYERS at the
# requested size is used (2048/5632/32/4 is TinyLlama-1.1B's shape).
SHAPES = (
    {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4},
    {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 4},
    {"hidden_size": 512, "intermediate_size": 1408, "num_attention_heads": 8, "num_key_value_heads": 2},
    {"hidden_size": 256, "intermediate_size": 704, "num_attention_heads": 4, "num_key_value_heads": 1},
)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """`1.7GB` -> 1_700_000_000 (GB = 10^9, GiB = 2^30), as recipekit reads sizes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a size: write e.g. 1.7GB, 4GB, 200MB")
    n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if n <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return n


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


# --------------------------------------------------------------------------- model


@dataclass
class ModelSpec:
    size: int  # requested bytes
    shape: dict
    layers: int

    @property
    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in state-dict order, as transformers saves a LlamaForCausalLM."""
        h, i = self.shape["hidden_size"], self.shape["intermediate_size"]
        kv = self.shape["num_key_value_heads"] * (h // self.shape["num_attention_heads"])
        out = [("model.embed_tokens.weight", (VOCAB, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}"
            out += [
                (f"{p}.self_attn.q_proj.weight", (h, h)),
                (f"{p}.self_attn.k_proj.weight", (kv, h)),
                (f"{p}.self_attn.v_proj.weight", (kv, h)),
                (f"{p}.self_attn.o_proj.weight", (h, h)),
                (f"{p}.mlp.gate_proj.weight", (i, h)),
                (f"{p}.mlp.up_proj.weight", (i, h)),
                (f"{p}.mlp.down_proj.weight", (h, i)),
                (f"{p}.input_layernorm.weight", (h,)),
                (f"{p}.post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (VOCAB, h))]
        return out

    @property
    def nbytes(self) -> int:
        return sum(2 * _numel(s) for _, s in self.tensors)

    @property
    def largest_tensor(self) -> int:
        return max(2 * _numel(s) for _, s in self.tensors)

    @property
    def layer_bytes(self) -> int:
        return sum(2 * _numel(s) for n, s in self.tensors if n.startswith("model.layers.0."))

    @property
    def drop(self) -> tuple[int, int]:
        """The dropped layers [start, stop): the middle DROPPED layers."""
        start = (self.layers - DROPPED) // 2
        return start, start + DROPPED

    def config(self) -> dict:
        h = self.shape["hidden_size"]
        return {
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "head_dim": h // self.shape["num_attention_heads"],
            "hidden_act": "silu",
            "hidden_size": h,
            "initializer_range": 0.02,
            "intermediate_size": self.shape["intermediate_size"],
            "max_position_embeddings": 2048,
            "mlp_bias": False,
            "model_type": "llama",
            "num_attention_heads": self.shape["num_attention_heads"],
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.shape["num_key_value_heads"],
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.44.0",
            "use_cache": True,
            "vocab_size": VOCAB,
        }

    def key(self) -> dict:
        return {"generator": GENERATOR_VERSION, "shape": self.shape, "layers": self.layers, "vocab": VOCAB,
                "shard_max": SHARD_MAX}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def choose_spec(size: int) -> ModelSpec:
    for shape in SHAPES:
        probe = ModelSpec(size, shape, 1)
        fixed = probe.nbytes - probe.layer_bytes
        layers = round((size - fixed) / probe.layer_bytes)
        if layers >= MIN_LAYERS:
            return ModelSpec(size, shape, layers)
    return ModelSpec(size, SHAPES[-1], MIN_LAYERS)


def _bf16_block(rng: random.Random, n: int, mean: float, std: float) -> bytes:
    """n bf16 values from N(mean, std): the high halves of float32s (truncation)."""
    f32 = array("f", (rng.gauss(mean, std) for _ in range(n)))
    if sys.byteorder != "little":
        f32.byteswap()
    raw = f32.tobytes()
    out = bytearray(2 * n)
    out[0::2] = raw[2::4]
    out[1::2] = raw[3::4]
    return bytes(out)


def _safetensors_header(entries: list[tuple[str, tuple[int, ...]]]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _shards(spec: ModelSpec) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list] = [[]]
    used = 0
    for name, shape in spec.tensors:
        nbytes = 2 * _numel(shape)
        if shards[-1] and used + nbytes > SHARD_MAX:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    return shards


def generate(spec: ModelSpec, root: Path, log, seed: int = 1234) -> None:
    """Write the model into `root` (atomically, via a sibling temp dir), streaming the data; other seeds give
    other weights."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-partial-", dir=root.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cached model is meant to be shared
        rng = random.Random(seed)
        weights = _bf16_block(rng, BLOCK_ELEMS, 0.0, 0.02)
        norms = _bf16_block(rng, 1 << 14, 1.0, 0.05)
        weights2, norms2 = memoryview(weights * 2), memoryview(norms * 2)  # doubled: any window wraps freely
        shards = _shards(spec)
        count = len(shards)
        weight_map = {}
        start = time.perf_counter()
        k = 0
        for s, entries in enumerate(shards, 1):
            fname = f"model-{s:05d}-of-{count:05d}.safetensors"
            with open(tmp / fname, "wb", buffering=0) as f:
                f.write(_safetensors_header(entries))
                for name, shape in entries:
                    weight_map[name] = fname
                    src = norms2 if len(shape) == 1 else weights2
                    period = len(src) // 2
                    left = 2 * _numel(shape)
                    pos = (k * 2 * 7919) % period  # a different window of the block per tensor
                    k += 1
                    while left:
                        n = min(left, period)
                        f.write(src[pos:pos + n])
                        left -= n
            log(f"  wrote {fname} ({human((tmp / fname).stat().st_size)})")
        index = {"metadata": {"total_size": spec.nbytes}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(spec.config(), indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
        (tmp / "bench-model.json").write_text(json.dumps(_key(spec, seed), sort_keys=True) + "\n")
        if root.exists():
            shutil.rmtree(root)
        os.rename(tmp, root)
        log(f"  generated {human(spec.nbytes)} in {time.perf_counter() - start:.1f}s")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _key(spec: ModelSpec, seed: int) -> dict:
    return spec.key() if seed == 1234 else {**spec.key(), "seed": seed}


def cached(spec: ModelSpec, root: Path, seed: int = 1234) -> bool:
    try:
        if json.loads((root / "bench-model.json").read_text()) != json.loads(json.dumps(_key(spec, seed),
                                                                                     sort_keys=True)):
            return False
        index = json.loads((root / "model.safetensors.index.json").read_text())
    except (OSError, ValueError):
        return False
    files = sorted(set(index["weight_map"].values()))
    data = sum((root / f).stat().st_size if (root / f).is_file() else -10**18 for f in files)
    headers = sum(len(_safetensors_header(e)) for e in _shards(spec))
    return data == spec.nbytes + headers


# --------------------------------------------------------------------------- recipes


def write_recipes(spec: ModelSpec, workdir: Path, model: Path) -> dict[str, Path]:
    a, b = spec.drop
    rel = os.path.relpath(model, workdir)
    common = (f"recipe: 1\n"
              f"description: Drop layers {a}..{b - 1} of the {human(spec.nbytes)} synthetic Llama "
              f"({spec.layers} -> {spec.layers - DROPPED} layers).\n"
              f"models:\n  base: {rel}\n"
              f"steps:\n  - op: drop_layers\n    model: base\n    layers: [[{a}, {b}]]\n")
    recipes = {
        "copy": common + "output:\n  shard_size: 2GB\n",
        "convert": common + "output:\n  dtype: float16\n  shard_size: 2GB\n",
    }
    paths = {}
    for name, text in recipes.items():
        paths[name] = workdir / f"drop-{name}.yaml"
        paths[name].write_text(text)
    return paths


def write_mergekit_configs(spec: ModelSpec, workdir: Path, model: Path) -> dict[str, Path]:
    a, b = spec.drop
    paths = {}
    for name, dtype in (("copy", "bfloat16"), ("convert", "float16")):
        text = (f"slices:\n"
                f"  - sources:\n      - model: {model}\n        layer_range: [0, {a}]\n"
                f"  - sources:\n      - model: {model}\n        layer_range: [{b}, {spec.layers}]\n"
                f"merge_method: passthrough\n"
                f"dtype: {dtype}\n")
        paths[name] = workdir / f"mergekit-drop-{name}.yaml"
        paths[name].write_text(text)
    return paths


# --------------------------------------------------------------------------- timing


@dataclass
class Run:
    wall_s: float
    rss_mb: float
    out_bytes: int  # bytes this run is credited with (cp: input bytes; others: output dir bytes)

    @property
    def bytes_per_s(self) -> float:
        return self.out_bytes / self.wall_s


@dataclass
class Row:
    variant: str
    tool: str
    argv: list[str]
    runs: list[Run] = field(default_factory=list)
    error: str | None = None
    fresh: bool = False  # reads the variant's fresh copy of the model: inputs recipekit never hashed

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)

    @property
    def peak_rss_mb(self) -> float:
        return max(r.rss_mb for r in self.runs)


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def warm_cache(files: list[Path]) -> None:
    """Read every input file so the timed command starts from a warm page cache."""
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)


# Commands run as an installed package runs for its users: with Python's bytecode cache (pip compiles it at
# install time). A development shell that sets PYTHONDONTWRITEBYTECODE would otherwise make every run
# recompile recipekit from source, about a third of a run's fixed cost on the 2-core VM.
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

# The part of a run's fixed cost that is not recipekit's: the interpreter with the imports any pydantic +
# PyYAML command line tool has, and one validated pydantic model.
FLOOR_CODE = ("import argparse, json, yaml\nfrom pydantic import BaseModel\n"
              "class Floor(BaseModel):\n    x: int\nFloor(x=1)\n")


def timed(argv: list[str], workdir: Path) -> tuple[float, float, int, str]:
    """(wall seconds, max RSS in MB (10^6 bytes), exit status, stderr tail) of one command."""
    gnu_time = Path("/usr/bin/time")
    if gnu_time.exists():
        stats = workdir / "time-v.txt"
        start = time.perf_counter()
        proc = subprocess.run([str(gnu_time), "-v", "-o", str(stats), *argv], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
        wall = time.perf_counter() - start
        text = stats.read_text() if stats.exists() else ""
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        rss_kb = int(m.group(1)) if m else -1024
        stats.unlink(missing_ok=True)
        return wall, rss_kb * 1024 / 1e6, proc.returncode, proc.stderr[-2000:]
    # no GNU time: the same numbers from wait4's rusage of the child
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss * 1024 / 1e6, proc.returncode, stderr[-2000:]


def clear(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    for stale in path.parent.glob(f".{path.name}.*"):  # recipekit's partial/old siblings
        shutil.rmtree(stale, ignore_errors=True)


def bench_variant(rows: list[Row], inputs: list[Path], input_bytes: int, dest: Path, workdir: Path,
                  repeats: int, settle: float, log, fresh: Path | None = None) -> None:
    """`repeats` rounds; each round times every row once, the order rotating between rounds. With `fresh`, the
    model is copied there before every timed run (untimed, whichever row runs, so that every row meets the same
    page cache and memory state), and rows marked `fresh` read that copy."""
    for rnd in range(repeats):
        k = rnd % len(rows)
        for row in rows[k:] + rows[:k]:
            if row.error:
                continue
            clear(dest)
            if fresh is not None:
                clear(fresh)
                # cp sets new mtimes (copytree would keep them, and a reused inode could then match a remembered hash)
                subprocess.run(["cp", "-r", str(MODEL_DIR), str(fresh)], check=True)
            subprocess.run(["sync"], check=False)
            time.sleep(settle)  # let the VM take back the freed output pages (see README)
            warm_cache([fresh / p.name for p in inputs] if row.fresh else inputs)
            wall, rss, rc, err = timed(row.argv, workdir)
            if rc != 0:
                row.error = f"exit {rc}: {err.strip().splitlines()[-1] if err.strip() else ''}"
                log(f"  {row.variant:8} {row.tool:9} FAILED ({row.error})")
                continue
            out = input_bytes if row.tool == "cp" else dir_bytes(dest)
            row.runs.append(Run(wall, rss, out))
            log(f"  {row.variant:8} {row.tool:9} round {rnd + 1}/{repeats}: {wall:7.2f}s  "
                f"{out / wall / 1e6:8.1f} MB/s  RSS {rss:7.1f} MB")
            if row.tool in ("recipe", "baseline", "first run", "base first") and rnd == 0:
                check_output(dest, row.variant, log)
    clear(dest)
    if fresh is not None:
        clear(fresh)


# --------------------------------------------------------------------------- sanity


SPEC: ModelSpec | None = None
MODEL_DIR: Path | None = None


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def _tensor_bytes(root: Path, name: str) -> tuple[str, bytes]:
    index = json.loads((root / "model.safetensors.index.json").read_text())
    path = root / index["weight_map"][name]
    header, base = _header(path)
    begin, end = header[name]["data_offsets"]
    with open(path, "rb") as f:
        f.seek(base + begin)
        return header[name]["dtype"], f.read(min(end - begin, 1 << 20))


def check_output(out: Path, variant: str, log) -> None:
    """Untimed: the output has the right layer count, dtype and (for the copy) the right bytes."""
    assert SPEC is not None and MODEL_DIR is not None
    config = json.loads((out / "config.json").read_text())
    problems = []
    if config.get("num_hidden_layers") != SPEC.layers - DROPPED:
        problems.append(f"num_hidden_layers {config.get('num_hidden_layers')}, expected {SPEC.layers - DROPPED}")
    a, b = SPEC.drop
    name_out, name_in = f"model.layers.{a}.mlp.down_proj.weight", f"model.layers.{b}.mlp.down_proj.weight"
    dtype, data = _tensor_bytes(out, name_out)
    if variant in ("copy", "first"):
        if dtype != "BF16" or data != _tensor_bytes(MODEL_DIR, name_in)[1]:
            problems.append(f"{name_out} is not a byte copy of input {name_in}")
    elif dtype != "F16":
        problems.append(f"{name_out} has dtype {dtype}, expected F16")
    if problems:
        log(f"  WARNING: recipe output ({variant}) looks wrong: " + "; ".join(problems))
    else:
        log(f"  recipe output ({variant}) checked: {SPEC.layers - DROPPED} layers, {dtype}"
            + (", bytes match the input" if variant == "copy" else ""))


# --------------------------------------------------------------------------- report


def report(rows_by_variant: dict[str, list[Row]], spec: ModelSpec, startup: dict,
           settle: float) -> tuple[str, dict]:
    limits = {"copy": COPY_RSS_TARGET_MB, "first": COPY_RSS_TARGET_MB, "convert": CONVERT_RSS_BASE_MB + 2 * spec.largest_tensor / 1e6}
    head = ("variant", "command", "runs", "wall s", "MB/s", "vs cp", "peak RSS MB", "RSS target", "ok")
    table = []
    data: dict = {}
    for variant, rows in rows_by_variant.items():
        base = next(r for r in rows if r.tool == "cp")
        base_bps = base.median("bytes_per_s") if base.runs else None
        data[variant] = {}
        for row in rows:
            if row.error and not row.runs:
                table.append((variant, row.tool, "0", "-", "-", "-", "-", "-", f"FAILED: {row.error}"))
                data[variant][row.tool] = {"argv": row.argv, "error": row.error}
                continue
            bps = row.median("bytes_per_s")
            ratio = bps / base_bps if base_bps and row.tool != "cp" else None
            target = limits[variant] if row.tool == "recipe" else None
            verdicts = []
            if row.tool == "recipe":
                verdicts.append("speed ok" if ratio is not None and ratio >= RATIO_TARGET else "SLOW")
                verdicts.append("mem ok" if row.peak_rss_mb <= target else "MEM HIGH")
            table.append((variant, row.tool, str(len(row.runs)), f"{row.median('wall_s'):.2f}", f"{bps / 1e6:.0f}",
                          f"{ratio:.2f}" if ratio is not None else "-", f"{row.peak_rss_mb:.0f}",
                          f"<= {target:.0f}" if target else "-", ", ".join(verdicts) or "-"))
            data[variant][row.tool] = {
                "argv": row.argv,
                "median_wall_s": row.median("wall_s"),
                "median_bytes_per_s": bps,
                "ratio_vs_cp": ratio,
                "peak_rss_mb": row.peak_rss_mb,
                "median_rss_mb": row.median("rss_mb"),
                "rss_target_mb": target,
                "bytes": row.runs[0].out_bytes,
                "runs": [{"wall_s": r.wall_s, "rss_mb": r.rss_mb, "bytes": r.out_bytes} for r in row.runs],
                "error": row.error,
            }
    first = data.get("first", {})
    for cold, warm, label in (("first run", "recipe", "first/warm"), ("base first", "baseline", "base f/w")):
        if cold in first and warm in first and "median_wall_s" in first[cold] and "median_wall_s" in first[warm]:
            ratio = first[cold]["median_wall_s"] / first[warm]["median_wall_s"]
            cp = first[cold]["median_bytes_per_s"] / first["cp"]["median_bytes_per_s"]
            table.append(("first", label, "-", f"{ratio:.2f}x", "-", f"{cp:.2f}", "-", "<= 1.3x",
                          "ok" if ratio <= 1.3 else "SLOW"))
            first[label] = {"ratio": ratio, "vs_cp": cp}
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) if i < 2 or i == 8 else str(c).rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, table)]
    lines.append("")
    lines.append(f"model: {human(spec.nbytes)}, {spec.layers} layers, hidden {spec.shape['hidden_size']}, "
                 f"largest tensor {human(spec.largest_tensor)}; MB/s = output bytes / wall "
                 f"(cp: input bytes); vs cp = throughput / cp's, target >= {RATIO_TARGET}; "
                 f"RSS and MB = 10^6 bytes; medians, {settle:g}s settle before each run")
    if startup:
        v, f = startup["validate"], startup["floor"]
        lines.append(f"fixed cost: `recipe validate` (import, parse, headers; no data) median "
                     f"{v['median_wall_s']:.2f}s, RSS {v['peak_rss_mb']:.0f} MB; of it, python + pyyaml + "
                     f"pydantic with one model {f['median_wall_s']:.2f}s")
        if "baseline validate" in startup:
            b = startup["baseline validate"]
            lines.append(f"baseline `recipe validate` median {b['median_wall_s']:.2f}s, RSS {b['peak_rss_mb']:.0f} MB "
                         f"(recipe / baseline {v['median_wall_s'] / b['median_wall_s']:.2f}x)")
    return "\n".join(lines), data


# --------------------------------------------------------------------------- main


def fixed_cost(recipe_bin: str, recipe: Path, inputs: list[Path], workdir: Path, rounds: int = 7,
               baseline_bin: str | None = None) -> dict:
    """A run's fixed cost, `recipe validate` (interpreter, imports, recipe, input headers; no data), beside the
    floor any pydantic command line tool pays (`FLOOR_CODE` in the Python that runs `recipe`), alternating."""
    python = _script_python(recipe_bin)
    commands = {"validate": [recipe_bin, "validate", str(recipe)], "floor": [python, "-c", FLOOR_CODE]}
    if baseline_bin is not None:
        commands["baseline validate"] = [baseline_bin, "validate", str(recipe)]
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for k in range(rounds + 1):  # the first round writes the bytecode cache and is not counted
        for name, argv in (commands.items() if k % 2 else reversed(commands.items())):
            warm_cache(inputs)
            wall, rss, rc, err = timed(argv, workdir)
            if rc != 0:
                sys.exit(f"`{' '.join(argv[:2])} ...` failed: {err.strip()}")
            if k:
                samples[name].append((wall, rss))
    return {name: {"median_wall_s": statistics.median(w for w, _ in rows), "peak_rss_mb": max(r for _, r in rows)}
            for name, rows in samples.items()}


def _script_python(script: str) -> str:
    """The interpreter a console script runs under (its #! line), else this one."""
    try:
        first = Path(script).read_bytes()[:200].split(b"\n", 1)[0]
    except OSError:
        return sys.executable
    return first[2:].decode().strip() if first.startswith(b"#!") and b" " not in first.strip() else sys.executable


def find_recipe(explicit: str | None) -> str:
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "recipe"
    if beside.exists():
        return str(beside)
    found = shutil.which("recipe")
    if not found:
        sys.exit("cannot find the `recipe` command: pass --recipe PATH or run with recipekit's venv python")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=parse_size("1.7GB"),
                   help="synthetic model size, e.g. 1.7GB (default), 4GB, 200MB")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rk-bench",
                   help="where the model (cached), recipes and outputs go (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per variant (default: %(default)s)")
    p.add_argument("--variants", default="copy,convert,first",
                   help="comma list of copy, convert, first (default: all three)")
    p.add_argument("--settle", type=float, default=10.0,
                   help="seconds to wait after removing the previous output, before warming the cache and "
                        "timing (default: %(default)s; see README)")
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    p.add_argument("--recipe", help="the recipe executable (default: beside this python, else on PATH)")
    p.add_argument("--baseline", metavar="PATH",
                   help="another recipe executable (e.g. an earlier commit's) timed in the same rounds")
    p.add_argument("--no-mergekit", action="store_true", help="skip mergekit-yaml even if installed")
    p.add_argument("--regenerate", action="store_true", help="rebuild the synthetic model even if cached")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or set(variants) - {"copy", "convert", "first"}:
        p.error("--variants takes copy, convert and/or first")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    global SPEC, MODEL_DIR
    spec = choose_spec(args.size)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / f"llama-h{spec.shape['hidden_size']}-l{spec.layers}"
    dest = workdir / "out"
    SPEC, MODEL_DIR = spec, model
    clear(dest)

    # disk: the model (if not cached) plus one output at a time, with slack
    need = int(spec.nbytes * 1.15) + (0 if cached(spec, model) and not args.regenerate else spec.nbytes)
    free = shutil.disk_usage(workdir).free
    if free < need:
        sys.exit(f"not enough free disk in {workdir}: need about {human(need)}, {human(free)} free")

    log(f"model: {spec.layers} layers, hidden {spec.shape['hidden_size']}, intermediate "
        f"{spec.shape['intermediate_size']}, vocab {VOCAB}: {human(spec.nbytes)} bf16 in {model}")
    if args.regenerate or not cached(spec, model):
        log("generating the synthetic model ...")
        generate(spec, model, log)
    else:
        log("  (cached)")

    index = json.loads((model / "model.safetensors.index.json").read_text())
    inputs = [model / f for f in sorted(set(index["weight_map"].values()))]
    inputs += [model / "config.json", model / "model.safetensors.index.json", model / "generation_config.json"]
    input_bytes = dir_bytes(model)

    recipe_bin = find_recipe(args.recipe)
    recipes = write_recipes(spec, workdir, model)
    mergekit = None if args.no_mergekit else shutil.which("mergekit-yaml")
    mk_configs = write_mergekit_configs(spec, workdir, model) if mergekit else {}
    if not mergekit and not args.no_mergekit:
        log("mergekit-yaml is not on PATH: no mergekit rows")

    fresh = workdir / "fresh-model"
    recipes["first"] = workdir / "drop-first.yaml"
    recipes["first"].write_text(recipes["copy"].read_text().replace(f"base: {os.path.relpath(model, workdir)}",
                                                                    f"base: {fresh.name}"))
    startup = fixed_cost(recipe_bin, recipes["copy"], inputs, workdir, baseline_bin=args.baseline)
    # untimed: remember the hashes of the cached model, so the warm rows are warm from their first round
    subprocess.run([recipe_bin, "run", str(recipes["copy"]), "-o", str(dest), "-q", "--overwrite"], check=True,
                   env=CHILD_ENV)

    rows_by_variant: dict[str, list[Row]] = {}
    for variant in variants:
        recipe = recipes["copy" if variant == "first" else variant]
        rows = [Row(variant, "cp", ["cp", "-r", str(model), str(dest)]),
                Row(variant, "recipe", [recipe_bin, "run", str(recipe), "-o", str(dest), "-q", "--overwrite"])]
        if variant == "first":
            rows += [Row(variant, "first run", [recipe_bin, "run", str(recipes["first"]), "-o", str(dest), "-q"],
                         fresh=True),
                     Row(variant, "no-lock", [recipe_bin, "run", str(recipe), "-o", str(dest), "-q", "--no-lock"])]
        if args.baseline:
            rows.append(Row(variant, "baseline", [args.baseline, "run", str(recipe), "-o", str(dest), "-q",
                                                  "--overwrite"]))
            if variant == "first":
                rows.append(Row(variant, "base first", [args.baseline, "run", str(recipes["first"]), "-o",
                                                        str(dest), "-q"], fresh=True))
        if mergekit and variant in mk_configs:
            rows.append(Row(variant, "mergekit", [mergekit, str(mk_configs[variant]), str(dest),
                                                  "--out-shard-size", "2B", "--lazy-unpickle"]))
        log(f"timing {variant}: {args.repeats} rounds of " + ", ".join(r.tool for r in rows))
        bench_variant(rows, inputs, input_bytes, dest, workdir, args.repeats, args.settle, log,
                      fresh=fresh if variant == "first" else None)
        rows_by_variant[variant] = rows

    text, data = report(rows_by_variant, spec, startup, args.settle)
    print(text)
    if args.json:
        doc = {
            "benchmark": "passthrough",
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
            "model": {"dir": str(model), "bytes": spec.nbytes, "dir_bytes": input_bytes, "layers": spec.layers,
                      "dropped": list(spec.drop), "largest_tensor_bytes": spec.largest_tensor,
                      "shards": len(inputs) - 3, **spec.shape, "vocab_size": VOCAB},
            "repeats": args.repeats,
            "settle_s": args.settle,
            "targets": {"ratio_vs_cp": RATIO_TARGET, "copy_rss_mb": COPY_RSS_TARGET_MB,
                        "convert_rss_mb": CONVERT_RSS_BASE_MB + 2 * spec.largest_tensor / 1e6},
            "fixed_cost": startup,
            "variants": data,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {args.json}")
    failed = any(r.error for rows in rows_by_variant.values() for r in rows if r.tool != "mergekit")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
