"""The `recipe` command: a thin layer over `recipekit.engine`'s API.

Exit codes: 0 done, 1 failed while running, 2 bad input. A user's mistake is
one located line per problem, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

# This process uses no pydantic plugins; looking for them costs ~30 ms of every command.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

from recipekit.engine.core.architectures import layer_config
from recipekit.engine.core.graph import LazyModel
from recipekit.engine.core.layers import decoder_of
from recipekit.engine.core.probe import SUPER_WEIGHT_MIN_EFFECT
from recipekit.engine.core.sizes import human
from recipekit.engine.core.words import counted
from recipekit.engine.io.hub import parse_hub_ref
from recipekit.engine.recipe.document import recipe_json_schema
from recipekit.engine.run.card import layer_runs
from recipekit.engine.run.plan import Plan

from .api import check_device, convert, inspect_model, load_recipe, load_shared_recipe, model_or_recipe
from .errors import RecipekitError, RunFailed


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _stop_on_signals()
    try:
        return args.handler(args)
    except RecipekitError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"recipe: interrupted; {_what_is_left(e)}", file=sys.stderr)
        return 130
    except RunFailed as e:
        print(f"recipe: failed: {e}", file=sys.stderr)
        return 1
    except _Stopped as e:
        print(f"recipe: stopped by {e.name}; {_what_is_left(e)}", file=sys.stderr)
        return 128 + e.signum
    except Exception as e:  # a failure while running, not a user's mistake
        if args.debug:
            traceback.print_exc()
        print(f"recipe: failed: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def _what_is_left(e: BaseException) -> str:
    """The writer's note on the finished shards it kept for --resume, else that nothing was written."""
    notes = getattr(e, "__notes__", None)
    return f"no output was written, but {notes[0]}" if notes else "no output was written"


class _Stopped(BaseException):
    """SIGTERM or SIGHUP, raised where the process is, so that the writer removes its partial output on the way
    out (a BaseException, like KeyboardInterrupt: no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name


def _stop_on_signals() -> None:
    def stop(signum, frame):
        raise _Stopped(signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        if threading.current_thread() is threading.main_thread():  # in-process callers from other threads
            signal.signal(signum, stop)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recipe", description="Build language-model checkpoints from recipes.")
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected failures")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="build the model a recipe describes")
    run.add_argument("recipe", type=Path, metavar="RECIPE",
                     help="a recipe file, or a Hub model id (org/name[@rev]) whose shared recipe.yaml is rebuilt")
    run.add_argument("-o", "--out", required=True, metavar="OUT", help="output model directory")
    run.add_argument("--allow-local-paths", action="store_true",
                     help="let a recipe fetched from the Hub read local model paths")
    run.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    run.add_argument("--resume", action="store_true",
                     help="finish a run of the same recipe and OUT that was killed: keep the shards it completed")
    run.add_argument("--device", default="cpu", help="where tensors are computed: cpu (default) or cuda")
    locking = run.add_mutually_exclusive_group()
    locking.add_argument("--locked", action="store_true",
                         help="refuse to run unless the inputs match the recipe's lock file (RECIPE with .lock)")
    locking.add_argument("--no-lock", action="store_true",
                         help="hash no input and write no recipe.lock (the card says the build is unlocked)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    run.set_defaults(handler=_run)

    validate = sub.add_parser("validate", help="check a recipe and its inputs by building it (steps that measure "
                                               "the model run); exit 2 with located errors")
    validate.add_argument("recipe", type=Path, metavar="RECIPE")
    depth = validate.add_mutually_exclusive_group()
    depth.add_argument("--schema-only", action="store_true", help="check the recipe text only, open no model")
    depth.add_argument("--no-measure", action="store_true",
                       help="check the recipe and the inputs' headers, but run no step that measures the model "
                            "(metric selectors, prompt gates, super weights); say which steps did not run")
    validate.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    validate.set_defaults(handler=_validate)

    plan = sub.add_parser("plan", help="show what a recipe will build, its size and peak memory (steps that "
                                       "measure the model run)")
    plan.add_argument("recipe", type=Path, metavar="RECIPE")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    plan.set_defaults(handler=_plan)

    inspect = sub.add_parser("inspect", help="show a model directory's layers, tensors, dtypes and size")
    inspect.add_argument("model", type=Path, metavar="MODEL")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(handler=_inspect)

    evaluate = sub.add_parser("eval", help="perplexity of a text under a model, or under what a recipe builds")
    evaluate.add_argument("model", type=Path, metavar="MODEL", help="a model directory or a recipe file")
    evaluate.add_argument("--text", type=Path, required=True, metavar="FILE", help="UTF-8 text to score")
    evaluate.add_argument("--seq-len", type=_positive, default=512, help="tokens per window (default 512)")
    evaluate.add_argument("--stride", type=_positive, default=None,
                          help="text tokens between window starts; at most and by default --seq-len - 1: "
                               "windows back to back after BOS, or overlapping by one token without BOS")
    evaluate.add_argument("--max-tokens", type=_positive, default=16384,
                          help="score at most this many tokens of the text (bounds memory; default 16384)")
    evaluate.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    evaluate.add_argument("--json", action="store_true", help="machine-readable output")
    evaluate.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(handler=_eval)

    analyze = sub.add_parser("analyze", help="per-layer metrics of a model (or of what a recipe builds)")
    analyze.add_argument("model", type=Path, metavar="MODEL", help="a model directory or a recipe file")
    analyze.add_argument("--metric", required=True, choices=["snr", "angular", "bi", "super-weights"],
                         help="snr: random-matrix signal-to-noise ratio of each module's weight (data-free); "
                              "angular: distance between the residual streams entering layers l and l+n; "
                              "bi: block influence of each layer (both over --text); super-weights: single "
                              "down_proj entries behind massive activations (a default prompt, plus --text)")
    analyze.add_argument("--text", type=Path, metavar="FILE",
                         help="texts for angular, bi and super-weights: the file's blank-line separated "
                              "paragraphs (super-weights runs them after its default prompt, and --verify scores "
                              "the file's perplexity)")
    analyze.add_argument("--n", type=_positive, default=1, help="block size for angular (default 1)")
    analyze.add_argument("--token", choices=["last", "mean"], default="last",
                         help="angular: compare at each text's last token (default), or average over all tokens")
    analyze.add_argument("--seq-len", type=_positive, default=256, help="tokens per text at most (default 256)")
    analyze.add_argument("--max-texts", type=_positive, default=64, help="texts used at most (default 64)")
    analyze.add_argument("--module", action="append", metavar="NAME",
                         help="a module such as self_attn.v_proj, named as in Llama; in a fused layout (Phi-3's "
                              "qkv_proj) its rows of the fused matrix (repeatable; default: all projections)")
    analyze.add_argument("--threshold", type=float, default=50.0,
                         help="super-weights: a layer's largest down_proj input and output must exceed this "
                              "many times the layer's median (default 50)")
    analyze.add_argument("--rounds", type=_positive, default=10,
                         help="super-weights: zero what was found and look again, at most this often (default 10)")
    analyze.add_argument("--verify", action="store_true",
                         help="super-weights: zero each found weight on its own and order them by how much that "
                              "raises the perplexity of --text (default: a built-in calibration text)")
    analyze.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    analyze.add_argument("--json", action="store_true", help="machine-readable output")
    analyze.add_argument("--plot", type=Path, metavar="FILE.png",
                         help="also draw the table: a layer x module heatmap (snr) or a curve over layers "
                              "(needs matplotlib: pip install 'recipekit[plot]')")
    analyze.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    analyze.set_defaults(handler=_analyze)

    routing = sub.add_parser("analyze-routing",
                             help="share of tokens each expert of a Mixture of Experts receives, per layer")
    routing.add_argument("model", type=Path, metavar="MODEL", help="an MoE model directory or a recipe file")
    routing.add_argument("--text", type=Path, required=True, metavar="FILE",
                         help="texts to route: the file's blank-line separated paragraphs")
    routing.add_argument("--seq-len", type=_positive, default=256, help="tokens per text at most (default 256)")
    routing.add_argument("--max-texts", type=_positive, default=64, help="texts used at most (default 64)")
    routing.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    routing.add_argument("--json", action="store_true", help="machine-readable output")
    routing.add_argument("--plot", type=Path, metavar="FILE.png",
                         help="also draw a layer x expert heatmap (needs matplotlib: pip install 'recipekit[plot]')")
    routing.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    routing.set_defaults(handler=_analyze_routing)

    convert = sub.add_parser("convert", help="print the recipe equivalent to a mergekit-moe config or a "
                                             "mergekit-yaml passthrough config")
    convert.add_argument("config", type=Path, metavar="CONFIG", help="a mergekit-moe or mergekit-yaml config")
    convert.set_defaults(handler=_convert)

    show = sub.add_parser("show", help="print the recipe shared in a Hub model repo, with its locked inputs")
    show.add_argument("ref", metavar="ORG/NAME[@REV]")
    show.set_defaults(handler=_show)

    schema = sub.add_parser("schema", help="print the JSON Schema of the recipe format")
    schema.set_defaults(handler=_schema)
    return parser


class _Version(argparse.Action):
    """Looks the version up only when asked (package metadata is slow to import)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from . import __version__

        print(f"recipekit {__version__}")
        parser.exit()


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    lock = args.recipe.with_suffix(".lock") if args.locked else None
    if not args.recipe.exists() and parse_hub_ref(str(args.recipe)) is not None:
        loaded, shared_lock = load_shared_recipe(str(args.recipe), allow_local_paths=args.allow_local_paths)
        if not args.no_lock:
            lock = shared_lock  # a shared lock means: rebuild exactly those inputs
    else:
        loaded = load_recipe(args.recipe)
    result = loaded.run(args.out, overwrite=args.overwrite, progress=_progress(args), announce=_announce,
                        device=args.device, lock=lock, hash_inputs=not args.no_lock, resume=args.resume)
    plan = result.plan
    _print_messages(plan.model.messages)
    if args.resume:
        kept = f"kept {human(result.reused)} of finished shards from the killed run" if result.reused else \
            "kept nothing"
        print(f"recipe: --resume: {kept}{f'; {result.resume_note}' if result.resume_note else ''}", file=sys.stderr)
    for warning in result.warnings:
        print(f"recipe: warning: {warning}", file=sys.stderr)
    if result.downloaded or result.skipped:
        print(f"recipe: downloaded {human(result.downloaded)} of Hub shards, skipped {human(result.skipped)} "
              f"that the output does not use", file=sys.stderr)
    inputs = ", ".join(f"{name} {layer_config(source.config).get('num_hidden_layers', '?')}"
                       for name, source in plan.model.sources)
    print(f"recipe: layers {inputs} -> {len(plan.model.layer_origins)}; wrote {human(result.bytes_written)} in "
          f"{result.shards} shard(s) to {result.out} in {time.perf_counter() - start:.2f} s")
    return 0


def _convert(args: argparse.Namespace) -> int:
    print(convert(args.config), end="")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from recipekit.engine.io import hub
    from recipekit.engine.io.source import hub_reading

    loaded = load_recipe(args.recipe)
    # validate never reads anything remote: Hub inputs are checked only when the cache holds them
    uncached = [ref for ref in dict.fromkeys(loaded.recipe.models.values())
                if hub_reading(ref, loaded.base_dir) is not None and not hub.in_cache(ref)]
    what, skipped = "recipe", ()
    if not args.schema_only and not uncached:
        with hub.cache_only():
            built = loaded.validate(measure=not args.no_measure, progress=_progress(args), announce=_announce)
        _print_messages(built.messages)
        what, skipped = "recipe and its inputs", built.skipped
    not_run = f", {len(skipped)} of them not run (--no-measure)" if skipped else ""
    print(f"{args.recipe}: ok ({what}: {len(loaded.recipe.models)} model(s), {len(loaded.recipe.steps)} step(s)"
          f"{not_run})")
    for line in skipped:
        print(line)
    if uncached and not args.schema_only:
        print(f"inputs not checked: {', '.join(uncached)} not in the local Hub cache (validate never downloads; "
              f"`recipe plan` reads their headers)")
    return 0


def _plan(args: argparse.Namespace) -> int:
    plan = load_recipe(args.recipe).plan(progress=_progress(args), announce=_announce)
    _print_messages(plan.model.messages)
    summary = plan_summary(plan)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print("inputs:")
    for entry in summary["inputs"]:
        origin = f"Hub {entry['repo']} at commit {entry['commit']}" if entry["commit"] else f"local {entry['path']}"
        print(f"  {entry['name']}: {entry['ref']} -> {origin}")
    print(f"layers ({summary['layers']} out):")
    for run in summary["layer_runs"]:
        print(f"  {run['output']:>9}  <- {run['from']}")
    print(f"other tensors from: {summary['other_tensors_from']}")
    print(f"tensors: {summary['tensors']} ({summary['copied']} copied as bytes, {summary['computed']} computed)")
    for shard in summary["shards"]:
        print(f"  {shard['file']}  {human(shard['bytes'])}  {shard['tensors']} tensors")
    parts = (f" (measuring while the recipe is built: about {human(plan.measure_memory)}; writing: about "
             f"{human(plan.write_memory)})") if plan.measure_memory else ""
    print(f"output: {human(summary['output_bytes'])}; reads {human(summary['input_bytes_read'])}; "
          f"peak memory about {human(summary['peak_memory'])}{parts}")
    return 0


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars go to stderr, and only to a terminal (`-q` hides them there too)."""
    return not args.quiet and sys.stderr.isatty()


def _model(args: argparse.Namespace) -> LazyModel:
    """MODEL as it is, or what the recipe MODEL builds (its measuring steps announced, with progress bars)."""
    return model_or_recipe(args.model, progress=_progress(args), announce=_announce)


def _announce(line: str) -> None:
    """What a step is about to measure, before it starts: one line on stderr."""
    print(f"recipe: {line}", file=sys.stderr, flush=True)


def _print_messages(messages: tuple[str, ...]) -> None:
    """What the steps want the user to read (inferred choices, warnings), on stderr."""
    for message in messages:
        print(f"recipe: {message}", file=sys.stderr)


def plan_summary(plan: Plan) -> dict:
    """What `recipe plan --json` prints."""
    tensors = plan.tensors
    return {
        "inputs": [{"name": name, "ref": s.ref, "kind": "hub" if s.hub_id else "local", "repo": s.hub_id,
                    "commit": s.commit, "path": str(s.root)} for name, s in plan.model.sources],
        "layers": len(plan.model.layer_origins),
        "layer_runs": [{"output": out, "from": src} for out, src in layer_runs(plan.model.layer_origins)],
        "other_tensors_from": plan.model.sources[0][0],
        "tensors": len(tensors),
        "copied": sum(t.is_copy for t in tensors),
        "computed": sum(not t.is_copy for t in tensors),
        "shards": [{"file": s.filename, "bytes": s.size, "tensors": len(s.tensors)} for s in plan.shards],
        "output_bytes": plan.output_bytes,
        "input_bytes_read": plan.input_bytes,
        "peak_memory": plan.peak_memory,
        "peak_memory_measuring": plan.measure_memory,
        "peak_memory_writing": plan.write_memory,
        "vocabulary": plan.model.vocabulary.to_dict() if plan.model.vocabulary is not None else None,
    }


def _inspect(args: argparse.Namespace) -> int:
    info = inspect_model(args.model)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return 0
    print(f"{info.path}")
    print(f"  architecture: {info.architecture}")
    print(f"  layers: {info.layers}; tensors: {info.tensors}; size: {human(info.bytes)} in {len(info.files)} file(s)")
    print("  dtypes: " + ", ".join(f"{d} {human(b)}" for d, b in info.dtypes.items()))
    print(f"  embeddings: {'tied' if info.tied_embeddings else 'untied'}")
    print("  non-layer tensors: " + ", ".join(info.non_layer_tensors))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    check_device(args.device)
    if args.metric == "super-weights":
        return _analyze_super_weights(args)
    if args.metric != "snr":
        return _analyze_similarity(args)
    from recipekit.engine.measure.snr import snr_table

    rows = snr_table(_model(args), str(args.model), tuple(args.module or ()), device=args.device,
                     progress=_progress(args))
    modules = list(dict.fromkeys(r.module for r in rows))
    by_layer: dict[int, dict[str, float]] = {}
    for r in rows:
        by_layer.setdefault(r.layer, {})[r.module] = r.snr
    if args.plot:
        from recipekit.engine.measure.plot import heatmap

        # infinite SNR is drawn at the largest finite value, so the colour scale stays readable
        finite = [v for values in by_layer.values() for v in values.values() if math.isfinite(v)] or [0.0]
        grid = [[min(values[m], max(finite)) for m in modules] for values in by_layer.values()]
        heatmap(args.plot, grid, rows=[str(layer) for layer in by_layer], columns=modules,
                title=f"SNR of {args.model}", xlabel="module", ylabel="layer", colorbar="SNR (inf drawn at max)")
    if args.json:
        print(json.dumps({"model": str(args.model), "metric": "snr", "rows": [r.to_dict() for r in rows]}, indent=2))
        return 0
    print("SNR (random-matrix signal/noise; inf = no singular value at or below the noise edge)")
    table = [["layer", *modules]] + [[str(layer), *(f"{values[m]:.4g}" for m in modules)]
                                     for layer, values in by_layer.items()]
    for line in _columns(table):
        print(line)
    return 0


def _analyze_similarity(args: argparse.Namespace) -> int:
    from recipekit.engine.measure.similarity import similarity
    from recipekit.engine.measure.texts import paragraphs, read_text

    if args.text is None:
        raise RecipekitError(f"--metric {args.metric} needs --text FILE: the texts to run the model on")
    model = _model(args)
    texts = paragraphs(read_text(args.text))
    mean_n = args.n if args.metric == "angular" and args.token == "mean" else None
    if mean_n is not None and mean_n > len(decoder_of(model, str(args.model)).layers):
        layers = len(decoder_of(model, str(args.model)).layers)
        raise RecipekitError(f"--n {args.n} is more than the model's {counted(layers, 'layer')}")
    result = similarity(model, str(args.model), texts, seq_len=args.seq_len, max_texts=args.max_texts,
                        mean_n=mean_n, device=args.device, progress=_progress(args))
    if args.metric == "angular":
        if args.n > result.layers:
            raise RecipekitError(f"--n {args.n} is more than the model's {counted(result.layers, 'layer')}")
        values = result.angular(args.n, args.token)
        rows = [{"start": l, "end": l + args.n, "distance": d} for l, d in enumerate(values)]
        where = "last token" if args.token == "last" else f"mean over {counted(result.tokens, 'token')}"
        header = (f"angular distance between the inputs of layer l and l+{args.n} ({where}, "
                  f"{counted(result.texts, 'text')})")
    else:
        rows = [{"layer": i, "bi": v} for i, v in enumerate(result.bi)]
        header = (f"block influence 1 - cos(layer input, layer output) over {counted(result.tokens, 'token')} of "
                  f"{counted(result.texts, 'text')}")
    if args.plot:
        from recipekit.engine.measure.plot import curve

        xs = [row.get("start", row.get("layer")) for row in rows]
        ys = [row.get("distance", row.get("bi")) for row in rows]
        curve(args.plot, xs, ys, title=f"{args.metric} of {args.model}", ylabel=args.metric,
              xlabel="first layer of the block" if args.metric == "angular" else "layer")
    if args.json:
        print(json.dumps({"model": str(args.model), "metric": args.metric, "texts": result.texts,
                          "tokens": result.tokens, "rows": rows}, indent=2))
        return 0
    print(header)
    for row in rows:
        label = f"{row['start']:>3}-{row['end'] - 1:<3}" if "start" in row else f"{row['layer']:>7}"
        print(f"{label}  {row.get('distance', row.get('bi')):.4f}")
    return 0


def _analyze_super_weights(args: argparse.Namespace) -> int:
    from recipekit.engine.measure.superweights import CALIBRATION_TEXT, DEFAULT_PROMPT, find_super_weights, verify
    from recipekit.engine.measure.texts import paragraphs, read_text

    text = read_text(args.text) if args.text is not None else None
    model = _model(args)
    progress = _progress(args)
    search = find_super_weights(model, str(args.model), paragraphs(text) if text else [], threshold=args.threshold,
                                rounds=args.rounds, seq_len=args.seq_len, max_texts=args.max_texts,
                                device=args.device, progress=progress)
    found, check = search.weights, None
    if args.verify and found:
        check = verify(model, str(args.model), found, text if text is not None else CALIBRATION_TEXT,
                       seq_len=args.seq_len, device=args.device, progress=progress)
        found = check.weights
    calibration = str(args.text) if args.text is not None else "the built-in calibration text"
    if args.plot:
        from recipekit.engine.measure.plot import curve

        out_ratios = {peaks.layer: peaks.out_ratio for peaks in search.layers}
        layers = range(len(decoder_of(model, str(args.model)).layers))
        # a layer without a single down_proj (Mixture of Experts) is a gap in the curve
        curve(args.plot, list(layers), [out_ratios.get(i, math.nan) for i in layers],
              title=f"super weights of {args.model}", xlabel="layer", ylabel="largest down_proj output / median")
    if args.json:
        verified = {} if check is None else {"calibration": calibration, "calibration_tokens": check.tokens}
        print(json.dumps({"model": str(args.model), "metric": "super-weights", "threshold": args.threshold,
                          "prompt": DEFAULT_PROMPT, **verified,
                          "baseline_perplexity": None if check is None else check.perplexity,
                          "weights": [w.to_dict() for w in found],
                          "layers": [peaks.to_dict() for peaks in search.layers]}, indent=2))
        return 0
    if not found:
        print(f"no super weight: no layer's largest down_proj input and output both exceed {args.threshold:g}x "
              "its median")
        return 0
    title = f"super weights (down_proj input and output both above {args.threshold:g}x the layer's median)"
    if check is not None:
        title += (f", by what zeroing each on its own does to the perplexity of {calibration} "
                  f"({counted(check.tokens, 'token')}; {check.perplexity:.4f} as it is)")
    print(title)
    header = ["layer", "tensor", "row", "column", "value", "out/median", "in/median"]
    rows = [[str(w.layer), w.tensor, str(w.row), str(w.column), f"{w.value:.5g}", f"{w.out_ratio:.1f}",
             f"{w.in_ratio:.1f}"] for w in found]
    if check is not None:
        header += ["perplexity zeroed", "effect"]
        for row, w in zip(rows, found):
            row += [f"{w.perplexity_zeroed:.4f}", f"{w.effect * 100:+.3g}%"]
    for line in _columns([header, *rows], left=(1,)):
        print(line)
    if check is not None:
        kept = sum(w.effect >= SUPER_WEIGHT_MIN_EFFECT for w in found)
        print(f"protect_super_weights protects those whose effect is at least min_effect (default "
              f"+{SUPER_WEIGHT_MIN_EFFECT:.0%}): {kept} of {len(found)} here; verify: false protects all {len(found)}")
    return 0


def _columns(rows: list[list[str]], *, left: tuple[int, ...] = ()) -> list[str]:
    """Rows of cells as lines, two spaces between columns, each column as wide as its widest cell (a long tensor
    name widens its column instead of pushing the rest of its row out of line): right-aligned, as numbers are,
    but for the columns in `left`."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) if c in left else cell.rjust(width)
                      for c, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in rows]


def _analyze_routing(args: argparse.Namespace) -> int:
    from recipekit.engine.measure.routing import routing
    from recipekit.engine.measure.texts import paragraphs, read_text

    check_device(args.device)
    model = _model(args)
    result = routing(model, str(args.model), paragraphs(read_text(args.text)), seq_len=args.seq_len,
                     max_texts=args.max_texts, device=args.device, progress=_progress(args))
    shares = result.shares()
    if args.plot:
        from recipekit.engine.measure.plot import heatmap

        heatmap(args.plot, shares, rows=[str(layer) for layer in result.layers],
                columns=[str(e) for e in range(result.experts)], title=f"routing of {args.model}",
                xlabel="expert", ylabel="layer", colorbar="share of routing slots")
    if args.json:
        print(json.dumps({"model": str(args.model), **result.to_dict()}, indent=2))
        return 0
    print(f"share of routing slots per expert (top-{result.experts_per_token} of {result.experts}, "
          f"{counted(result.tokens, 'token')} of {counted(result.texts, 'text')}; a fair share is "
          f"{100 / result.experts:.1f}%)")
    print("layer  " + " ".join(f"{e:>6}" for e in range(result.experts)))
    for layer, row in zip(result.layers, shares):
        print(f"{layer:>5}  " + " ".join(f"{100 * v:>5.1f}%" for v in row))
    for warning in result.warnings():
        print(f"recipe: warning: {warning}", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    from recipekit.engine.recipe.shared import fetch_shared
    from recipekit.engine.run.lock import read_lock

    recipe_file, lock_file = fetch_shared(args.ref)
    print(_printable(recipe_file.read_text(encoding="utf-8", errors="replace").rstrip("\n")))
    if lock_file is not None:
        print("\n# inputs, as locked:")
        for name, entry in read_lock(lock_file).get("inputs", {}).items():
            origin = f"commit {entry['commit']}" if entry.get("commit") else "local directory"
            print(_printable(f"#   {name}: {entry.get('ref')} ({origin}, {len(entry.get('files', {}))} file(s))"))
    return 0


def _printable(text: str) -> str:
    """Untrusted text for the terminal: control and format characters (escape sequences that retitle or clear the
    terminal, carriage returns, bidirectional overrides) shown as escapes, never sent."""
    return "".join(c if c in "\n\t" or c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 0x100
                   else f"\\u{ord(c):04x}" for c in text)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _eval(args: argparse.Namespace) -> int:
    from recipekit.engine.measure.perplexity import perplexity
    from recipekit.engine.measure.texts import read_text

    if args.stride is not None and args.stride > args.seq_len:
        raise RecipekitError(f"--stride {args.stride} is longer than --seq-len {args.seq_len}: tokens would be skipped")
    model = _model(args)
    text = read_text(args.text)
    check_device(args.device)
    result = perplexity(model, text, text_name=str(args.text), seq_len=args.seq_len, stride=args.stride,
                        max_tokens=args.max_tokens, device=args.device,
                        progress=_progress(args))
    if args.json:
        print(json.dumps({"model": str(args.model), "text": str(args.text), **result.to_dict()}, indent=2))
    else:
        print(f"perplexity {result.perplexity:.4f} over {counted(result.tokens, 'token')} "
              f"({counted(result.windows, 'window')} of {result.seq_len}, stride {result.stride})")
    if result.text_tokens > args.max_tokens:
        print(f"recipe: --max-tokens {args.max_tokens} cut the text: scored the first {args.max_tokens} of its "
              f"{result.text_tokens} tokens", file=sys.stderr)
    return 0


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(recipe_json_schema(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
