"""Mixture-of-Experts mistakes: exit 2, one located line each, nothing written (see tests/test_bad_inputs.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.bad_inputs.checks import COMMANDS, assert_recipe_refused, line, yaml_text
from tests.tiny import make_model


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("moe-bad")
    make_model(root / "wide", layers=6, hidden_size=48, num_attention_heads=4, head_dim=12, seed=4)
    make_model(root / "qwen3", family="qwen3", layers=6, seed=5)
    make_model(root / "short", layers=4, seed=6)
    return root


@pytest.fixture
def work(tmp_path: Path, llama: Path, moe_models: Path) -> Path:
    shutil.copytree(llama, tmp_path / "llama")
    for name in ("wide", "qwen3", "short"):
        shutil.copytree(moe_models / name, tmp_path / name)
    return tmp_path


HEAD = """
recipe: 1
models: {a: ./llama, b: ./llama, wide: ./wide, qwen3: ./qwen3, short: ./short}
steps:
"""

CASES = {
    "more-experts-per-token-than-experts": (
        """
          - id: moe
            op: stack_experts
            base: a
            experts_per_token: 3
            experts: [{model: a}, {model: b}]
          - {op: init_gates, model: moe, mode: random}
        """,
        [line("experts_per_token: ^3", "steps[0].experts_per_token", "experts_per_token is 3",
              "only 2 experts")]),
    "expert-hidden-size-differs": (
        """
          - id: moe
            op: stack_experts
            base: a
            experts: [{model: a}, {model: wide}]
          - {op: init_gates, model: moe, mode: random}
        """,
        [line("{model: ^wide}", "steps[0].experts[1].model", "expert 'wide' does not fit the base",
              "hidden and intermediate sizes")]),
    "expert-layer-count-differs": (
        """
          - id: moe
            op: stack_experts
            base: a
            experts: [{model: short}, {model: a}]
          - {op: init_gates, model: moe, mode: random}
        """,
        [line("{model: ^short}", "steps[0].experts[0].model", "expert 'short' has 4 layers, the base has 6")]),
    "prompt-gates-without-a-tokenizer": (
        """
          - id: moe
            op: stack_experts
            base: a
            experts: [{model: a, positive: [x]}, {model: b, positive: [y]}]
          - {op: init_gates, model: moe, mode: hidden}
        """,
        [line("mode: ^hidden", "steps[1].mode", "mode hidden tokenises the experts' prompts",
              "has no tokenizer.json")]),
    "shared-expert-without-gate-prompts": (
        """
          - id: moe
            op: stack_experts
            base: a
            shared_expert: {model: b}
            experts: [{model: a, positive: [x]}, {model: b, positive: [y]}]
          - {op: init_gates, model: moe, mode: cheap_embed}
        """,
        [line("mode: ^cheap_embed", "steps[1].mode", "needs prompts for the shared expert (b)")]),
    "shared-expert-in-a-mixtral": (
        """
          - id: moe
            op: stack_experts
            base: a
            layout: mixtral
            shared_expert: {model: b}
            experts: [{model: a}, {model: b}]
          - {op: init_gates, model: moe, mode: random}
        """,
        [line("shared_expert: ^{model: b}", "steps[0].shared_expert", "mixtral has no shared expert", "qwen2_moe")]),
    "stack-without-init-gates": (
        """
          - id: moe
            op: stack_experts
            base: a
            experts: [{model: a}, {model: b}]
        """,
        [line("- ^id: moe", "steps[0]", "routers of this Mixture of Experts are not set", "add an init_gates")]),
    "init-gates-on-a-dense-model": (
        """
          - {op: init_gates, model: a, mode: random}
        """,
        [line("model: ^a, mode", "steps[0].model", "'a' is not the result of a stack_experts step")]),
    "mixtral-layout-for-a-qwen3-base": (
        """
          - id: moe
            op: stack_experts
            base: qwen3
            layout: mixtral
            experts: [{model: qwen3}, {model: qwen3}]
          - {op: init_gates, model: moe, mode: random}
        """,
        [line("layout: ^mixtral", "steps[0].layout", "layout mixtral cannot hold the attention of a 'qwen3' base")]),
    "mixtral-without-renormalised-top-k": (
        """
          - id: moe
            op: stack_experts
            base: a
            norm_topk_prob: false
            experts: [{model: a}, {model: b}]
          - {op: init_gates, model: moe, mode: random}
        """,
        [line("norm_topk_prob: ^false", "steps[0].norm_topk_prob", "mixtral always renormalises")]),
    "misspelt-prompt-key": (
        """
          - id: moe
            op: stack_experts
            base: a
            experts: [{model: a, positive_prompts: [x]}, {model: b}]
          - {op: init_gates, model: moe, mode: random}
        """,
        [line("{model: a, ^positive_prompts", "steps[0].experts[0].positive_prompts", "unknown key",
              "did you mean 'positive'")]),
    "unknown-gate-mode": (
        """
          - id: moe
            op: stack_experts
            base: a
            experts: [{model: a}, {model: b}]
          - {op: init_gates, model: moe, mode: kaiming}
        """,
        [line("mode: ^kaiming", "steps[1].mode", "random", "cheap_embed")]),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(CASES))
def test_moe_mistake(work: Path, capsys, case: str, command: str) -> None:
    body, lines = CASES[case]
    assert_recipe_refused(work, capsys, command, yaml_text(HEAD) + yaml_text(body), lines)
