#!/usr/bin/env python3
"""Benchmark a mergekit-moe config run by recipekit and by mergekit-moe itself.

A benchmark, not a test: CI never runs it. It

1. installs mergekit (pinned, `--mergekit-version`) into its own virtual
   environment (`--mergekit-venv`), never into recipekit's; on a CPU-only
   machine pass `--torch torch==2.13.0` so pip does not pull CUDA wheels;
2. generates (once, cached in --workdir) `--experts` distinct synthetic
   Llama-shaped bf16 models of about --size bytes each, with a character-level
   tokenizer (prompt gates need one);
3. writes one mergekit-moe config per gate mode (`random`, `hidden`): base =
   the first model, experts = all of them, distinct prompts per expert;
4. times, alternating, `recipe run CONFIG` and `mergekit-moe CONFIG`, reading
   every input into the page cache before each timed command, with peak RSS
   from `/usr/bin/time -v`;
5. checks that the two outputs agree: every expert and non-router tensor
   bitwise, and (for `hidden`) the cosine between the two tools' router rows;
6. prints medians and the ratios recipekit / mergekit (`--json FILE` too).

    python benchmarks/moe.py --size 0.5GB --experts 4 --repeats 3 --torch torch==2.13.0
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
from passthrough import ModelSpec, cached, choose_spec, clear, generate, human, parse_size, timed, warm_cache  # noqa: E402

MODES = ("random", "hidden")
PROMPTS = [
    ["def fibonacci(n):", "import numpy as np", "for i in range(10):"],
    ["Once upon a time", "The little fox ran into the forest.", "She opened the old door."],
    ["What is 12 times 7?", "Solve for x: 3x + 5 = 20", "The integral of x squared"],
    ["Bonjour, comment allez-vous?", "Das ist ein Satz auf Deutsch.", "Hola, me llamo Ana."],
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure_mergekit(venv: Path, version: str, torch_spec: str | None, log) -> Path:
    """The mergekit-moe executable of a venv of its own, created on first use."""
    exe = venv / "bin" / "mergekit-moe"
    if exe.exists():
        return exe
    log(f"installing mergekit=={version} into {venv}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    if torch_spec:
        subprocess.run(pip + [torch_spec], check=True)
    subprocess.run(pip + [f"mergekit=={version}"], check=True)
    return exe


def generate_expert(spec: ModelSpec, root: Path, seed: int, log) -> None:
    """A synthetic Llama whose weights differ per seed, with a tokenizer (cached by spec and seed)."""
    if not cached(spec, root, seed):
        generate(spec, root, log, seed=seed)
    write_tokenizer(root)


def write_tokenizer(folder: Path) -> None:
    """Character-level tokenizer: `<s>` 1 (BOS), `</s>` 2, `<pad>` 0, `<unk>` 3, then printable characters."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(string.printable)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True}))


def write_config(workdir: Path, models: list[Path], mode: str) -> Path:
    config = {"base_model": str(models[0]), "gate_mode": mode, "dtype": "bfloat16", "experts_per_token": 2,
              "experts": [{"source_model": str(m), "positive_prompts": PROMPTS[k % len(PROMPTS)]}
                          for k, m in enumerate(models)]}
    path = workdir / f"moe-{mode}.yml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def read_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def per_expert(tensors: dict) -> dict:
    """Mixtral tensors in the per-expert layout. mergekit 0.1.5 under transformers 5 writes the fused one
    (`mlp.experts.gate_up_proj` [E, 2I, C], `mlp.experts.down_proj` [E, C, I], `mlp.gate`), which only
    transformers 5 loads."""
    out = {}
    for name, value in tensors.items():
        prefix, _, rest = name.partition(".mlp.")
        if rest == "experts.gate_up_proj":
            for e in range(value.shape[0]):
                gate, up = value[e].chunk(2, dim=0)
                out[f"{prefix}.block_sparse_moe.experts.{e}.w1.weight"] = gate
                out[f"{prefix}.block_sparse_moe.experts.{e}.w3.weight"] = up
        elif rest == "experts.down_proj":
            for e in range(value.shape[0]):
                out[f"{prefix}.block_sparse_moe.experts.{e}.w2.weight"] = value[e]
        elif rest == "gate.weight":
            out[f"{prefix}.block_sparse_moe.gate.weight"] = value
        else:
            out[name] = value
    return out


def compare(ours: Path, theirs: Path, mode: str) -> dict:
    """Which tensors agree bitwise, and how close the routers are."""
    import torch

    a, b = per_expert(read_tensors(ours)), per_expert(read_tensors(theirs))
    routers = {n for n in a if n.endswith("block_sparse_moe.gate.weight")}
    same_names = sorted(a) == sorted(b)
    others = [n for n in a if n not in routers and n in b]
    differ = [n for n in others if a[n].dtype != b[n].dtype or not torch.equal(a[n], b[n])]
    result = {"same_tensor_names": same_names, "non_router_tensors": len(others), "non_router_differ": differ[:5],
              "non_router_equal": not differ}
    if mode == "hidden":
        cos = [torch.nn.functional.cosine_similarity(a[n].float(), b[n].float(), dim=1).min().item()
               for n in sorted(routers) if n in b]
        result["router_min_cosine"] = min(cos) if cos else None
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="0.5GB", help="bytes per expert model (default 0.5GB)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rk-bench-moe")
    parser.add_argument("--mergekit-venv", type=Path, default=None, help="default: WORKDIR/mergekit-venv")
    parser.add_argument("--mergekit-version", default="0.1.5")
    parser.add_argument("--torch", default=None, help="torch requirement installed first into mergekit's venv")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    mergekit = ensure_mergekit(args.mergekit_venv or workdir / "mergekit-venv", args.mergekit_version, args.torch, log)
    recipe = Path(sys.executable).parent / "recipe"
    spec = choose_spec(parse_size(args.size))
    log(f"{args.experts} experts of {human(spec.nbytes)} ({spec.layers} layers, hidden {spec.shape['hidden_size']})")
    models = [workdir / "models" / f"m{k}" for k in range(args.experts)]
    (workdir / "models").mkdir(exist_ok=True)
    for k, model in enumerate(models):
        generate_expert(spec, model, seed=k, log=log)
    inputs = [f for m in models for f in sorted(m.glob("*.safetensors"))]

    results = {}
    for mode in args.modes.split(","):
        config = write_config(workdir, models, mode)
        commands = {"recipekit": [str(recipe), "run", str(config), "-o", str(workdir / "out-recipekit"), "-q",
                                  "--overwrite"],
                    "mergekit": [str(mergekit), str(config), str(workdir / "out-mergekit")]}
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for repeat in range(args.repeats):
            for name, argv_ in commands.items():
                clear(workdir / f"out-{name}")
                warm_cache(inputs)
                wall, rss, rc, err = timed(argv_, workdir)
                if rc != 0:
                    log(f"{name} failed ({rc}):\n{err}")
                    return 1
                runs[name].append((wall, rss))
                log(f"  {mode} {name} #{repeat + 1}: {wall:.2f} s, {rss:.0f} MB")
        summary = {name: {"wall_s": statistics.median(w for w, _ in r), "peak_rss_mb": max(m for _, m in r),
                          "walls": [w for w, _ in r]} for name, r in runs.items()}
        summary["ratio_time"] = summary["recipekit"]["wall_s"] / summary["mergekit"]["wall_s"]
        summary["ratio_rss"] = summary["recipekit"]["peak_rss_mb"] / summary["mergekit"]["peak_rss_mb"]
        summary["agreement"] = compare(workdir / "out-recipekit", workdir / "out-mergekit", mode)
        results[mode] = summary

    print(f"mergekit-moe config, {args.experts} experts of {human(spec.nbytes)}, median of {args.repeats}")
    print(f"{'gate_mode':<10} {'tool':<10} {'wall s':>8} {'peak RSS MB':>12}")
    for mode, summary in results.items():
        for name in ("recipekit", "mergekit"):
            print(f"{mode:<10} {name:<10} {summary[name]['wall_s']:>8.2f} {summary[name]['peak_rss_mb']:>12.0f}")
        print(f"{mode:<10} {'ratio':<10} {summary['ratio_time']:>8.2f} {summary['ratio_rss']:>12.2f}"
              f"   agreement: {json.dumps(summary['agreement'])}")
    if args.json:
        args.json.write_text(json.dumps({"experts": args.experts, "model_bytes": spec.nbytes, "modes": results,
                                         "time": time.strftime("%Y-%m-%d")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
