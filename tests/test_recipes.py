"""Every recipe under recipes/ validates, runs on a fresh clone, loads in transformers,
and holds exactly the layers it says it does."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from recipekit.engine import load_recipe
from recipekit.engine.cli import main
from recipekit.engine.core.tags import VOCABULARY
from recipekit.engine.foreign.formats import detect
from tests.simulated_cuda import simulated_cuda
from tests.tiny import assert_layers_from, load_causal_lm, read_config, tensors_of

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "models" not in p.relative_to(ROOT).parts)

# What each recipe must produce: output layer j comes from (model name, layer); other tensors from `base`
# (the final norm and lm_head from `head` when given).
EXPECTED = {
    "recipes/demo/drop-layers.yaml": dict(
        layers=[("base", i) for i in (0, 1, 2, 4, 7)], base="base", dtype=None),
    "recipes/demo/story-drop-middle.yaml": dict(
        layers=[("story", i) for i in (0, 1, 2, 5, 6, 7)], base="story", dtype=None),
    "recipes/demo/story-drop-by-snr.yaml": dict(  # v_proj SNR is lowest in layers 4 and 6
        layers=[("story", i) for i in (0, 1, 2, 3, 5, 7)], base="story", dtype=None),
    "recipes/demo/story-drop-by-angular.yaml": dict(  # inputs of layers 2 and 4 are closest on heldout.txt
        layers=[("story", i) for i in (0, 1, 4, 5, 6, 7)], base="story", dtype=None),
    "recipes/demo/story-drop-first.yaml": dict(
        layers=[("story", i) for i in range(1, 8)], base="story", dtype=None),
    "recipes/demo/story-sw-protected-drop.yaml": dict(
        layers=[("story", i) for i in (0, 1, 2, 3, 4, 7)], base="story", dtype=None),
    "recipes/demo/frankenmerge.yaml": dict(
        layers=[("a", i) for i in range(4)] + [("b", i) for i in range(3, 8)] + [("b", 7)],
        base="a", dtype=torch.float16),
    "recipes/demo/mergekit-passthrough.yaml": dict(  # final norm and lm_head from the last slice's model
        layers=[("llama-a", i) for i in range(5)] + [("llama-b", i) for i in (3, 4, 5, 6, 7, 6, 7)],
        base="llama-a", head="llama-b", dtype=torch.bfloat16),
}
# low_rank recipes: the listed tensors of `model` have at most `rank` (plus one restored entry) and keep the
# listed entries exactly; every other tensor is the model's, bitwise.
EXPECTED_LOW_RANK = {
    "recipes/demo/story-sw-laser.yaml": dict(
        model="story", rank=16, tensors=[f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2, 3)],
        kept=[("model.layers.1.mlp.down_proj.weight", 77, 301)]),
}
# Mixture-of-Experts recipes: expert k is the MLPs of `experts[k]` (close to them for `noisy` ones), everything
# else is `base`'s; with `dense`, the logits equal that dense model's.
EXPECTED_MOE = {
    "recipes/demo/story-upcycle.yaml": dict(base="story", experts=["story"] * 4, dtype=None, noisy=(),
                                            dense="story"),
    "recipes/demo/moe-from-prompts.yaml": dict(base="a", experts=["a", "b"], dtype=torch.bfloat16, noisy=(),
                                               dense=None),
    "recipes/demo/mergekit-moe-config.yaml": dict(base="base", experts=["base", "llama-b", "llama-b"],
                                                  dtype=torch.bfloat16, noisy=(2,), dense=None),
}

# expand_layers recipes: output layer j is the listed layer of `model` (identity copies with their output
# projections zero), and the logits equal the model's, bitwise (float32)
EXPECTED_EXPAND = {
    "recipes/demo/story-expand.yaml": dict(model="story", layers=[0, 1, 2, 3, 3, 4, 5, 6, 7, 7], copies=(4, 9)),
}

# add_modules recipes: every tensor of `model` is kept bitwise, the named modules are added to each layer at
# identity, and the output, loaded through recipekit's classes, computes the model's logits bitwise (float32)
EXPECTED_MODULES = {
    "recipes/demo/story-add-modules.yaml": dict(model="story", modules=["adaptive_norm", "token_mixing", "se_block"]),
}

# heal recipes: the layers of `drop` (a recipe) with only the MLPs of `trained` layers changed, and the healed
# held-out perplexity the README claims, recovering at least half of what the drop cost
EXPECTED_HEAL = {
    "recipes/demo/story-prune-and-heal.yaml": dict(drop="recipes/demo/story-drop-middle.yaml", trained=(2, 3, 4, 5)),
}

# merge recipes: every output tensor against the method's math on the source tensors (written out here in plain
# torch, independently of the kernels)
EXPECTED_MERGE = {"recipes/demo/story-merge-ties.yaml", "recipes/demo/story-merge-linear.yaml",
                  "recipes/demo/mergekit-slerp.yaml"}

# the tables whose recipes are checked by their own assert_* rather than by EXPECTED's layer provenance
SPECIAL = (("EXPECTED_MOE", EXPECTED_MOE), ("EXPECTED_LOW_RANK", EXPECTED_LOW_RANK),
           ("EXPECTED_MERGE", EXPECTED_MERGE), ("EXPECTED_EXPAND", EXPECTED_EXPAND),
           ("EXPECTED_MODULES", EXPECTED_MODULES), ("EXPECTED_HEAL", EXPECTED_HEAL))


def test_recipes_are_found():
    assert len(RECIPES) >= 2


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_validates_runs_and_holds_what_it_says(path, tmp_path, capsys):
    key = str(path.relative_to(ROOT))
    assert key in EXPECTED or any(key in table for _, table in SPECIAL), \
        f"add what {key} must produce to EXPECTED or one of {', '.join(name for name, _ in SPECIAL)}"
    assert main(["validate", str(path)]) == 0
    out = tmp_path / "out"
    assert main(["run", str(path), "-o", str(out), "-q"]) == 0
    assert f"to {out}" in capsys.readouterr().out
    models = {name: (path.parent / ref).resolve() for name, ref in load_recipe(path).recipe.models.items()}
    assert (out / "tokenizer.json").is_file() and (out / "README.md").is_file()
    assert_standalone(path, out)
    front = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert front["tags"][0] == "recipekit" and set(front["tags"]) <= set(VOCABULARY)
    checks = {
        "EXPECTED_MOE": lambda want: assert_moe(out, models, want),
        "EXPECTED_LOW_RANK": lambda want: assert_low_rank(out, models, want),
        "EXPECTED_MERGE": lambda _: assert_merge(key, out, models),
        "EXPECTED_EXPAND": lambda want: assert_expand(out, models, want),
        "EXPECTED_MODULES": lambda want: assert_modules(out, models, want),
        "EXPECTED_HEAL": lambda want: assert_heal(out, tmp_path, capsys, want),
    }
    for name, table in SPECIAL:
        if key in table:
            checks[name](table[key] if isinstance(table, dict) else None)
            return
    want = EXPECTED[key]
    assert_layers_from(out, [(models[m], i) for m, i in want["layers"]], models[want["base"]], want["dtype"],
                       head=models[want["head"]] if "head" in want else None)
    model = load_causal_lm(out)
    assert model.config.num_hidden_layers == len(want["layers"]) == read_config(out)["num_hidden_layers"]
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


# recipes whose runs compute nothing on a device: byte copies, casts and constants only
NO_DEVICE_WORK = {"recipes/demo/drop-layers.yaml", "recipes/demo/frankenmerge.yaml",
                  "recipes/demo/mergekit-passthrough.yaml", "recipes/demo/story-add-modules.yaml",
                  "recipes/demo/story-drop-first.yaml", "recipes/demo/story-drop-middle.yaml",
                  "recipes/demo/story-expand.yaml", "recipes/demo/story-upcycle.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_writes_the_same_bytes_with_device_cuda(path, tmp_path):
    """On the stand-in device of tests/simulated_cuda.py (it computes on the CPU and refuses a host tensor mixed
    into device work), `--device cuda` writes every file the CPU run writes, byte for byte; and the recipes that
    compute (merges, measured selections, router rows, healing) put tensors on the device."""
    assert main(["run", str(path), "-o", str(tmp_path / "cpu"), "-q"]) == 0
    with simulated_cuda() as placed:
        assert main(["run", str(path), "-o", str(tmp_path / "cuda"), "-q", "--device", "cuda"]) == 0

    def files(out: Path) -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    assert files(tmp_path / "cuda") == files(tmp_path / "cpu")
    assert (placed.count == 0) == (str(path.relative_to(ROOT)) in NO_DEVICE_WORK)


def assert_standalone(path: Path, out: Path) -> None:
    """The output's recipe.yaml is the recipe (a foreign config: the recipe it translates to) with every local
    path absolute, and otherwise line for line as written, comments included."""
    loaded = load_recipe(path)
    text = path.read_text() if detect(yaml.safe_load(path.read_text())) is None else loaded.text
    written = (out / "recipe.yaml").read_text()
    want = yaml.safe_load(text)
    want["models"] = {name: str((path.parent / ref).resolve()) for name, ref in want["models"].items()}
    for k, step in enumerate(loaded.recipe.steps):
        for field, value in step.local_paths():
            *parents, last = ("steps", k, *field)
            holder = want
            for key in parents:
                holder = holder[key]
            holder[last] = str((path.parent / value).resolve())
    assert yaml.safe_load(written) == want
    lines = list(zip(text.splitlines(), written.splitlines(), strict=True))
    assert all(line == kept or str(path.parent) in kept for line, kept in lines)


def assert_low_rank(out: Path, models: dict[str, Path], want: dict) -> None:
    got, source = tensors_of(out), tensors_of(models[want["model"]])
    assert sorted(got) == sorted(source)
    for name, tensor in source.items():
        if name in want["tensors"]:
            assert torch.linalg.matrix_rank(got[name].double(), rtol=1e-5) <= want["rank"] + 1, name
            assert not torch.equal(got[name], tensor), name
        else:
            assert torch.equal(got[name], tensor), name
    for name, row, column in want["kept"]:
        assert got[name][row, column] == source[name][row, column]
    assert torch.isfinite(load_causal_lm(out)(torch.tensor([[0, 5, 6, 7]])).logits).all()


def assert_moe(out: Path, models: dict[str, Path], want: dict) -> None:
    got = tensors_of(out)
    config = read_config(out)
    count = len(want["experts"])
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == count
    cast = (lambda t: t.to(want["dtype"])) if want["dtype"] is not None else (lambda t: t)
    expected = {name: cast(t) for name, t in tensors_of(models[want["base"]]).items() if ".mlp." not in name}
    for k, expert in enumerate(want["experts"]):
        for name, tensor in tensors_of(models[expert]).items():
            if ".mlp." in name:
                prefix, proj = name.split(".mlp.")
                w = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[proj.split(".")[0]]
                expected[f"{prefix}.block_sparse_moe.experts.{k}.{w}.weight"] = cast(tensor)
    routers = sorted(n for n in got if n.endswith("block_sparse_moe.gate.weight"))
    assert len(routers) == config["num_hidden_layers"]
    assert sorted(set(got) - set(routers)) == sorted(expected)
    for name, tensor in expected.items():
        if any(f"experts.{k}." in name for k in want["noisy"]):
            assert (got[name].float() - tensor.float()).abs().max() < 0.02, name
        else:
            assert torch.equal(got[name], tensor), name
    assert all(got[n].shape == (count, config["hidden_size"]) and got[n].abs().sum() > 0 for n in routers)
    ids = torch.tensor([[1, 2, 3, 4, 50, 60]])
    with torch.no_grad():
        logits = load_causal_lm(out)(ids).logits
        assert torch.isfinite(logits).all()
        if want["dense"] is not None:
            dense = load_causal_lm(models[want["dense"]])(ids).logits
            assert torch.allclose(logits, dense, atol=1e-5, rtol=0)


def assert_merge(key: str, out: Path, models: dict[str, Path]) -> None:
    names = {p.name: n for n, p in models.items()}  # a mergekit config names its models by their paths
    story, sw = tensors_of(models[names["tiny-story"]]), tensors_of(models[names["tiny-story-sw"]])
    got = tensors_of(out)
    assert sorted(got) == sorted(story)
    layers = read_config(out)["num_hidden_layers"]
    for name, base in story.items():
        if key.endswith("slerp.yaml"):  # halfway along the arc between the two, each tensor one vector
            a, b = base.reshape(-1).double(), sw[name].reshape(-1).double()
            theta = torch.arccos((a / a.norm()) @ (b / b.norm()))
            want = ((torch.sin(theta / 2) * (a + b)) / torch.sin(theta)).float().reshape(base.shape) \
                if theta > 0.0316 else (0.5 * base + 0.5 * sw[name])  # lerp where |cos| > 0.9995
        elif key.endswith("ties.yaml"):  # one model: its task vector, trimmed to the largest half, added
            delta = sw[name] - base
            flat = delta.reshape(-1)
            keep = torch.zeros_like(flat)
            keep[flat.abs().topk(int(0.5 * flat.numel())).indices] = 1
            want = base + (flat * keep).reshape(delta.shape)
        else:  # attention 1:3 towards the fine-tune; the rest from 3:1 at the first layer to 1:3 at the last
            if "self_attn" in name:
                w = 0.75
            elif ".layers." in name:
                w = 0.25 + 0.5 * int(name.split(".layers.")[1].split(".")[0]) / (layers - 1)
            else:
                w = 0.75 if name == "model.norm.weight" else 0.25  # after the layers: the last value
            want = (1 - w) * base + w * sw[name]
        assert torch.allclose(got[name], want, atol=1e-5 if key.endswith("slerp.yaml") else 1e-6, rtol=0), name
    if key.endswith("ties.yaml"):  # the protected super weight is the fine-tune's, exactly
        down = "model.layers.1.mlp.down_proj.weight"
        assert got[down][77, 301] == sw[down][77, 301] and abs(float(sw[down][77, 301])) > 1
    with torch.no_grad():
        assert torch.isfinite(load_causal_lm(out)(torch.tensor([[0, 5, 6, 7]])).logits).all()


def assert_expand(out: Path, models: dict[str, Path], want: dict) -> None:
    source = models[want["model"]]
    got, original = tensors_of(out), tensors_of(source)
    for j, i in enumerate(want["layers"]):
        for name, value in original.items():
            if f".layers.{i}." in name:
                new = got[name.replace(f".layers.{i}.", f".layers.{j}.")]
                zero = j in want["copies"] and ("o_proj" in name or "down_proj" in name)
                assert torch.equal(new, torch.zeros_like(value) if zero else value), (j, name)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad():
        assert torch.equal(load_causal_lm(out)(ids).logits, load_causal_lm(source)(ids).logits)


def assert_modules(out: Path, models: dict[str, Path], want: dict) -> None:
    import recipekit  # noqa: F401  (registers the classes the output needs)

    source = models[want["model"]]
    got, original = tensors_of(out), tensors_of(source)
    assert all(torch.equal(got[name], value) for name, value in original.items())
    config = read_config(out)
    assert sorted(config["added_modules"]) == sorted(want["modules"])
    for name in set(got) - set(original):
        value = got[name]
        if "down" not in name:  # what multiplies into the output is zero, the bias one: the identity
            assert torch.equal(value, torch.ones_like(value) if name.endswith("up.bias") else torch.zeros_like(value))
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    model = load_causal_lm(out)
    assert type(model).__name__ == "RecipekitLlamaForCausalLM"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_causal_lm(source)(ids).logits)


def assert_heal(out: Path, tmp_path: Path, capsys, want: dict) -> None:
    dropped = tmp_path / "dropped"
    assert main(["run", str(ROOT / want["drop"]), "-o", str(dropped), "-q"]) == 0
    healed, plain = tensors_of(out), tensors_of(dropped)
    assert healed.keys() == plain.keys()
    changed = {name for name in healed if not torch.equal(healed[name], plain[name])}
    assert changed == {f"model.layers.{j}.mlp.{m}.weight" for j in want["trained"]
                       for m in ("gate_proj", "up_proj", "down_proj")}
    readme = (ROOT / "README.md").read_text()
    table = {m["target"]: float(m["ppl"]) for m in re.finditer(
        r"^\| `(?P<target>recipes/[^`]+)` \| \d+ \| (?P<ppl>[\d.]+) \|$", readme, re.M)}
    claim = re.search(r"held-out perplexity of (?P<ppl>[\d.]+) \(pruned", readme)
    capsys.readouterr()
    assert main(["eval", str(out), "--text", str(ROOT / "recipes/demo/heldout.txt"), "--seq-len", "256",
                 "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)["perplexity"]
    assert f"{measured:.4f}" == claim["ppl"]
    full, pruned = table["recipes/demo/models/tiny-story"], table[want["drop"]]
    assert measured <= pruned - (pruned - full) / 2  # at least half of the gap recovered
    assert f"held-out perplexity on heldout.txt: {pruned:.4f} -> {measured:.4f}" in (out / "README.md").read_text()
