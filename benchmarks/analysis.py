#!/usr/bin/env python3
"""Benchmark the analyses that read weights or run the model: time and peak RSS.

A benchmark, not a test: CI never runs it. It

1. generates (once, cached in --workdir) a 7B-shaped set of `v_proj`
   matrices: 32 layers of bf16 [1024, 4096] (what Llama-2-7B-style GQA models
   hold), as a model directory with nothing else in its layers, and times
   `recipe analyze DIR --metric snr --module self_attn.v_proj`;
2. generates a synthetic Llama of about --size bytes (the generator of
   `passthrough.py`) with a character-level tokenizer, and times `recipe
   analyze DIR --metric super-weights` on it;
3. prints seconds and peak RSS (`/usr/bin/time -v`) for each, with the size
   of one decoder layer (in the model's dtype and as float32, which the
   forward computes in) for comparison. Medians of --repeats runs.

    python benchmarks/analysis.py --size 2GB --repeats 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe import log, write_tokenizer  # noqa: E402
from passthrough import (  # noqa: E402
    _bf16_block,
    _safetensors_header,
    cached,
    choose_spec,
    generate,
    human,
    parse_size,
    timed,
    warm_cache,
)

V_LAYERS, V_SHAPE = 32, (1024, 4096)


def v_proj_set(root: Path) -> Path:
    """32 bf16 v_proj matrices of a 7B-shaped model, in one safetensors file with a config."""
    if (root / "model.safetensors").is_file():
        return root
    import random

    root.mkdir(parents=True, exist_ok=True)
    entries = [(f"model.layers.{i}.self_attn.v_proj.weight", V_SHAPE) for i in range(V_LAYERS)]
    block = _bf16_block(random.Random(5), (1 << 20) + 7, 0.0, 0.02)
    count = V_SHAPE[0] * V_SHAPE[1]
    with open(root / "model.safetensors", "wb") as f:
        f.write(_safetensors_header(entries))
        for k in range(V_LAYERS):
            left, at = 2 * count, 2 * ((k * 4099) % (len(block) // 2))
            while left:  # a different window of the block per matrix
                piece = (block[at:] + block[:at])[:left]
                f.write(piece)
                left -= len(piece)
    (root / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
        "num_hidden_layers": V_LAYERS, "num_attention_heads": 32, "num_key_value_heads": 8}))
    return root


def measure(argv: list[str], inputs: list[Path], workdir: Path, repeats: int, log) -> dict:
    walls, peaks = [], []
    for k in range(repeats):
        warm_cache(inputs)
        wall, rss, rc, err = timed(argv, workdir)
        if rc != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({rc}):\n{err}")
        walls.append(wall)
        peaks.append(rss)
        log(f"  #{k + 1}: {wall:.2f} s, {rss:.0f} MB")
    return {"wall_s": statistics.median(walls), "peak_rss_mb": max(peaks), "walls": walls}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2GB", help="size of the model for super-weights (default 2GB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rk-bench-analysis")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    recipe = str(Path(sys.executable).parent / "recipe")
    results = {}

    vset = v_proj_set(workdir / "v-proj-7b")
    log(f"snr: {V_LAYERS} v_proj matrices of {list(V_SHAPE)} bf16 ({human(2 * V_LAYERS * V_SHAPE[0] * V_SHAPE[1])})")
    results["snr"] = measure([recipe, "analyze", str(vset), "--metric", "snr", "--module", "self_attn.v_proj",
                              "--json"], [vset / "model.safetensors"], workdir, args.repeats, log)
    results["snr"]["matrix_bytes"] = 2 * V_SHAPE[0] * V_SHAPE[1]

    spec = choose_spec(parse_size(args.size))
    model = workdir / f"llama-h{spec.shape['hidden_size']}-l{spec.layers}"
    if not cached(spec, model):
        generate(spec, model, log)
    write_tokenizer(model)
    log(f"super-weights: {human(spec.nbytes)} ({spec.layers} layers, one layer {human(spec.layer_bytes)} bf16)")
    results["super_weights"] = measure([recipe, "analyze", str(model), "--metric", "super-weights", "--json"],
                                       sorted(model.glob("*.safetensors")), workdir, args.repeats, log)
    results["super_weights"].update(model_bytes=spec.nbytes, layer_bytes=spec.layer_bytes,
                                    layer_bytes_float32=2 * spec.layer_bytes)

    snr, sw = results["snr"], results["super_weights"]
    print(f"analyze --metric snr, {V_LAYERS} x {list(V_SHAPE)} bf16: {snr['wall_s']:.2f} s, peak RSS "
          f"{snr['peak_rss_mb']:.0f} MB (one matrix: {human(snr['matrix_bytes'])})")
    print(f"analyze --metric super-weights, {human(sw['model_bytes'])} model: {sw['wall_s']:.2f} s, peak RSS "
          f"{sw['peak_rss_mb']:.0f} MB (one layer: {human(sw['layer_bytes'])} bf16, "
          f"{human(sw['layer_bytes_float32'])} as float32)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
