"""Healing: what it recovers on the demo model, what it costs, and that blockwise memory is flat in depth.

    python benchmarks/heal.py demo               # both modes on tiny-story: perplexity, CPU time, peak RSS
    python benchmarks/heal.py depth 4 16         # blockwise peak RSS on generated models of 4 and 16 layers

Each run is `recipe run` in its own process under `/usr/bin/time -v` (CPU time = user + sys, peak RSS).

`demo` runs recipes/demo/story-prune-and-heal.yaml (blockwise) and the same recipe with `mode: end_to_end`
(KL to the original's logits; `--e2e-steps`, `--e2e-lr`), and reads the held-out perplexities the card records.

`depth` generates Llama models (transformers, random init, hidden 768, MLP 3072, the demo tokenizer) of each
depth under --work, drops the middle layer and heals every layer blockwise for a few steps on the demo's
training text: the weights grow with depth, the peak should not.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo"


def timed_run(recipe: Path, out: Path) -> dict:
    """`recipe run` under /usr/bin/time -v: CPU seconds, wall seconds, peak RSS (MB)."""
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "recipekit.engine.cli", "run", str(recipe),
                           "-o", str(out), "-q", "--overwrite"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    field = lambda name: re.search(rf"{name}: (.+)", proc.stderr)[1]  # noqa: E731
    wall = [float(x) for x in field(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\)").split(":")]
    return {"cpu_s": float(field("User time \\(seconds\\)")) + float(field("System time \\(seconds\\)")),
            "wall_s": sum(x * 60 ** i for i, x in enumerate(reversed(wall))),
            "peak_rss_mb": int(field("Maximum resident set size \\(kbytes\\)")) / 1024}


def perplexities(out: Path) -> str:
    return re.search(r"held-out perplexity on heldout.txt: ([\d.]+ -> [\d.]+)", (out / "README.md").read_text())[1]


def demo(args, work: Path) -> None:
    blockwise = DEMO / "story-prune-and-heal.yaml"
    text = blockwise.read_text().replace("mode: blockwise", "mode: end_to_end")
    text = re.sub(r"steps: \d+", f"steps: {args.e2e_steps}", text)
    text = re.sub(r"lr: \S+", f"lr: {args.e2e_lr}", text)
    end_to_end = DEMO / ".bench-heal-end-to-end.yaml"  # beside the demo: its relative paths resolve there
    end_to_end.write_text(text)
    try:
        for name, recipe in (("blockwise", blockwise), ("end_to_end", end_to_end)):
            figures = timed_run(recipe, work / name)
            print(f"{name:11s} held-out perplexity {perplexities(work / name)}  cpu {figures['cpu_s']:.1f} s  "
                  f"wall {figures['wall_s']:.1f} s  peak RSS {figures['peak_rss_mb']:.0f} MB", flush=True)
    finally:
        end_to_end.unlink()


def make_model(path: Path, layers: int) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                      num_key_value_heads=4, num_hidden_layers=layers, vocab_size=2048,
                                      max_position_embeddings=512)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / "models" / "tiny-story" / name, path / name)


def depth(args, work: Path) -> None:
    shutil.copy(DEMO / "heal-train.txt", work / "train.txt")
    for layers in args.layers:
        model = work / f"llama-l{layers}"
        if not model.exists():
            make_model(model, layers)
        size = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20
        recipe = work / f"heal-l{layers}.yaml"
        recipe.write_text(f"""recipe: 1
models:
  base: {model}
steps:
  - id: pruned
    op: drop_layers
    model: base
    layers: [{layers // 2}]
  - op: heal
    model: pruned
    teacher: base
    text: train.txt
    steps: {args.steps}
    seq_len: 128
    batch_size: 2
    max_windows: 8
""")
        figures = timed_run(recipe, work / f"healed-l{layers}")
        print(f"{layers:3d} layers ({size:.0f} MB of weights): cpu {figures['cpu_s']:.1f} s  wall "
              f"{figures['wall_s']:.1f} s  peak RSS {figures['peak_rss_mb']:.0f} MB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    d = sub.add_parser("demo")
    d.add_argument("--e2e-steps", type=int, default=60)
    d.add_argument("--e2e-lr", default="1e-3")
    g = sub.add_parser("depth")
    g.add_argument("layers", type=int, nargs="+")
    g.add_argument("--steps", type=int, default=2)
    for p in (d, g):
        p.add_argument("--work", type=Path, default=None, help="where models and outputs go (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="rk-heal-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    (demo if args.what == "demo" else depth)(args, work)


if __name__ == "__main__":
    main()
