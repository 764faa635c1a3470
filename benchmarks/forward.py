"""Streamed forward versus transformers on the same model and tokens: peak RSS and tokens per second.

    python benchmarks/forward.py --model /tmp/rk-bench/llama-h2048-l16 --tokens 2048 --repeats 3

With `--baseline DIR` (a non-editable install of another recipekit, e.g.
`pip install --no-deps --target DIR .` at an earlier commit) the streamed
forward of that tree is timed too, in the same rounds: before and after a change.

Each measurement is its own process under `/usr/bin/time -v` (peak RSS), run
right after reading the model files into the page cache, alternating the two
sides. transformers: `from_pretrained(dtype=float32)` and one forward over the
tokens (logits for every position). recipekit: `StreamedForward.run` over the
same tokens plus logits for every position, 256 at a time. Tokens/s counts
the forward (and logits) only; wall time includes loading. A model can be
made with `benchmarks/passthrough.py` (it leaves one in /tmp/rk-bench).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = {
    "transformers": """
import sys, time, torch, transformers
path, n = sys.argv[1], int(sys.argv[2])
start = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
begin = time.perf_counter()
with torch.no_grad():
    logits = model(ids).logits
end = time.perf_counter()
print("RESULT", end - begin, end - start, float(logits[0, -1].float().abs().sum()))
""",
    "recipekit": """
import sys, time, torch
from pathlib import Path
try:
    from recipekit.engine.core.graph import LazyModel
    from recipekit.engine.forward.streamed import StreamedForward
    from recipekit.engine.io.source import open_model
except ImportError:  # a --baseline tree from before engine/ was grouped into subpackages (2026-12)
    from recipekit.engine.forward import StreamedForward
    from recipekit.engine.lazy import LazyModel
    from recipekit.engine.source import open_model
path, n = sys.argv[1], int(sys.argv[2])
start = time.perf_counter()
model = LazyModel.from_source("m", open_model(path, base_dir=Path.cwd()))
forward = StreamedForward(model)
vocab = model.tensors["model.embed_tokens.weight"].shape[0]
ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0))
begin = time.perf_counter()
final, _ = forward.run([ids[0].tolist()])
head = forward.lm_head()
for at in range(0, n, 256):
    logits = final[0, at:at + 256] @ head.T
end = time.perf_counter()
print("RESULT", end - begin, end - start, float(logits[-1].abs().sum()))
""",
}


def measure(side: str, model: Path, tokens: int, baseline: Path | None = None) -> dict:
    for f in sorted(model.glob("*.safetensors")):
        subprocess.run(["cat", str(f)], stdout=subprocess.DEVNULL, check=True)
    env = dict(os.environ)
    if side == "baseline":
        env["PYTHONPATH"] = str(baseline)
    code = CHILD["recipekit" if side == "baseline" else side]
    result = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code, str(model), str(tokens)],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{side} failed:\n{result.stderr[-3000:]}")
    forward_s, wall_s, check = map(float, result.stdout.split("RESULT")[1].split())
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)[1])
    return {"forward_s": forward_s, "wall_s": wall_s, "tokens_per_s": tokens / forward_s,
            "peak_rss_mb": rss_kb * 1024 / 1e6, "check": check}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--baseline", type=Path, metavar="DIR", help="another recipekit install to time too")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"transformers": [], "recipekit": []}
    if args.baseline:
        runs["baseline"] = []
    sides = list(runs)
    for r in range(args.repeats):
        for side in sides[r % len(sides):] + sides[:r % len(sides)]:
            runs[side].append(measure(side, args.model, args.tokens, args.baseline))
            m = runs[side][-1]
            print(f"  {side:12} round {r + 1}: forward {m['forward_s']:.2f}s ({m['tokens_per_s']:.0f} tok/s), "
                  f"wall {m['wall_s']:.2f}s, peak RSS {m['peak_rss_mb']:.0f} MB", flush=True)
    summary = {side: {key: statistics.median(m[key] for m in ms) for key in ("forward_s", "wall_s", "tokens_per_s",
                                                                            "peak_rss_mb")}
               for side, ms in runs.items()}
    t, k = summary["transformers"], summary["recipekit"]
    print(f"\nmedians over {args.repeats} runs, {args.tokens} tokens, model {args.model}")
    print(f"{'':14}{'tok/s':>8}{'forward s':>11}{'wall s':>9}{'peak RSS MB':>13}")
    for side, m in summary.items():
        print(f"{side:14}{m['tokens_per_s']:8.0f}{m['forward_s']:11.2f}{m['wall_s']:9.2f}{m['peak_rss_mb']:13.0f}")
    print(f"recipekit / transformers: speed {k['tokens_per_s'] / t['tokens_per_s']:.2f}x (target >= 0.7), "
          f"peak RSS {k['peak_rss_mb'] / t['peak_rss_mb']:.2f}x (target <= 0.33)")
    if args.baseline:
        b = summary["baseline"]
        print(f"recipekit / baseline: speed {k['tokens_per_s'] / b['tokens_per_s']:.2f}x, "
              f"peak RSS {k['peak_rss_mb'] / b['peak_rss_mb']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "median": summary}, indent=2))


if __name__ == "__main__":
    main()
