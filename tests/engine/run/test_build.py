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
