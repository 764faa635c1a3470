#!/usr/bin/env python3
"""What each merge kernel holds beyond its inputs, against what the planner assumes (`Op.scratch`).

A benchmark, not a test: CI never runs it. For every merge method and a few model counts it runs the kernel
once in a fresh process on bf16 inputs of `--shape`, computing in float32, and reads the process's peak RSS
(VmHWM, reset just before the call). It prints the measured working copies (in units of one float32 copy of the
tensor) beside the declared ones, and exits 1 when a kernel holds more than it declares: the declared figures
are what `recipe plan` promises and what the writer's admission budgets by.

    python benchmarks/kernel_memory.py --shape 16000x2048
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

MEASURE = r"""
import json, re, sys, torch
from recipekit.ops.registry import KERNELS

def status(key):
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read())[1]) * 1024

method, count, rows, cols = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
inputs = [torch.randn(rows, cols).bfloat16() for _ in range(count)]
o = count - 1
tv = dict(weights=(0.5,) * o, densities=(0.5,) * o, normalize=True, name="t")
params = {
    "linear": dict(weights=(1 / count,) * count, normalize=True), "slerp": dict(t=0.5), "nearswap": dict(t=0.5),
    "model_stock": dict(filter_wise=False), "sce": dict(select_topk=0.5), "ram": dict(epsilon=1e-5),
    "ramplus_tl": dict(r=0.1, alpha=0.2, epsilon=1e-5), "arcee_fusion": dict(seed=0, name="t"),
    "nuslerp": dict(weights=(0.5, 0.5), nuslerp_flatten=True, nuslerp_row_wise=False, base=count == 3),
    "multislerp": dict(weights=(0.5,) * o, normalize_weights=True, eps=1e-8, base=True),
    "karcher": dict(max_iter=10, tol=1e-5), "task_arithmetic": tv, "ties": tv, "dare_ties": tv,
    "dare_linear": tv, "breadcrumbs": dict(tv, gammas=(0.01,) * o), "breadcrumbs_ties": dict(tv, gammas=(0.01,) * o),
    "della": dict(tv, epsilons=(0.15,) * o), "della_linear": dict(tv, epsilons=(0.15,) * o),
}[method]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM starts again from the current RSS
start = status("VmRSS")
KERNELS[method](*inputs, **params, compute_dtype="F32")
print(json.dumps((status("VmHWM") - start) / (4 * rows * cols)))
"""

# how many models each method is measured with (inputs, the base included where it takes one)
COUNTS = {"slerp": (2,), "nearswap": (2,), "arcee_fusion": (2,), "nuslerp": (2, 3)}


def main() -> int:
    from recipekit.ops.merge.methods import METHODS
    from recipekit.ops.registry import SCRATCH

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="16000x2048", help="ROWSxCOLS of each input (default 16000x2048: at "
                   "small shapes the allocator's own slack shows as extra copies)")
    p.add_argument("--methods", default="all", help="comma list (default: every method)")
    args = p.parse_args()
    rows, cols = (int(v) for v in args.shape.split("x"))
    methods = [m for m in METHODS if m != "passthrough"] if args.methods == "all" else args.methods.split(",")
    over = []
    print(f"{'method':18s} {'inputs':>6s} {'measured':>9s} {'declared':>9s}")
    for method in methods:
        for count in COUNTS.get(method, (3, 5)):
            result = subprocess.run([sys.executable, "-c", MEASURE, method, str(count), str(rows), str(cols)],
                                    capture_output=True, text=True, check=True)
            measured = json.loads(result.stdout)
            per_input, fixed = SCRATCH.get(method, (1.0, 1.0))
            declared = per_input * count + fixed
            flag = "" if measured <= declared else "  <- more than declared"
            over += [method] if flag else []
            print(f"{method:18s} {count:6d} {measured:9.1f} {declared:9.1f}{flag}", flush=True)
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
