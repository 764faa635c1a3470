"""The build loop's checks that every op passes: kernels must be registered before anything executes."""
from __future__ import annotations

from pathlib import Path

import pytest

from recipekit.engine.core.graph import Apply, Load, created, elementwise
from recipekit.ops import registry
from recipekit.ops.layers.drop_layers import DropLayers, drop_layers
from tests.bad_inputs.checks import assert_no_output, assert_refused, cli, mark, snapshot
from tests.tiny import write_recipe

RECIPE = "recipe: 1\nmodels: {a: ./llama}\nsteps:\n  - op: drop_layers\n    model: a\n    layers: [1]\n"


def _with_kernel(kernel: str):
    """drop_layers, but one tensor computed by `kernel`."""
    def rewrite(step, models, probe):
        model = drop_layers(step, models, probe)
        name = "model.norm.weight"
        return model.evolve(tensors={**model.tensors, name: elementwise(kernel, model.tensors[name], factor=2.0)})
    return registry.Op(DropLayers, rewrite)


@pytest.mark.parametrize("command", ["run", "plan", "validate"])
def test_a_kernel_no_op_registered_is_refused_when_the_graph_is_built(tmp_path: Path, llama: Path, capsys,
                                                                       monkeypatch, command: str) -> None:
    (tmp_path / "llama").symlink_to(llama)
    recipe = write_recipe(tmp_path, RECIPE)
    monkeypatch.setitem(registry.OPS, "drop_layers", _with_kernel("no_such_kernel"))
    out = tmp_path / "OUT"
    before = snapshot(tmp_path)

    result = cli(capsys, command, recipe, *(["-o", out] if command == "run" else []))

    assert_refused(result, [(f"{recipe}:{mark(recipe.read_text(), '- ^op: drop_layers')}: steps[0]: ",
                             ("'no_such_kernel'", "no op registers"))])
    assert_no_output(out)
    assert snapshot(tmp_path) == before


def test_a_registered_kernel_passes_the_check(tmp_path: Path, llama: Path, capsys, monkeypatch) -> None:
    """The check above can pass: the same rewrite with a kernel some op registers builds and runs."""
    (tmp_path / "llama").symlink_to(llama)
    recipe = write_recipe(tmp_path, RECIPE)
    monkeypatch.setitem(registry.OPS, "drop_layers", _with_kernel("scale"))
    assert cli(capsys, "run", recipe, "-o", tmp_path / "OUT", "-q").rc == 0


def test_every_registered_kernel_is_callable_and_named_once() -> None:
    assert {"cast", "zeros", "constant", "randn", "uniform", "zero_at", "noise", "scale", "low_rank"} <= set(
        registry.KERNELS)
    assert all(callable(k) for k in registry.KERNELS.values())


def test_a_kernel_registered_twice_is_an_error() -> None:
    twice = registry.Op(DropLayers, drop_layers, {"cast": lambda x: x})
    with pytest.raises(TypeError, match="kernel 'cast' is registered twice"):
        registry._register([twice])


def test_node_helpers_derive_dtype_and_shape() -> None:
    from recipekit.engine.io.safetensors_header import TensorInfo

    x = Load(TensorInfo("w", "BF16", (3, 4), Path("f"), 0, 24))
    assert elementwise("scale", x, factor=0.5) == Apply("scale", (x,), (("factor", 0.5),), "BF16", (3, 4))
    assert created("randn", "F32", (2, 5), seed=1, name="r", std=1.0) == Apply(
        "randn", (), (("seed", 1), ("name", "r"), ("std", 1.0), ("dtype", "F32"), ("shape", (2, 5))), "F32", (2, 5))


def _card_steps(out: Path) -> list[str]:
    card = (out / "README.md").read_text()
    return card.split("## Steps\n\n", 1)[1].split("\n\n", 1)[0].splitlines()


def test_the_card_lists_every_step_that_ran_once_in_order_even_two_alike(tmp_path: Path, llama: Path) -> None:
    """Two low_rank steps write the same note; the card still lists both, numbered, then the drop that reads them."""
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{a: {llama}}}
        steps:
          - {{id: once, op: low_rank, model: a, modules: [mlp.down_proj], layers: [0], rank: 4}}
          - {{id: twice, op: low_rank, model: once, modules: [mlp.down_proj], layers: [0], rank: 4}}
          - {{op: drop_layers, model: twice, layers: [5]}}
        """)
    out = tmp_path / "out"
    assert cli_run(recipe, out) == 0
    assert _card_steps(out) == [
        "- step 1 (`once`): low_rank: 1 matrix to rank 4",
        "- step 2 (`twice`): low_rank: 1 matrix to rank 4",
        "- step 3: `drop_layers` removed layers 5 of `twice` (6 -> 5 layers)",
    ]


def test_a_step_read_by_two_later_steps_is_listed_once(tmp_path: Path, llama: Path) -> None:
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{a: {llama}}}
        steps:
          - {{id: p, op: drop_layers, model: a, layers: [0]}}
          - {{id: q, op: drop_layers, model: p, layers: [0]}}
          - op: slice_layers
            slices: [{{model: q, range: [0, 2]}}, {{model: p, range: [0, 2]}}]
        """)
    out = tmp_path / "out"
    assert cli_run(recipe, out) == 0
    steps = _card_steps(out)
    assert [s.split(":")[0] for s in steps] == ["- step 1 (`p`)", "- step 2 (`q`)", "- step 3"], steps


def cli_run(recipe: Path, out: Path) -> int:
    from recipekit.engine.cli import main

    return main(["run", str(recipe), "-o", str(out), "-q"])
