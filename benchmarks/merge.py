#!/usr/bin/env python3
"""Merge methods: recipekit against mergekit-yaml on the same configs, for agreement and for speed.

A benchmark, not a test: CI never runs it. It

1. installs mergekit (pinned, `--mergekit-version`) into its own virtual environment (`--mergekit-venv`);
   on a CPU-only machine pass `--torch torch==2.13.0` so pip does not pull CUDA wheels;
2. agreement: generates three small synthetic bf16 Llamas (`--small`, distinct seeds), writes one
   mergekit-yaml config per method with `dtype: float32`, runs each through `recipe run` and `mergekit-yaml`
   and compares every tensor: for methods without randomness the largest |difference| relative to the
   tensor's largest |value| (target 1e-5); for seeded ones (dare_*, della*), whose masks come from different
   generators, the fraction of entries that moved off the base and the mean and spread of the moves;
3. speed: generates models of about `--size` bytes and times, alternating, linear (two models) and ties (base
   plus one) with `dtype: bfloat16` (both tools compute and write in bf16) through both tools, reading the inputs
   into the page cache before each timed run, with peak RSS from `/usr/bin/time -v`; beside them, in the same
   rounds, `cp -r` of one input model (the output's size): what writing those bytes costs the disk right then;
4. vocabularies (`--skip-vocabulary` leaves it out): copies of two of the small models get word-level tokenizers
   that differ (shared words at other ids, words and an added token of each one's own), and a linear merge with
   `tokenizer_source: union` runs through both tools; every embedding and lm_head row is compared by token,
   looked up through each output's own tokenizer.json (the two tools number the new tokens differently);
5. prints the table and the ratios recipekit / mergekit (`--json FILE` too).

    python benchmarks/merge.py --size 1.7GB --repeats 3 --torch torch==2.13.0
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe import ensure_mergekit, generate_expert, read_tensors  # noqa: E402
from passthrough import choose_spec, clear, find_recipe, human, parse_size, timed, warm_cache  # noqa: E402

METHODS = ("linear", "passthrough", "slerp", "nuslerp", "multislerp", "karcher", "nearswap", "model_stock",
           "arcee_fusion", "sce", "ram", "ramplus_tl", "task_arithmetic", "ties", "dare_ties", "dare_linear",
           "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
SEEDED = ("dare_ties", "dare_linear", "della", "della_linear", "arcee_fusion")
TIMED = ("linear", "ties")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def config_for(method: str, models: list[Path], dtype: str) -> dict:
    """A mergekit-yaml config of `method` over the base `models[0]` and the others, with typical parameters."""
    base, a, b = (str(m) for m in models)
    two = [{"model": a, "parameters": {"weight": 0.6, "density": 0.5}},
           {"model": b, "parameters": {"weight": 0.4, "density": 0.5}}]
    per_method = {
        "linear": dict(models=[{"model": a, "parameters": {"weight": 0.4}},
                               {"model": b, "parameters": {"weight": 0.6}}]),
        "slerp": dict(models=[{"model": base}, {"model": a}], base_model=base, parameters={"t": 0.3}),
        "nearswap": dict(models=[{"model": base}, {"model": a}], base_model=base, parameters={"t": 0.01}),
        "model_stock": dict(models=[{"model": base}, {"model": a}, {"model": b}], base_model=base),
        "task_arithmetic": dict(models=[{"model": base}, *two], base_model=base, parameters={"lambda": 0.8}),
        "ties": dict(models=[{"model": base}, *two], base_model=base),
        "dare_ties": dict(models=[{"model": base}, *two], base_model=base),
        "dare_linear": dict(models=[{"model": base}, *two], base_model=base),
        "breadcrumbs": dict(models=[{"model": base}, *two], base_model=base, parameters={"gamma": 0.05}),
        "breadcrumbs_ties": dict(models=[{"model": base}, *two], base_model=base, parameters={"gamma": 0.05}),
        "della": dict(models=[{"model": base}, *two], base_model=base, parameters={"epsilon": 0.1}),
        "della_linear": dict(models=[{"model": base}, *two], base_model=base, parameters={"epsilon": 0.1}),
        "passthrough": dict(models=[{"model": a, "parameters": {"scale": [{"filter": "mlp", "value": 0.5},
                                                                          {"value": 1.0}]}}]),
        "nuslerp": dict(models=[{"model": base}, {"model": a, "parameters": {"weight": 0.3}},
                                {"model": b, "parameters": {"weight": 0.7}}], base_model=base),
        "multislerp": dict(models=[{"model": a, "parameters": {"weight": 1.0}},
                                   {"model": b, "parameters": {"weight": 2.0}}]),
        "karcher": dict(models=[{"model": base}, {"model": a}, {"model": b}]),
        "sce": dict(models=[{"model": base}, {"model": a}, {"model": b}], base_model=base,
                    parameters={"select_topk": 0.5}),
        "ram": dict(models=[{"model": base}, {"model": a}, {"model": b}], base_model=base),
        "ramplus_tl": dict(models=[{"model": base}, {"model": a}, {"model": b}], base_model=base),
        "arcee_fusion": dict(models=[{"model": base}, {"model": a}], base_model=base),
    }[method]
    return {"merge_method": method, **per_method, "dtype": dtype}


def run(argv: list[str], workdir: Path, inputs: list[Path]) -> tuple[float, float]:
    warm_cache(inputs)
    wall, rss, rc, err = timed(argv, workdir)
    if rc != 0:
        raise SystemExit(f"{' '.join(argv[:3])} ... failed: {err.strip()[-2000:]}")
    return wall, rss


def timed_rounds(rows: dict[str, list[str]], repeats: int, out: Path, inputs: list[Path], workdir: Path,
                 label: str, settle: float = 5.0) -> dict:
    """Each command of `rows` timed `repeats` times, the order rotating so each leads a round in turn; before each,
    outside the timing, `out` removed, `sync`, `settle` seconds and the inputs read into the page cache. Per row:
    the median wall seconds, the peak RSS and every run."""
    runs: dict[str, list[tuple[float, float]]] = {side: [] for side in rows}
    for r in range(repeats):
        for side in list(rows)[r % len(rows):] + list(rows)[:r % len(rows)]:
            clear(out)
            subprocess.run(["sync"], check=False)
            time.sleep(settle)
            runs[side].append(run(rows[side], workdir, inputs))
            log(f"  {label} {side:9} round {r + 1}: {runs[side][-1][0]:.2f}s, {runs[side][-1][1]:.0f} MB")
    clear(out)
    return {side: {"median_wall_s": statistics.median(w for w, _ in rs), "peak_rss_mb": max(m for _, m in rs),
                   "runs": rs} for side, rs in runs.items()}


def agreement(method: str, ours: Path, theirs: Path, base: Path) -> dict:
    import torch

    a, b, origin = read_tensors(ours), read_tensors(theirs), read_tensors(base)
    if sorted(a) != sorted(b):
        return {"error": f"tensor names differ: {sorted(set(a) ^ set(b))[:4]}"}
    if method not in SEEDED:
        worst, where, differ, total = 0.0, "", 0, 0
        for name in a:
            x, y = a[name].float(), b[name].float()
            scale = float(y.abs().max()) or 1.0
            rel = float((x - y).abs().max()) / scale
            differ += int(((x - y).abs() > 1e-5 * scale).sum())
            total += x.numel()
            if rel > worst:
                worst, where = rel, name
        # TIES keeps the top `density` by magnitude; entries exactly at the threshold (common in bf16 data) are
        # broken by torch.topk here and by a full argsort in mergekit, so a few of them differ
        ok = worst <= 1e-5 or (method == "ties" and differ / total < 1e-3)
        return {"max_rel_diff": worst, "worst_tensor": where, "differing_fraction": differ / total, "ok": ok}
    stats = {}
    for side, tensors in (("recipekit", a), ("mergekit", b)):
        moved = total = 0
        moves = []
        for name, t in tensors.items():
            delta = t.float() - origin[name].float()
            changed = delta != 0
            moved += int(changed.sum())
            total += delta.numel()
            if name.endswith("mlp.down_proj.weight"):
                moves.append(delta[changed])
        flat = torch.cat(moves)
        stats[side] = {"moved_fraction": moved / total, "move_mean": float(flat.mean()),
                       "move_std": float(flat.std())}
    r, m = stats["recipekit"], stats["mergekit"]
    stats["ok"] = (abs(r["moved_fraction"] - m["moved_fraction"]) < 0.01
                   and abs(r["move_std"] - m["move_std"]) / m["move_std"] < 0.05)
    return stats


def vocabulary_models(models: list[Path], workdir: Path) -> list[Path]:
    """Copies of two models (weights hard-linked) whose word-level tokenizers differ: the second has the first's
    words backwards after 64 words of its own, and each has one added special token the other lacks."""
    import os

    from tokenizers import AddedToken, Tokenizer, pre_tokenizers
    from tokenizers import models as kinds

    rows = read_tensors(models[0])["model.embed_tokens.weight"].shape[0]
    words = [f"w{i}" for i in range(rows - 2)]
    copies = []
    for k, model in enumerate(models[:2]):
        copy = workdir / f"merge-vocab-{k}"
        clear(copy)
        copy.mkdir()
        for file in model.iterdir():
            if not file.name.startswith("tokenizer"):
                os.link(file, copy / file.name)
        own = words if k == 0 else [f"n{i}" for i in range(64)] + words[64:][::-1]
        tokenizer = Tokenizer(kinds.WordLevel({"<unk>": 0, **{w: i + 1 for i, w in enumerate(own)}}, unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer.add_special_tokens([AddedToken(f"<|only-{k}|>", special=True, normalized=False)])
        tokenizer.save(str(copy / "tokenizer.json"))
        (copy / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
        copies.append(copy)
    return copies


def agreement_by_token(ours: Path, theirs: Path) -> dict:
    """Every row of every output token, found through each output's tokenizer; other tensors by name."""
    from tokenizers import Tokenizer

    a, b = read_tensors(ours), read_tensors(theirs)
    ids = [Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab(with_added_tokens=True) for out in (ours, theirs)]
    if set(ids[0]) != set(ids[1]):
        return {"error": f"the vocabularies differ: {sorted(set(ids[0]) ^ set(ids[1]))[:4]}", "ok": False}
    worst, where = 0.0, ""
    for name in a:
        x, y = a[name].float(), b[name].float()
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            order = sorted(ids[0], key=ids[0].get)
            x, y = x[[ids[0][t] for t in order]], y[[ids[1][t] for t in order]]
        rel = float((x - y).abs().max()) / (float(y.abs().max()) or 1.0)
        if rel > worst:
            worst, where = rel, name
    return {"tokens": len(ids[0]), "max_rel_diff": worst, "worst_tensor": where, "ok": worst <= 1e-5}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=parse_size("1.7GB"), help="model size for the timed runs")
    p.add_argument("--small", type=parse_size, default=parse_size("60MB"), help="model size for agreement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default="all", help="comma list for agreement (default: every method)")
    p.add_argument("--skip-agreement", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-vocabulary", action="store_true")
    p.add_argument("--timed", default=",".join(TIMED), help="comma list of timed merges (default: linear,ties)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rk-bench")
    p.add_argument("--mergekit-venv", type=Path, default=Path(tempfile.gettempdir()) / "rk-bench" / "mergekit-venv")
    p.add_argument("--mergekit-version", default="0.1.5")
    p.add_argument("--torch", help="torch requirement to install into mergekit's venv first (e.g. torch==2.13.0)")
    p.add_argument("--recipe", help="the recipe executable (default: beside this python, else on PATH)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    recipe = find_recipe(args.recipe)
    mergekit = ensure_mergekit(args.mergekit_venv, args.mergekit_version, args.torch, log).parent / "mergekit-yaml"
    results: dict = {"agreement": {}, "timing": {}, "vocabulary": {}}

    if not args.skip_agreement:
        spec = choose_spec(args.small)
        models = [workdir / f"merge-small-{k}" for k in range(3)]
        for k, m in enumerate(models):
            generate_expert(spec, m, 100 + k, log)
        inputs = [f for m in models for f in m.glob("*.safetensors")]
        methods = [m.strip() for m in args.methods.split(",")] if args.methods != "all" else list(METHODS)
        for method in methods:
            config = workdir / f"merge-{method}.yml"
            config.write_text(json.dumps(config_for(method, models, "float32"), indent=2))
            ours, theirs = workdir / "merge-out-recipekit", workdir / "merge-out-mergekit"
            clear(ours), clear(theirs)
            wall_r, rss_r = run([recipe, "run", str(config), "-o", str(ours), "-q"], workdir, inputs)
            wall_m, rss_m = run([str(mergekit), str(config), str(theirs), "--out-shard-size", "2B"], workdir,
                                inputs)
            result = agreement(method, ours, theirs, models[0])
            result.update(recipekit_s=wall_r, mergekit_s=wall_m, recipekit_rss_mb=rss_r, mergekit_rss_mb=rss_m)
            results["agreement"][method] = result
            log(f"  {method:17} {json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in result.items() if not isinstance(v, dict)})}")
            if method in SEEDED:
                log(f"  {'':17} recipekit {result['recipekit']}  mergekit {result['mergekit']}")

    if not args.skip_vocabulary:
        spec = choose_spec(args.small)
        models = [workdir / f"merge-small-{k}" for k in range(2)]
        for k, m in enumerate(models):
            generate_expert(spec, m, 100 + k, log)
        copies = vocabulary_models(models, workdir)
        config = workdir / "merge-union.yml"
        config.write_text(json.dumps({"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
                                      "models": [{"model": str(copies[0]), "parameters": {"weight": 0.4}},
                                                 {"model": str(copies[1]), "parameters": {"weight": 0.6}}]}))
        ours, theirs = workdir / "merge-out-recipekit", workdir / "merge-out-mergekit"
        clear(ours), clear(theirs)
        inputs = [f for m in copies for f in m.glob("*.safetensors")]
        run([recipe, "run", str(config), "-o", str(ours), "-q"], workdir, inputs)
        run([str(mergekit), str(config), str(theirs), "--out-shard-size", "2B"], workdir, inputs)
        results["vocabulary"] = agreement_by_token(ours, theirs)
        log(f"  linear union      {json.dumps(results['vocabulary'])}")

    if not args.skip_timing:
        spec = choose_spec(args.size)
        models = [workdir / f"merge-large-{k}" for k in range(3)]
        for k, m in enumerate(models):
            generate_expert(spec, m, 200 + k, log)
        inputs = [f for m in models for f in m.glob("*.safetensors")]
        for method in [m.strip() for m in args.timed.split(",") if m.strip()]:
            config = workdir / f"merge-timed-{method}.yml"
            data = config_for(method, models, "bfloat16")
            if method == "ties":  # base plus one model
                data["models"] = data["models"][:2]
            config.write_text(json.dumps(data, indent=2))
            out = workdir / "merge-out-timed"
            rows = {"recipekit": [recipe, "run", str(config), "-o", str(out), "-q", "--overwrite"],
                    "mergekit": [str(mergekit), str(config), str(out), "--out-shard-size", "2B", "--lazy-unpickle"],
                    # the floor of writing the output's bytes: a copy of one input (the same size)
                    "cp": ["cp", "-r", str(models[1]), str(out)]}
            summary = timed_rounds(rows, args.repeats, out, inputs, workdir, method)
            summary["wall_ratio"] = summary["recipekit"]["median_wall_s"] / summary["mergekit"]["median_wall_s"]
            summary["rss_ratio"] = summary["recipekit"]["peak_rss_mb"] / summary["mergekit"]["peak_rss_mb"]
            results["timing"][method] = summary

    print(f"agreement (small models, float32 compute, {human(choose_spec(args.small).nbytes)} each):")
    for method, r in results["agreement"].items():
        if method in SEEDED:
            print(f"  {method:17} moved fraction recipekit {r['recipekit']['moved_fraction']:.4f} / mergekit "
                  f"{r['mergekit']['moved_fraction']:.4f}; move std {r['recipekit']['move_std']:.5f} / "
                  f"{r['mergekit']['move_std']:.5f}  {'ok' if r['ok'] else 'DIFFERENT'}")
        else:
            print(f"  {method:17} max |diff| / max |value| = {r.get('max_rel_diff', float('nan')):.2e}, entries "
                  f"differing by more than 1e-5 of it: {r.get('differing_fraction', float('nan')):.2e}  "
                  f"{'ok' if r.get('ok') else 'DIFFERENT: ' + str(r.get('worst_tensor', r.get('error')))}")
    if results["vocabulary"]:
        r = results["vocabulary"]
        verdict = "ok" if r["ok"] else f"DIFFERENT: {r.get('error', r.get('worst_tensor'))}"
        print(f"vocabulary union (linear, by token): {r.get('tokens')} tokens, max |diff| / max |value| = "
              f"{r.get('max_rel_diff', float('nan')):.2e}  {verdict}")
    if results["timing"]:
        print(f"timing ({human(choose_spec(args.size).nbytes)} bf16 models, medians of {args.repeats}):")
    for method, s in results["timing"].items():
        print(f"  {method:8} recipekit {s['recipekit']['median_wall_s']:.2f}s {s['recipekit']['peak_rss_mb']:.0f} MB"
              f" | mergekit {s['mergekit']['median_wall_s']:.2f}s {s['mergekit']['peak_rss_mb']:.0f} MB"
              f" | ratio wall {s['wall_ratio']:.2f}, RSS {s['rss_ratio']:.2f} (targets <= 0.33)"
              f" | cp of the output's bytes {s['cp']['median_wall_s']:.2f}s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
