#!/usr/bin/env python3
"""`--device cuda` on a real GPU: every merge method, demo recipe and measuring command against the CPU, and the
merge timings of both.

A verification script, not a test: CI has no GPU, and tests/simulated_cuda.py already checks there that the
device paths keep every tensor on the device and give the CPU's bytes. What only a GPU can show is CUDA's own
arithmetic (other reduction orders, other kernels), its dtype support, its determinism and its speed. Stages:

1. `merge`: three small synthetic bf16 Llamas (`--small`); every method's mergekit-yaml config (the ones
   benchmarks/merge.py uses) in float32 and in bfloat16, run in this process on the CPU and twice on the GPU.
   The two GPU runs must write the same bytes (the byte-identical promise, on one device); GPU against CPU,
   every tensor must agree to `TOLERANCE` of its largest |value| (dtype by dtype), except for methods that rank
   magnitudes (`RANKING`), where entries tied at a threshold may fall the other way: at most 1e-3 of the entries.
   Seeded methods draw on the CPU (`engine/core/kernels.generator`), so their masks are the CPU's too.
2. `measure`: `recipe analyze` (snr, angular, bi, super-weights --verify), `recipe eval` (a model and a recipe)
   and `recipe analyze-routing` on the demo models, `--json`: the same keys, integers and strings, floats to
   a relative 1e-3.
3. `recipes`: every recipe under recipes/ on the CPU and on the GPU: the same files, the same tensor names,
   tensors as in stage 1 (a recipe that trains: to a relative 1e-2, since rounding differences grow over
   the optimiser's steps).
4. `timing`: linear (two models) and ties (base plus one) of models of about `--size` bytes in bfloat16, each
   `--repeats` times per device after one untimed run each, alternating, in child processes: median wall
   time and peak RSS (the GPU run's RSS holds CUDA's own libraries).

Prints a table, writes `--json FILE`, exits 1 if anything disagrees. `--simulate` runs it all on the stand-in
device of tests/simulated_cuda.py (a dry run of this script on a CPU-only machine; its timings mean nothing).
How to run it on a lent GPU machine: benchmarks/README.md, "gpu_check.py".

    python benchmarks/gpu_check.py --json gpu_check.json
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from merge import METHODS, config_for, timed_rounds  # noqa: E402
from moe import generate_expert, read_tensors  # noqa: E402
from passthrough import choose_spec, clear, human, parse_size, timed  # noqa: E402

# methods that keep or drop entries by comparing magnitudes with a threshold or a rank
RANKING = {"ties", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "ram",
           "ramplus_tl", "arcee_fusion"}
TOLERANCE = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}  # of a tensor's largest |value|; bf16: ~ one ulp
TRAINED_TOLERANCE = 1e-2
TIED_FRACTION = 1e-3
DEMO = ROOT / "recipes" / "demo"
TEXT = str(DEMO / "heldout.txt")
MEASURES = {
    "snr": ["analyze", "{model}", "--metric", "snr"],
    "angular": ["analyze", "{model}", "--metric", "angular", "--text", TEXT, "--max-texts", "8"],
    "bi": ["analyze", "{model}", "--metric", "bi", "--text", TEXT, "--max-texts", "8"],
    "super-weights": ["analyze", "{sw}", "--metric", "super-weights", "--verify", "--text", TEXT],
    "eval": ["eval", "{model}", "--text", TEXT, "--seq-len", "64"],
    "eval-recipe": ["eval", str(DEMO / "story-merge-ties.yaml"), "--text", TEXT, "--seq-len", "64"],
    "analyze-routing": ["analyze-routing", "{moe}", "--text", TEXT, "--max-texts", "8"],
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Device:
    """Where the `cuda` runs go: the real GPU, or the stand-in of tests/simulated_cuda.py."""

    def __init__(self, simulate: bool):
        import torch

        self.simulate = simulate
        if simulate:
            sys.path.insert(0, str(ROOT))
            from tests.simulated_cuda import simulated_cuda

            self._context = simulated_cuda
            self.name = "simulated (tests/simulated_cuda.py, computes on the CPU)"
        else:
            if not torch.cuda.is_available():
                raise SystemExit("gpu_check: torch sees no CUDA device (pass --simulate for a dry run)")
            self._context = contextlib.nullcontext
            self.name = torch.cuda.get_device_name(0)
        self.peak_bytes = 0

    @contextlib.contextmanager
    def active(self):
        """A block whose `--device cuda` runs reach the device; records the device memory they peaked at."""
        import torch

        if not self.simulate:
            torch.cuda.reset_peak_memory_stats()
        with self._context():
            yield
        if not self.simulate:
            torch.cuda.synchronize()
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated())


def cli(argv: list[str]) -> str:
    """Run `recipe ARGV` in this process; what it printed (it must exit 0)."""
    from recipekit.engine.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"gpu_check: `recipe {' '.join(argv)}` exited {code}")
    return out.getvalue()


def run_both(argv: list[str], out: Path, device: Device, twice: bool = False) -> list[Path]:
    """`recipe run ARGV -o OUT.cpu`, then on the device `-o OUT.cuda` (and `OUT.cuda2`): the output folders."""
    outs = [out.with_suffix(".cpu"), out.with_suffix(".cuda")] + ([out.with_suffix(".cuda2")] if twice else [])
    for o in outs:
        clear(o)
    cli(["run", *argv, "-o", str(outs[0]), "-q"])
    with device.active():
        for o in outs[1:]:
            cli(["run", *argv, "-o", str(o), "-q", "--device", "cuda"])
    return outs


def files_of(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def compare(cpu: Path, gpu: Path, ranking: bool, trained: bool = False) -> dict:
    """GPU output against the CPU's: files other than weights byte for byte, tensors to a tolerance."""
    import torch

    a, b = files_of(cpu), files_of(gpu)
    other = sorted(n for n in set(a) | set(b) if not n.endswith(".safetensors") and a.get(n) != b.get(n))
    ta, tb = read_tensors(cpu), read_tensors(gpu)
    result = {"files_differ": other, "tensors": len(ta), "exact": 0, "max_rel_diff": 0.0, "worst_tensor": "",
              "differing_fraction": 0.0}
    if sorted(ta) != sorted(tb):
        return {**result, "error": f"tensor names differ: {sorted(set(ta) ^ set(tb))[:4]}", "ok": False}
    differ = total = 0
    within = True
    for name, x in ta.items():
        y = tb[name]
        total += x.numel()
        if torch.equal(x, y):
            result["exact"] += 1
            continue
        tol = TRAINED_TOLERANCE if trained else TOLERANCE.get(str(x.dtype).removeprefix("torch."), 0.0)
        x, y = x.double(), y.double()
        scale = float(x.abs().max()) or 1.0
        rel = float((x - y).abs().max()) / scale
        differ += int(((x - y).abs() > tol * scale).sum())
        within = within and rel <= tol
        if rel > result["max_rel_diff"]:
            result["max_rel_diff"], result["worst_tensor"] = rel, name
    result["differing_fraction"] = differ / max(total, 1)
    tied = ranking and result["differing_fraction"] <= TIED_FRACTION
    result["ok"] = not other and (within or tied)
    return result


def stage_merge(workdir: Path, small: int, device: Device, methods: list[str]) -> dict:
    spec = choose_spec(small)
    models = [workdir / f"small-{k}" for k in range(3)]
    for k, m in enumerate(models):
        generate_expert(spec, m, 100 + k, log)
    results = {}
    for dtype in ("float32", "bfloat16"):
        for method in methods:
            config = workdir / f"merge-{method}-{dtype}.yml"
            config.write_text(json.dumps(config_for(method, models, dtype), indent=2))
            cpu, gpu, again = run_both([str(config)], workdir / "merge-out", device, twice=True)
            result = compare(cpu, gpu, method in RANKING)
            result["repeatable"] = files_of(gpu) == files_of(again)
            result["ok"] = result["ok"] and result["repeatable"]
            results[f"{method} {dtype}"] = result
            log(f"  merge {method} {dtype}: {summary(result)}")
    return results


def close(a, b, path: str = "") -> list[str]:
    """Where two JSON values differ: keys, strings and integers exactly, floats to a relative 1e-3."""
    if isinstance(a, dict) and isinstance(b, dict):
        if sorted(a) != sorted(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in close(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} against {len(b)} items"]
        return [d for k, (x, y) in enumerate(zip(a, b)) for d in close(x, y, f"{path}[{k}]")]
    if isinstance(a, float) or isinstance(b, float):
        ok = isinstance(b, (int, float)) and abs(a - b) <= 1e-3 * max(abs(a), abs(b)) + 1e-9
        return [] if ok else [f"{path}: {a!r} against {b!r}"]
    return [] if a == b else [f"{path}: {a!r} against {b!r}"]


def stage_measure(workdir: Path, device: Device) -> dict:
    moe = workdir / "measure-moe"
    clear(moe)
    cli(["run", str(DEMO / "moe-from-prompts.yaml"), "-o", str(moe), "-q"])
    fill = {"model": DEMO / "models" / "tiny-story", "sw": DEMO / "models" / "tiny-story-sw", "moe": moe}
    results = {}
    for name, argv in MEASURES.items():
        args = [a.format(**fill) for a in argv] + ["--json", "-q"]
        on_cpu = json.loads(cli(args))
        with device.active():
            on_gpu = json.loads(cli([*args, "--device", "cuda"]))
        differences = close(on_cpu, on_gpu)
        results[name] = {"differences": differences[:10], "count": len(differences), "ok": not differences}
        log(f"  measure {name}: {len(differences)} differences {differences[:3]}")
    return results


def stage_recipes(workdir: Path, device: Device) -> dict:
    results = {}
    for path in sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "models" not in p.parts):
        text = path.read_text()
        cpu, gpu = run_both([str(path)], workdir / "recipe-out", device)
        methods = set(re.findall(r"method:\s*(\w+)", text))
        result = compare(cpu, gpu, ranking=bool(methods & RANKING), trained="heal" in text)
        results[str(path.relative_to(ROOT))] = result
        log(f"  recipe {path.relative_to(ROOT)}: {summary(result)}")
    return results


CHILD = ("import sys\nsys.argv[0] = 'recipe'\n{enter}from recipekit.engine.entry import main\n{call}")


def stage_timing(workdir: Path, size: int, repeats: int, device: Device) -> dict:
    spec = choose_spec(size)
    models = [workdir / f"large-{k}" for k in range(2)]
    for k, m in enumerate(models):
        generate_expert(spec, m, 200 + k, log)
    inputs = [f for m in models for f in m.glob("*.safetensors")]
    plain = CHILD.format(enter="", call="main()\n")
    on_device = plain
    if device.simulate:  # the device's child enters the stand-in device itself
        on_device = CHILD.format(enter=f"sys.path.insert(0, {str(ROOT)!r})\nfrom tests.simulated_cuda import "
                                       "simulated_cuda\n", call="with simulated_cuda():\n    main()\n")
    results = {}
    for method in ("linear", "ties"):
        config = workdir / f"timed-{method}.yml"
        # config_for takes (base, a, b); the first two entries are linear's a and b, ties' base and a
        order = [models[0], models[0], models[1]] if method == "linear" else [models[0], models[1], models[1]]
        data = config_for(method, order, "bfloat16")
        data["models"] = data["models"][:2]
        config.write_text(json.dumps(data, indent=2))
        out = workdir / "timed-out"
        argv = ["run", str(config), "-o", str(out), "-q", "--overwrite"]
        sides = {"cpu": [sys.executable, "-c", plain, *argv],
                 "cuda": [sys.executable, "-c", on_device, *argv, "--device", "cuda"]}
        for side, command in sides.items():  # untimed: the lock's first hashing, CUDA's start-up caches
            clear(out)
            if timed(command, workdir)[2] != 0:
                raise SystemExit(f"gpu_check: {method} on {side} failed")
        results[method] = timed_rounds(sides, repeats, out, inputs, workdir, f"timing {method}", settle=2.0)
        results[method]["cuda_vs_cpu_wall"] = (results[method]["cuda"]["median_wall_s"]
                                               / results[method]["cpu"]["median_wall_s"])
    return {"model_bytes": spec.nbytes, "repeats": repeats, **results}


def summary(r: dict) -> str:
    verdict = "ok" if r["ok"] else "DIFFERENT"
    extra = f", files differ: {r['files_differ']}" if r.get("files_differ") else ""
    extra += f", {r['error']}" if r.get("error") else ""
    extra += "" if r.get("repeatable", True) else ", two GPU runs differ"
    return (f"{r['exact']}/{r['tensors']} tensors exact, max |diff| / max |value| {r['max_rel_diff']:.2e} "
            f"({r['worst_tensor'] or '-'}), beyond tolerance {r['differing_fraction']:.1e}{extra}  {verdict}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--simulate", action="store_true", help="use tests/simulated_cuda.py instead of a GPU")
    p.add_argument("--stages", default="merge,measure,recipes,timing", help="comma list (default: all four)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list for the merge stage")
    p.add_argument("--small", type=parse_size, default=parse_size("30MB"), help="model size for the merge stage")
    p.add_argument("--size", type=parse_size, default=parse_size("1.7GB"), help="model size for the timed merges")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rk-gpu-check")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import torch

    device = Device(args.simulate)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    results: dict = {"device": device.name, "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                     "cores": os.cpu_count()}
    log(f"gpu_check on {device.name}, torch {torch.__version__}")
    started = time.perf_counter()
    if "merge" in stages:
        results["merge"] = stage_merge(workdir, args.small, device, [m.strip() for m in args.methods.split(",")])
    if "measure" in stages:
        results["measure"] = stage_measure(workdir, device)
    if "recipes" in stages:
        results["recipes"] = stage_recipes(workdir, device)
    results["device_peak_mb"] = device.peak_bytes / 1e6 if not device.simulate else None
    if "timing" in stages:
        results["timing"] = stage_timing(workdir, args.size, args.repeats, device)
    results["seconds"] = time.perf_counter() - started

    failed = [f"{stage} {name}" for stage in ("merge", "measure", "recipes")
              for name, r in results.get(stage, {}).items() if not r["ok"]]
    print(f"gpu_check on {device.name} (torch {torch.__version__}), {results['seconds']:.0f} s")
    for stage in ("merge", "measure", "recipes"):
        if stage in results:
            good = sum(r["ok"] for r in results[stage].values())
            print(f"  {stage}: {good}/{len(results[stage])} agree with the CPU")
    if results["device_peak_mb"] is not None:
        print(f"  device memory peak over the in-process runs: {results['device_peak_mb']:.0f} MB")
    for method in ("linear", "ties"):
        if method in results.get("timing", {}):
            t = results["timing"][method]
            print(f"  timing {method} ({human(results['timing']['model_bytes'])} bf16): cpu "
                  f"{t['cpu']['median_wall_s']:.2f} s {t['cpu']['peak_rss_mb']:.0f} MB | cuda "
                  f"{t['cuda']['median_wall_s']:.2f} s {t['cuda']['peak_rss_mb']:.0f} MB | cuda / cpu wall "
                  f"{t['cuda_vs_cpu_wall']:.2f}")
    for name in failed:
        print(f"  DIFFERENT: {name}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
