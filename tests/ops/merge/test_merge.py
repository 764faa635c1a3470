"""The merge op end to end on tiny models: every method runs, loads in transformers and computes what its
kernel computes on the source tensors; gradients, filters, seeds, compute dtypes, the card; and every mistake
located."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from recipekit.engine import load_recipe
from recipekit.engine.core.graph import Apply
from recipekit.ops.merge.interpolate import linear, slerp
from recipekit.ops.merge.methods import METHODS
from recipekit.ops.registry import SCRATCH
from tests.bad_inputs.checks import assert_no_output, assert_refused, cli, mark, snapshot
from tests.simulated_cuda import simulated_cuda
from tests.tiny import finetune, load_causal_lm, make_model, tensors_of, write_recipe

LAYERS = 4


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("merge")
    base = make_model(root / "base", layers=LAYERS, seed=1)
    for k in (1, 2, 3):
        finetune(base, root / f"ft{k}", seed=10 + k)
    return root


def _recipe(folder: Path, family: Path, step: str, output: str = "") -> Path:
    models = "\n".join(f"  {name}: {family / name}" for name in ("base", "ft1", "ft2", "ft3"))
    return write_recipe(folder, f"recipe: 1\nmodels:\n{models}\nsteps:\n  - {step}\n{output}")


STEPS = {
    "linear": "{op: merge, method: linear, models: [{model: ft1, weight: 0.3}, {model: ft2, weight: 0.7}]}",
    "slerp": "{op: merge, method: slerp, base: base, models: [{model: ft1}], parameters: {t: 0.4}}",
    "nearswap": "{op: merge, method: nearswap, base: base, models: [{model: ft1}], parameters: {t: 0.01}}",
    "model_stock": "{op: merge, method: model_stock, base: base, models: [{model: ft1}, {model: ft2}]}",
    "task_arithmetic": "{op: merge, method: task_arithmetic, base: base, models: [{model: ft1, weight: 0.5}, "
                       "{model: ft2, weight: 0.5}], parameters: {lambda: 0.9}}",
    "ties": "{op: merge, method: ties, base: base, models: [{model: ft1, weight: 0.6, density: 0.5}, "
            "{model: ft2, weight: 0.4, density: 0.7}]}",
    "dare_ties": "{op: merge, method: dare_ties, base: base, models: [{model: ft1, weight: 0.5, density: 0.5}, "
                 "{model: ft2, weight: 0.5, density: 0.5}], seed: 3}",
    "dare_linear": "{op: merge, method: dare_linear, base: base, models: [{model: ft1, weight: 0.5, density: 0.6},"
                   " {model: ft2, weight: 0.5, density: 0.6}], seed: 3}",
    "breadcrumbs": "{op: merge, method: breadcrumbs, base: base, models: [{model: ft1, weight: 1.0, density: 0.8,"
                   " gamma: 0.05}]}",
    "breadcrumbs_ties": "{op: merge, method: breadcrumbs_ties, base: base, models: [{model: ft1, weight: 0.5}, "
                        "{model: ft2, weight: 0.5}], parameters: {density: 0.8, gamma: 0.05}}",
    "della": "{op: merge, method: della, base: base, models: [{model: ft1, weight: 0.5}, {model: ft2, weight: "
             "0.5}], parameters: {density: 0.5, epsilon: 0.1}, seed: 3}",
    "della_linear": "{op: merge, method: della_linear, base: base, models: [{model: ft1, weight: 0.5, density: "
                    "0.5, epsilon: 0.2}, {model: ft2, weight: 0.5, density: 0.5, epsilon: 0.2}], seed: 3}",
    "passthrough": "{op: merge, method: passthrough, models: [{model: ft1, scale: [{filter: mlp.down_proj, value: "
                   "0.5}]}]}",
    "nuslerp": "{op: merge, method: nuslerp, base: base, models: [{model: ft1, weight: 0.3}, {model: ft2, weight: 0.7}]}",
    "multislerp": "{op: merge, method: multislerp, models: [{model: ft1, weight: 1}, {model: ft2, weight: 2}, "
                  "{model: ft3, weight: 1}]}",
    "karcher": "{op: merge, method: karcher, models: [{model: ft1}, {model: ft2}, {model: ft3}], "
               "parameters: {max_iter: 5}}",
    "arcee_fusion": "{op: merge, method: arcee_fusion, base: base, models: [{model: ft1}], seed: 3}",
    "sce": "{op: merge, method: sce, base: base, models: [{model: ft1}, {model: ft2}], parameters: {select_topk: 0.5}}",
    "ram": "{op: merge, method: ram, base: base, models: [{model: ft1}, {model: ft2}], parameters: {epsilon: 0.01}}",
    "ramplus_tl": "{op: merge, method: ramplus_tl, base: base, models: [{model: ft1}, {model: ft2}], "
                  "parameters: {epsilon: 0.01, r: 0.2}}",
}


def test_every_method_has_an_end_to_end_case() -> None:
    assert set(STEPS) == set(METHODS)


def _kernel_on_sources(method: str, family: Path, step: dict, name: str) -> torch.Tensor:
    """What the method's kernel gives tensor `name` computed straight from the source files."""
    from recipekit.engine.core.graph import Load
    from recipekit.ops import registry

    recipe = load_recipe(_recipe(family, family, json.dumps(step)))
    sources = {m: tensors_of(family / m) for m in ("base", "ft1", "ft2", "ft3")}
    by_file = {(family / m).resolve(): m for m in sources}

    def value(node):
        if isinstance(node, Load):
            return sources[by_file[node.tensor.file.parent.resolve()]][node.tensor.name]
        result = registry.KERNELS[node.kernel](*map(value, node.inputs), **dict(node.params))
        return result.to(getattr(torch, {"F32": "float32", "BF16": "bfloat16"}[node.dtype]))

    return value(recipe.build().tensors[name])


def _in(compute_dtype: str, method: str) -> str:
    """The method's end-to-end step, computing in `compute_dtype`."""
    return json.dumps({**yaml.safe_load(STEPS[method]), "compute_dtype": compute_dtype})


@pytest.mark.parametrize("method", sorted(STEPS))
def test_every_method_runs_loads_and_computes_its_kernel(family: Path, tmp_path: Path, method: str) -> None:
    step = yaml.safe_load(STEPS[method])
    out = load_recipe(_recipe(tmp_path, family, STEPS[method])).run(tmp_path / "out").out
    model = load_causal_lm(out)
    assert model.config.num_hidden_layers == LAYERS
    got = tensors_of(out)
    base = tensors_of(family / "base")
    assert sorted(got) == sorted(base)
    for name in ("model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        want = _kernel_on_sources(method, family, step, name)
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], want), name
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_linear_is_the_weighted_mean_of_the_files(family: Path, tmp_path: Path) -> None:
    out = load_recipe(_recipe(tmp_path, family, STEPS["linear"])).run(tmp_path / "out").out
    got, a, b = tensors_of(out), tensors_of(family / "ft1"), tensors_of(family / "ft2")
    for name in got:
        assert torch.allclose(got[name], 0.3 * a[name] + 0.7 * b[name], atol=1e-6), name


def test_task_arithmetic_is_base_plus_weighted_deltas(family: Path, tmp_path: Path) -> None:
    out = load_recipe(_recipe(tmp_path, family, STEPS["task_arithmetic"])).run(tmp_path / "out").out
    got, base = tensors_of(out), tensors_of(family / "base")
    a, b = tensors_of(family / "ft1"), tensors_of(family / "ft2")
    for name in got:
        want = base[name] + 0.9 * (0.5 * (a[name] - base[name]) + 0.5 * (b[name] - base[name]))
        assert torch.allclose(got[name], want, atol=1e-6), name


def test_a_weight_gradient_gives_each_layer_its_interpolated_value(family: Path, tmp_path: Path) -> None:
    step = ("{op: merge, method: linear, models: [{model: ft1, weight: [1, 0]}, {model: ft2, weight: [0, 1]}]}")
    out = load_recipe(_recipe(tmp_path, family, step)).run(tmp_path / "out").out
    got, a, b = tensors_of(out), tensors_of(family / "ft1"), tensors_of(family / "ft2")
    for i in range(LAYERS):
        t = i / (LAYERS - 1)
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        assert torch.allclose(got[name], (1 - t) * a[name] + t * b[name], atol=1e-6), name
    # before the layers at the first value, after them at the last, as mergekit places them
    assert torch.allclose(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.allclose(got["lm_head.weight"], b["lm_head.weight"])


def test_filters_pick_values_by_tensor_name(family: Path, tmp_path: Path) -> None:
    step = ("{op: merge, method: slerp, base: base, models: [{model: ft1}], "
            "parameters: {t: [{filter: self_attn, value: 0}, {filter: mlp, value: [0, 1]}, {value: 1}]}}")
    out = load_recipe(_recipe(tmp_path, family, step)).run(tmp_path / "out").out
    got, base, a = tensors_of(out), tensors_of(family / "base"), tensors_of(family / "ft1")
    name = "model.layers.2.self_attn.k_proj.weight"
    assert torch.allclose(got[name], base[name], atol=1e-6)
    mlp = "model.layers.2.mlp.up_proj.weight"
    assert torch.allclose(got[mlp], slerp(base[mlp], a[mlp], t=2 / 3), atol=1e-6)
    assert torch.allclose(got["model.norm.weight"], a["model.norm.weight"], atol=1e-5)


def test_the_mapping_form_of_filters(family: Path, tmp_path: Path) -> None:
    step = "{op: merge, method: slerp, base: base, models: [{model: ft1}], parameters: {t: {mlp: 1, default: 0}}}"
    got = tensors_of(load_recipe(_recipe(tmp_path, family, step)).run(tmp_path / "out").out)
    a, base = tensors_of(family / "ft1"), tensors_of(family / "base")
    assert torch.allclose(got["model.layers.0.mlp.gate_proj.weight"], a["model.layers.0.mlp.gate_proj.weight"],
                          atol=1e-5)
    assert torch.allclose(got["model.layers.0.input_layernorm.weight"],
                          base["model.layers.0.input_layernorm.weight"], atol=1e-6)


def test_a_model_value_wins_over_the_global_one(family: Path, tmp_path: Path) -> None:
    step = ("{op: merge, method: linear, models: [{model: ft1, weight: 3}, {model: ft2}], "
            "parameters: {weight: 1}}")
    got = tensors_of(load_recipe(_recipe(tmp_path, family, step)).run(tmp_path / "out").out)
    a, b = tensors_of(family / "ft1"), tensors_of(family / "ft2")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(got[name], linear(a[name], b[name], weights=(3.0, 1.0), normalize=True), atol=1e-6)


@pytest.mark.parametrize("method", sorted(STEPS))
def test_every_method_computes_in_bfloat16_when_asked(family: Path, tmp_path: Path, method: str) -> None:
    """compute_dtype reaches every kernel: what a merge computes is its kernel's result in bfloat16, so every
    computed entry is a bfloat16 value, though written in float32 (the inputs' dtype)."""
    step = _in("bfloat16", method)
    recipe = load_recipe(_recipe(tmp_path, family, step))
    got = tensors_of(recipe.run(tmp_path / "out").out)
    nodes = recipe.build().tensors
    for name in ("model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(got[name], _kernel_on_sources(method, family, json.loads(step), name)), name
        if isinstance(nodes[name], Apply):
            assert got[name].dtype == torch.float32 and torch.equal(got[name], got[name].bfloat16().float()), name


def test_a_bfloat16_linear_merge_is_the_arithmetic_done_in_bfloat16(family: Path, tmp_path: Path) -> None:
    """Streamed by rows, each operation rounded to bfloat16: not the float32 result rounded once."""
    recipe = load_recipe(_recipe(tmp_path, family, _in("bfloat16", "linear"), "output: {dtype: bfloat16}\n"))
    assert all(t.is_rowwise for t in recipe.plan().tensors)
    out = recipe.run(tmp_path / "out").out
    got, a, b = tensors_of(out), tensors_of(family / "ft1"), tensors_of(family / "ft2")
    rounded_once = 0
    for name in got:
        by_hand = torch.add(a[name].bfloat16() * 0.3, b[name].bfloat16(), alpha=0.7) / (0.3 + 0.7)
        assert torch.equal(got[name], by_hand), name
        in_float32 = linear(a[name], b[name], weights=(0.3, 0.7), normalize=True).bfloat16()
        rounded_once += int((got[name] != in_float32).sum())
    assert rounded_once > 0
    assert "linear of `ft1`, `ft2`; ft1: weight 0.3; ft2: weight 0.7; compute_dtype bfloat16" in (
        out / "README.md").read_text()


def test_a_float64_merge_is_the_arithmetic_done_in_float64(family: Path, tmp_path: Path) -> None:
    out = load_recipe(_recipe(tmp_path, family, _in("float64", "task_arithmetic"))).run(tmp_path / "out").out
    got, base = tensors_of(out), tensors_of(family / "base")
    a, b = tensors_of(family / "ft1"), tensors_of(family / "ft2")
    closer = 0
    for name in got:
        origin = base[name].double()
        by_hand = torch.add(origin, (a[name].double() - origin) * 0.5 + (b[name].double() - origin) * 0.5, alpha=0.9)
        assert got[name].dtype == torch.float32 and torch.equal(got[name], by_hand.float()), name
        in_float32 = base[name] + 0.9 * (0.5 * (a[name] - base[name]) + 0.5 * (b[name] - base[name]))
        closer += int((got[name] != in_float32).sum())
    assert closer > 0


@pytest.mark.parametrize("compute_dtype", [None, "bfloat16"])
@pytest.mark.parametrize("method", sorted(STEPS))
def test_every_method_runs_its_kernels_on_the_device(family: Path, tmp_path: Path, method: str,
                                                      compute_dtype: str | None) -> None:
    """`--device cuda`, on the stand-in device of tests/simulated_cuda.py (which computes on the CPU and refuses
    a host tensor mixed into device work): every tensor the kernels compute is put on the device, and the bytes
    are the CPU run's."""
    recipe = load_recipe(_recipe(tmp_path, family, _in(compute_dtype, method) if compute_dtype else STEPS[method]))
    on_cpu = recipe.run(tmp_path / "cpu").out
    with simulated_cuda() as placed:
        on_device = recipe.run(tmp_path / "cuda", device="cuda").out
    computed = [t for shard in recipe.plan().shards for t in shard.tensors if not t.is_copy]
    assert computed and placed.count >= len(computed)  # each reads at least one input onto the device
    files = sorted(p.name for p in on_cpu.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in on_device.glob("*.safetensors"))
    for name in files:
        assert (on_device / name).read_bytes() == (on_cpu / name).read_bytes(), name


@pytest.mark.parametrize("compute_dtype", ["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("method", ["dare_ties", "della_linear"])
def test_seeded_methods_are_byte_identical_and_follow_the_seed(family: Path, tmp_path: Path, method: str,
                                                               compute_dtype: str) -> None:
    def shard_bytes(seed: int, out: str) -> bytes:
        step = json.dumps({**json.loads(_in(compute_dtype, method)), "seed": seed})
        result = load_recipe(_recipe(tmp_path, family, step)).run(tmp_path / out)
        return b"".join(f.read_bytes() for f in sorted(result.out.glob("*.safetensors")))

    first = shard_bytes(3, "one")
    assert shard_bytes(3, "two") == first
    assert shard_bytes(4, "three") != first


def test_the_memory_estimate_counts_working_copies_in_the_compute_dtype(family: Path, tmp_path: Path) -> None:
    peaks = {dtype: load_recipe(_recipe(tmp_path, family, _in(dtype, "ties"))).plan().peak_memory
             for dtype in ("bfloat16", "float32", "float64")}
    largest = max(math.prod(t.shape) for t in tensors_of(family / "base").values())
    # TIES of the base and two models: the working copies its kernel declares, of the largest tensor
    per_input, fixed = SCRATCH["ties"]
    copies = largest * (3 * per_input + fixed)
    assert peaks["float64"] - peaks["float32"] == int(8 * copies) - int(4 * copies)
    assert peaks["float32"] - peaks["bfloat16"] == int(4 * copies) - int(2 * copies)


def test_the_output_dtype_is_rounded_once_from_float32(family: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, family, STEPS["linear"], "output: {dtype: bfloat16}\n")
    got = tensors_of(load_recipe(recipe).run(tmp_path / "out").out)
    a, b = tensors_of(family / "ft1"), tensors_of(family / "ft2")
    name = "model.layers.3.mlp.down_proj.weight"
    assert got[name].dtype == torch.bfloat16
    assert torch.equal(got[name], linear(a[name], b[name], weights=(0.3, 0.7), normalize=True).to(torch.bfloat16))


def test_the_card_names_every_input_and_the_method(tmp_path: Path) -> None:
    """The card's tag and the method with its parameters (local inputs have no Hub id, so base_model and its
    relation are tested with Hub inputs in tests/engine/io/test_hub.py)."""
    family = tmp_path / "family"
    make_model(family / "base", layers=2, seed=1)
    finetune(family / "base", family / "ft1", seed=5)
    finetune(family / "base", family / "ft2", seed=6)
    finetune(family / "base", family / "ft3", seed=7)
    out = load_recipe(_recipe(tmp_path, family, STEPS["ties"])).run(tmp_path / "out").out
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "- merge" in front
    assert "merge: ties of `base`, `ft1`, `ft2` (base `base`)" in card
    assert "ft1: weight 0.6, density 0.5" in card
    assert "compute_dtype float32" in card  # the default, said all the same


@pytest.mark.parametrize("merge", [
    "{op: merge, method: ties, base: base, models: [{model: safe, weight: 0.5, density: 0.1}, "
    "{model: ft2, weight: 0.5, density: 0.1}]}",
    "{op: merge, method: linear, models: [{model: safe, weight: 0.5}, {model: ft2, weight: 0.5}]}",  # streamed
], ids=["ties", "linear"])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])  # bfloat16: the float32 weight kept exactly
def test_a_protected_super_weight_survives_a_merge(family: Path, tmp_path: Path, monkeypatch, merge: str,
                                                   compute_dtype: str) -> None:
    from recipekit.engine.run import evaluate

    monkeypatch.setattr(evaluate, "CAST_CHUNK_BYTES", 4096)  # the weight's row in a block of its own
    protect = ("{id: safe, op: protect_super_weights, model: ft1, coordinates: [{layer: 1, row: 3, column: 7}]}")
    recipe = _recipe(tmp_path, family, protect + "\n  - " + merge[:-1] + f", compute_dtype: {compute_dtype}}}")
    out = load_recipe(recipe).run(tmp_path / "out").out
    name = "model.layers.1.mlp.down_proj.weight"
    assert float(tensors_of(out)[name][3, 7]) == float(tensors_of(family / "ft1")[name][3, 7])


MISTAKES = [
    ("{op: merge, method: tiez, base: base, models: [{model: ft1}]}", "^tiez", "steps[0].method",
     ("'tiez'", "ties")),
    ("{op: merge, method: ties, models: [{model: ft1, weight: 1}]}", "- ^{op: merge", "steps[0].base",
     ("needs a base",)),
    ("{op: merge, method: slerp, base: base, models: [{model: ft1}, {model: ft2}], parameters: {t: 0.5}}",
     "models: ^[{model: ft1}, {model: ft2}]", "steps[0].models", ("exactly 1 model besides the base", "got 2")),
    ("{op: merge, method: model_stock, base: base, models: [{model: ft1}]}", "models: ^[{model: ft1}]",
     "steps[0].models", ("at least 2 models besides the base", "got 1")),
    ("{op: merge, method: ties, base: base, models: [{model: ft1, weight: 1, density: 1.5}]}", "density: ^1.5",
     "steps[0].models[0].density", ("must lie in [0, 1]", "1.5")),
    ("{op: merge, method: breadcrumbs, base: base, models: [{model: ft1, weight: 1, gamma: -0.1}]}",
     "gamma: ^-0.1", "steps[0].models[0].gamma", ("must lie in [0, 1]",)),
    ("{op: merge, method: della, base: base, models: [{model: ft1, weight: 1, density: 0.1, epsilon: 0.2}]}",
     "[^{model: ft1, weight: 1, density: 0.1", "steps[0].models[0]", ("+- epsilon", "(0, 1)")),
    ("{op: merge, method: slerp, base: base, models: [{model: ft1}], parameters: {t: 1.2}}", "t: ^1.2",
     "steps[0].parameters.t", ("must lie in [0, 1]",)),
    ("{op: merge, method: linear, models: [{model: ft1, weight: 1}, {model: ft2, weight: -1}]}",
     "- ^{op: merge", "steps[0].parameters.normalize", ("sum to zero",)),
    ("{op: merge, method: linear, models: [{model: ft1}, {model: ft2}]}", "[^{model: ft1}", "steps[0].models[0]",
     ("needs a weight", "'ft1'")),
    ("{op: merge, method: slerp, base: base, models: [{model: ft1}], parameters: {t: 0.5, density: 0.5}}",
     "density: ^0.5", "steps[0].parameters.density", ("slerp does not take density", "t")),
    ("{op: merge, method: ties, base: base, models: [{model: ft1, weight: 1}, {model: base, weight: 1}]}",
     "weight: ^1}]}", "steps[0].models[1].weight", ("base of a ties merge takes no weight",)),
    ("{op: merge, method: linear, models: [{model: ft1, weight: true}]}", "weight: ^true",
     "steps[0].models[0].weight", ("expected a number",)),
    ("{op: merge, method: linear, models: [{model: ft1, weight: .nan}, {model: ft2, weight: 1}]}", "weight: ^.nan",
     "steps[0].models[0].weight", ("finite",)),
]


@pytest.mark.parametrize("step, marker, path, words", MISTAKES, ids=[m[2] + ":" + m[3][0] for m in MISTAKES])
@pytest.mark.parametrize("command", ["run", "validate"])
def test_mistakes_are_located_and_nothing_is_written(family: Path, tmp_path: Path, capsys, step: str, marker: str,
                                                     path: str, words: tuple[str, ...], command: str) -> None:
    recipe = _recipe(tmp_path, family, step)
    out = tmp_path / "OUT"
    before = snapshot(tmp_path)
    result = cli(capsys, command, recipe, *(["-o", out] if command == "run" else []))
    assert_refused(result, [(f"{recipe}:{mark(recipe.read_text(), marker)}: {path}: ", words)])
    assert_no_output(out)
    assert snapshot(tmp_path) == before


def _other_model(family: Path, tmp_path: Path, **config) -> Path:
    return make_model(tmp_path / "other", layers=config.pop("layers", LAYERS), seed=4, **config)


@pytest.mark.parametrize("config, words", [
    ({"layers": 3}, ("has 3 layers", "has 4", "slice_layers")),
    ({"vocab_size": 100}, ("[100, 32]", "[96, 32]", "different vocabularies", "output.tokenizer")),
    ({"intermediate_size": 48}, ("mlp.down_proj.weight", "[32, 48]", "[32, 64]")),
])
def test_models_that_do_not_fit_are_named(family: Path, tmp_path: Path, capsys, config: dict,
                                          words: tuple[str, ...]) -> None:
    other = _other_model(family, tmp_path, **config)
    text = (f"recipe: 1\nmodels:\n  base: {family / 'base'}\n  other: {other}\nsteps:\n"
            "  - {op: merge, method: ties, base: base, models: [{model: other, weight: 1}]}\n")
    recipe = write_recipe(tmp_path, text)
    result = cli(capsys, "validate", recipe)
    assert_refused(result, [(f"{recipe}:{mark(text, '{model: ^other')}: steps[0].models[0].model: ", words)])


def test_a_linear_merge_streams_rows_from_file_to_file(family: Path, tmp_path: Path, monkeypatch) -> None:
    """Linear merges never hold whole tensors: the writer computes them a block of rows at a time."""
    from recipekit.engine.run import evaluate

    recipe = load_recipe(_recipe(tmp_path, family, STEPS["linear"], "output: {dtype: bfloat16}\n"))
    assert all(t.is_rowwise for t in recipe.plan().tensors)
    monkeypatch.setattr(evaluate, "CAST_CHUNK_BYTES", 4096)  # many blocks, a ragged last one

    class NoWholeTensors:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a rowwise merge went through the whole-tensor evaluator")

    monkeypatch.setattr(evaluate, "Evaluator", NoWholeTensors)
    got = tensors_of(recipe.run(tmp_path / "out").out)
    a, b = tensors_of(family / "ft1"), tensors_of(family / "ft2")
    for name in got:
        want = linear(a[name], b[name], weights=(0.3, 0.7), normalize=True).to(torch.bfloat16)
        assert torch.equal(got[name], want), name


def test_a_passthrough_scale_may_vary_across_the_layers(family: Path, tmp_path: Path) -> None:
    step = "{op: merge, method: passthrough, models: [{model: ft1, scale: [{filter: o_proj, value: [1, 0]}]}]}"
    got = tensors_of(load_recipe(_recipe(tmp_path, family, step)).run(tmp_path / "out").out)
    a = tensors_of(family / "ft1")
    for i in range(LAYERS):
        name = f"model.layers.{i}.self_attn.o_proj.weight"
        assert torch.allclose(got[name], a[name] * (1 - i / (LAYERS - 1)), atol=1e-7), name
        assert torch.equal(got[f"model.layers.{i}.mlp.up_proj.weight"], a[f"model.layers.{i}.mlp.up_proj.weight"])
