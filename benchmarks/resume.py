#!/usr/bin/env python3
"""Kill `recipe run` with SIGKILL at random moments, finish it with `--resume`, and compare with an uninterrupted run.

A verification script, not a test: CI never runs it. It generates (once, cached) the synthetic bf16 Llama of
`passthrough.py`, writes a recipe that drops 4 layers and converts to float16 (so tensors pass through Python,
not only the kernel) with `shard_size` small enough for several shards, then

1. times an uninterrupted run and hashes its files;
2. for each of --kills moments (seeded, uniform over 10%..95% of the uninterrupted run's wall time): starts the
   run, SIGKILLs it at that moment, times `recipe run ... --resume`, and checks every file is byte-identical
   to the uninterrupted run's;
3. prints, per kill: when it struck, the bytes the resume kept (work skipped), the resume's wall time against
   the uninterrupted run's.

    python benchmarks/resume.py --size 1.7GB --shard-size 400MB --kills 3
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from passthrough import (CHILD_ENV, DROPPED, cached, choose_spec, find_recipe, generate, human,  # noqa: E402
                         parse_size, warm_cache)


def digest(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.iterdir()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(2**24):
                h.update(chunk)
        out[path.name] = h.hexdigest()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("1.7GB"))
    p.add_argument("--shard-size", default="400MB", help="the output's shard_size (default: %(default)s)")
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rk-bench")
    p.add_argument("--recipe", help="the recipe executable (default: beside this python, else on PATH)")
    args = p.parse_args()
    recipe_bin = find_recipe(args.recipe)
    spec = choose_spec(args.size)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / f"llama-h{spec.shape['hidden_size']}-l{spec.layers}"
    if not cached(spec, model):
        generate(spec, model, lambda m: print(m, file=sys.stderr))
    a, b = spec.drop
    recipe = workdir / "resume.yaml"
    recipe.write_text(f"recipe: 1\nmodels:\n  base: {model.name}\nsteps:\n  - op: drop_layers\n    model: base\n"
                      f"    layers: [[{a}, {b}]]\noutput:\n  dtype: float16\n  shard_size: {args.shard_size}\n")
    inputs = sorted(model.glob("*.safetensors"))
    out = workdir / "resume-out"
    partial = workdir / f".{out.name}.recipekit-partial"

    def clean() -> None:
        for path in (out, partial):
            shutil.rmtree(path, ignore_errors=True)

    walls = []
    for _ in range(2):  # the second is the figure: the first may hash the inputs for the lock
        clean()
        warm_cache(inputs)
        start = time.perf_counter()
        subprocess.run([recipe_bin, "run", str(recipe), "-o", str(out), "-q"], check=True, env=CHILD_ENV)
        walls.append(time.perf_counter() - start)
    full = walls[-1]
    expected = digest(out)
    shards = sum(1 for name in expected if name.endswith(".safetensors"))
    print(f"model {human(spec.nbytes)} ({spec.layers} layers, {DROPPED} dropped, bf16 -> fp16), output "
          f"{shards} shards of <= {args.shard_size}; uninterrupted run {full:.2f} s")
    rng = random.Random(args.seed)
    rows = []
    for k in range(args.kills):
        clean()
        at = rng.uniform(0.1, 0.95) * full
        warm_cache(inputs)
        proc = subprocess.Popen([recipe_bin, "run", str(recipe), "-o", str(out), "-q"], env=CHILD_ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(at)
        if proc.poll() is not None:
            print(f"kill {k + 1}: the run had finished before {at:.2f} s; not counted")
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        warm_cache(inputs)
        start = time.perf_counter()
        done = subprocess.run([recipe_bin, "run", str(recipe), "-o", str(out), "-q", "--resume"], check=True,
                              env=CHILD_ENV, capture_output=True, text=True)
        wall = time.perf_counter() - start
        kept = re.search(r"--resume: (kept [^;\n]*)", done.stderr)
        same = digest(out) == expected
        rows.append((at, kept.group(1) if kept else "?", wall, same))
        print(f"kill {k + 1}: SIGKILL at {at:.2f} s ({at / full:.0%} of the run); resume {kept.group(1) if kept else '?'}"
              f"; resume took {wall:.2f} s ({wall / full:.2f}x the uninterrupted run); byte-identical: {same}")
    clean()
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parent)
    sys.exit(main())
