"""stack_experts and init_gates, checked through what transformers loads: logits, routing and tensors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipekit.engine import load_recipe
from tests.tiny import add_char_tokenizer, load_causal_lm, make_model, read_config, tensors_of, write_recipe

PROMPTS = {
    0: ["0123 4567 89", "31 41 59 26", "2718 2818 28"],
    1: ["the cat sat on", "a dog ran far", "we like tea"],
    2: ["HELLO WORLD!", "STOP. GO? YES!", "ABC; DEF: GHI"],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A llama base with a tokenizer, three distinct llama experts, and a qwen3 base."""
    root = tmp_path_factory.mktemp("moe-models")
    add_char_tokenizer(make_model(root / "base", seed=0))
    for k in range(3):
        make_model(root / f"e{k}", seed=10 + k)
    add_char_tokenizer(make_model(root / "qwen3", family="qwen3", seed=3))
    return root


def stack(folder: Path, models: Path, body: str, name: str = "moe.yaml") -> Path:
    return write_recipe(folder, f"""
        recipe: 1
        models: {{base: {models}/base, e0: {models}/e0, e1: {models}/e1, e2: {models}/e2, qwen3: {models}/qwen3}}
        steps:
        {body}
        output: {{dtype: float32, tokenizer: base}}
        """.replace("\n        ", "\n"), name)


def build(recipe: Path, out: Path) -> Path:
    load_recipe(recipe).run(out)
    return out


def logits(path: Path, ids: torch.Tensor, **kwargs):
    with torch.no_grad():
        return load_causal_lm(path)(ids, **kwargs)


IDS = torch.tensor([[0, 5, 17, 33, 2, 90, 41, 8, 8, 60], [0, 70, 3, 3, 12, 45, 46, 47, 20, 11]])


@pytest.mark.parametrize("base, layout, gates", [
    ("base", "mixtral", "mode: random"),
    ("base", "mixtral", "mode: hidden"),
    ("qwen3", "qwen3_moe", "mode: random"),
    ("qwen3", "qwen3_moe", "{mode: cheap_embed, token: mean}"),
])
def test_identical_experts_compute_the_dense_model(tmp_path: Path, models: Path, base: str, layout: str,
                                                   gates: str) -> None:
    """N copies of the base's MLP with renormalised top-k weights: whatever the router says, the output is the
    dense base's."""
    prompts = "positive: ['the cat', 'HELLO']"
    recipe = stack(tmp_path, models, f"""
          - id: moe
            op: stack_experts
            base: {base}
            layout: {layout}
            norm_topk_prob: true
            experts: [{{model: {base}, {prompts}}}, {{model: {base}, positive: ['0123']}}, {{model: {base}}}]
          - {{op: init_gates, model: moe, {gates.strip('{}')}}}
        """)
    out = build(recipe, tmp_path / "out")
    config = read_config(out)
    assert config["model_type"] == layout and config["num_experts_per_tok"] == 2
    # transformers 4 reads rope_theta (Mixtral's default is 1e6): it must be written out
    assert config["rope_theta"] == read_config(models / base)["rope_parameters"]["rope_theta"]
    dense = logits(models / base, IDS).logits
    moe = logits(out, IDS).logits
    assert torch.allclose(moe, dense, atol=1e-5, rtol=0), (moe - dense).abs().max()


def test_expert_tensors_are_the_experts_mlps_and_the_rest_is_the_base(tmp_path: Path, models: Path) -> None:
    recipe = stack(tmp_path, models, """
          - id: moe
            op: stack_experts
            base: base
            experts: [{model: e0}, {model: e1}, {model: e2}]
          - {op: init_gates, model: moe, mode: random}
        """)
    got = tensors_of(build(recipe, tmp_path / "out"))
    base = tensors_of(models / "base")
    experts = [tensors_of(models / f"e{k}") for k in range(3)]
    names = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
    expected = {}
    for name, tensor in base.items():
        if ".mlp." not in name:
            expected[name] = tensor
    for k, tensors in enumerate(experts):
        for name, tensor in tensors.items():
            if ".mlp." in name:
                prefix, proj = name.split(".mlp.")
                expected[f"{prefix}.block_sparse_moe.experts.{k}.{names[proj.split('.')[0]]}.weight"] = tensor
    routers = {n for n in got if n.endswith("block_sparse_moe.gate.weight")}
    assert len(routers) == 4 and all(got[n].shape == (3, 32) for n in routers)
    assert sorted(set(got) - routers) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_hidden_gates_route_each_experts_prompts_to_it(tmp_path: Path, models: Path) -> None:
    """Distinct experts and prompt sets: top-1 routing of every token of an expert's prompts, measured in the
    loaded model, goes to that expert far more often than chance (1/3)."""
    entries = []
    for k in range(3):
        others = [p for j in range(3) if j != k for p in PROMPTS[j]]
        entries.append(f"{{model: e{k}, positive: {json.dumps(PROMPTS[k])}, negative: {json.dumps(others)}}}")
    recipe = stack(tmp_path, models, f"""
          - id: moe
            op: stack_experts
            base: base
            experts_per_token: 1
            experts: [{", ".join(entries)}]
          - {{op: init_gates, model: moe, mode: hidden, token: mean}}
        """)
    out = build(recipe, tmp_path / "out")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(models / "base" / "tokenizer.json"))
    model = load_causal_lm(out)
    shares = torch.zeros(3, 4)
    for k, prompts in PROMPTS.items():
        for prompt in prompts:
            ids = torch.tensor([[0, *tokenizer.encode(prompt).ids]])
            with torch.no_grad():
                router_logits = model(ids, output_router_logits=True).router_logits
            shares[k] += torch.stack([(r.argmax(-1)[1:] == k).float().mean() for r in router_logits]) / len(prompts)
    assert shares.mean() > 0.7, shares
    assert (shares.mean(dim=1) > 0.55).all(), shares


def test_hidden_gates_are_the_normalised_router_inputs(tmp_path: Path, models: Path) -> None:
    """A gate row is the unit vector of mean(positive) - mean(negative) of the state the router sees
    (post_attention_layernorm's output), here taken from transformers' own forward with hooks."""
    recipe = stack(tmp_path, models, """
          - id: moe
            op: stack_experts
            base: base
            experts: [{model: e0, positive: ['the cat sat', 'a dog'], negative: ['0123']}, {model: e1, positive: ['HELLO']}]
          - {op: init_gates, model: moe, mode: hidden}
        """)
    got = tensors_of(build(recipe, tmp_path / "out"))
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(models / "base" / "tokenizer.json"))
    dense = load_causal_lm(models / "base")
    captured = {}

    def vectors(prompt: str) -> list[torch.Tensor]:
        hooks = [layer.post_attention_layernorm.register_forward_hook(
            lambda m, i, o, n=n: captured.__setitem__(n, o[0, -1])) for n, layer in enumerate(dense.model.layers)]
        with torch.no_grad():
            dense(torch.tensor([[0, *tokenizer.encode(prompt).ids]]))
        for hook in hooks:
            hook.remove()
        return [captured[n].double() for n in range(4)]

    a, b, neg, h = (vectors(p) for p in ("the cat sat", "a dog", "0123", "HELLO"))
    for i in range(4):
        rows = torch.stack([(a[i] + b[i]) / 2 - neg[i], h[i]])
        rows = rows / rows.norm(dim=1, keepdim=True)
        gate = got[f"model.layers.{i}.block_sparse_moe.gate.weight"].double()
        assert torch.allclose(gate, rows, atol=1e-4), (gate - rows).abs().max()


def test_cheap_embed_gates_are_the_same_in_every_layer(tmp_path: Path, models: Path) -> None:
    recipe = stack(tmp_path, models, """
          - id: moe
            op: stack_experts
            base: base
            experts: [{model: e0, positive: ['ab', 'c']}, {model: e1, positive: ['9'], negative: ['ab']}]
          - {op: init_gates, model: moe, mode: cheap_embed, token: mean}
        """)
    got = tensors_of(build(recipe, tmp_path / "out"))
    embed = tensors_of(models / "base")["model.embed_tokens.weight"].double()
    ab, c, nine = embed[[2 + 10, 2 + 11]].mean(0), embed[2 + 12], embed[2 + 9]  # "0" is id 2: digits first
    rows = torch.stack([(ab + c) / 2, nine - ab])
    rows = rows / rows.norm(dim=1, keepdim=True)
    for i in range(4):
        assert torch.allclose(got[f"model.layers.{i}.block_sparse_moe.gate.weight"].double(), rows, atol=1e-6)


def test_random_gates_are_byte_identical_across_runs_and_follow_the_seed(tmp_path: Path, models: Path) -> None:
    def run(name: str, seed: int) -> dict[str, bytes]:
        recipe = stack(tmp_path, models, f"""
          - id: moe
            op: stack_experts
            base: base
            experts: [{{model: e0}}, {{model: e1}}]
          - {{op: init_gates, model: moe, mode: random, seed: {seed}}}
        """, f"{name}.yaml")
        out = build(recipe, tmp_path / name)
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    first, again, other = run("a", 7), run("b", 7), run("c", 8)
    assert first == again
    assert first["model-00001-of-00001.safetensors"] != other["model-00001-of-00001.safetensors"]
    gate = tensors_of(tmp_path / "a")["model.layers.0.block_sparse_moe.gate.weight"]
    assert 0.5 < float(gate.std()) < 1.5  # std 1 by default


def test_uniform_gates_give_equal_routing_probabilities(tmp_path: Path, models: Path) -> None:
    recipe = stack(tmp_path, models, """
          - id: moe
            op: stack_experts
            base: base
            experts: [{model: e0}, {model: e1}, {model: e2}]
          - {op: init_gates, model: moe, mode: uniform}
        """)
    out = build(recipe, tmp_path / "out")
    router_logits = logits(out, IDS, output_router_logits=True).router_logits
    for layer in router_logits:
        assert torch.allclose(torch.softmax(layer, dim=-1), torch.full((IDS.numel(), 3), 1 / 3))


def test_noise_and_residual_scale(tmp_path: Path, models: Path) -> None:
    recipe = stack(tmp_path, models, """
          - id: moe
            op: stack_experts
            base: base
            experts: [{model: e0, residual_scale: 0.5}, {model: e1, noise_scale: 0.01}]
          - {op: init_gates, model: moe, mode: random}
        """)
    got = tensors_of(build(recipe, tmp_path / "out"))
    e0, e1 = tensors_of(models / "e0"), tensors_of(models / "e1")
    layer = "model.layers.2"
    assert torch.equal(got[f"{layer}.block_sparse_moe.experts.0.w2.weight"], e0[f"{layer}.mlp.down_proj.weight"] * 0.5)
    assert torch.equal(got[f"{layer}.block_sparse_moe.experts.0.w1.weight"], e0[f"{layer}.mlp.gate_proj.weight"])
    noise = got[f"{layer}.block_sparse_moe.experts.1.w3.weight"] - e1[f"{layer}.mlp.up_proj.weight"]
    assert 0.008 < float(noise.std()) < 0.012 and abs(float(noise.mean())) < 0.002


def test_qwen2_moe_with_a_shared_expert(tmp_path: Path, models: Path) -> None:
    """A Llama base in qwen2_moe: zero q/k/v biases keep attention exact; the shared expert adds
    sigmoid(gate . x) * shared(x), which we check against the dense models' MLPs in transformers."""
    recipe = stack(tmp_path, models, """
          - id: moe
            op: stack_experts
            base: base
            shared_expert: {model: e2, positive: ['the cat'], residual_scale: 0.1}
            experts: [{model: base, positive: ['0123']}, {model: base, positive: ['HELLO']}]
          - {op: init_gates, model: moe, mode: hidden}
        """)
    out = build(recipe, tmp_path / "out")
    config = read_config(out)
    assert config["model_type"] == "qwen2_moe" and config["shared_expert_intermediate_size"] == 64
    got = tensors_of(out)
    assert torch.equal(got["model.layers.1.self_attn.q_proj.bias"], torch.zeros(32))
    assert torch.equal(got["model.layers.1.mlp.shared_expert.down_proj.weight"],
                       tensors_of(models / "e2")["model.layers.1.mlp.down_proj.weight"] * 0.1)
    # experts equal to the base's MLP: the MoE block is mlp(x) + sigmoid(g . x) * 0.1 * shared(x)
    moe, base, shared = load_causal_lm(out), load_causal_lm(models / "base"), load_causal_lm(models / "e2")
    x = torch.randn(5, 32)
    with torch.no_grad():
        block = moe.model.layers[1].mlp(x[None])[0]
        gate = torch.sigmoid(x @ got["model.layers.1.mlp.shared_expert_gate.weight"].T)
        want = base.model.layers[1].mlp(x) + gate * 0.1 * shared.model.layers[1].mlp(x)
    assert torch.allclose(block, want, atol=1e-5)


def test_thirty_two_experts_build_load_and_run(tmp_path: Path, models: Path) -> None:
    experts = ", ".join(f"{{model: e{k % 3}, noise_scale: 0.001}}" for k in range(32))
    recipe = stack(tmp_path, models, f"""
          - id: moe
            op: stack_experts
            base: base
            experts_per_token: 4
            experts: [{experts}]
          - {{op: init_gates, model: moe, mode: random}}
        """)
    out = build(recipe, tmp_path / "out")
    assert read_config(out)["num_local_experts"] == 32
    result = logits(out, IDS, output_router_logits=True)
    assert torch.isfinite(result.logits).all()
    assert result.router_logits[0].shape == (IDS.numel(), 32)


def test_inferred_layout_is_announced_and_identical_experts_warned(tmp_path: Path, models: Path, capsys) -> None:
    from recipekit.engine.cli import main

    recipe = stack(tmp_path, models, """
          - id: moe
            op: stack_experts
            base: qwen3
            experts: [{model: qwen3}, {model: qwen3}]
          - {op: init_gates, model: moe, mode: uniform}
        """)
    assert main(["plan", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "stack_experts: layout qwen3_moe, because the base is a Qwen3 model" in err
    assert "warning: experts 0, 1 are the same weights (qwen3)" in err
    assert "uniform: every router weight is zero" in err


def test_prompts_that_cannot_separate_experts_are_reported(tmp_path: Path, models: Path, capsys) -> None:
    from recipekit.engine.cli import main

    recipe = stack(tmp_path, models, """
          - id: moe
            op: stack_experts
            base: base
            experts: [{model: e0, positive: ['the cat']}, {model: e1, positive: ['the cat']}, {model: e2}]
          - {op: init_gates, model: moe, mode: hidden}
        """)
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "warning: init_gates: experts 0 (e0) and 1 (e1) have the same router row in every layer" in err
    assert "warning: init_gates: expert 2 (e2) has no prompts: its router row is zero" in err


def test_hidden_gates_hold_one_layer_not_the_model(tmp_path: Path) -> None:
    """Peak RSS of `recipe plan` with hidden gates over a 4-layer and a 16-layer model of 16 MB fp32 layers:
    the difference stays well below the 12 layers (192 MB) a whole-model load would add."""
    peaks = {}
    layer_bytes = 0
    for layers in (4, 16):
        folder = tmp_path / f"l{layers}"
        layer_bytes = _generated_model(folder / "base", layers)
        recipe = write_recipe(folder, """
            recipe: 1
            models: {base: ./base}
            steps:
              - id: moe
                op: stack_experts
                base: base
                experts: [{model: base, positive: ['the cat sat on the mat']}, {model: base, positive: ['0123 4567']}]
              - {op: init_gates, model: moe, mode: hidden}
            """)
        # VmHWM, not ru_maxrss: the latter keeps the forking test process's peak across exec
        code = ("import sys; from recipekit.engine.cli import main; rc = main(['plan', sys.argv[1]]); "
                "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]); sys.exit(rc)")
        done = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, check=True)
        peaks[layers] = int(done.stdout.split()[-1]) * 1024
    assert peaks[16] - peaks[4] < 3 * layer_bytes, (peaks, layer_bytes)


def _generated_model(folder: Path, layers: int) -> int:
    """A Llama of hidden size 512 (16 MB of fp32 weights per layer) written directly; returns bytes per layer."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    hidden, inter, vocab = 512, 2048, 96
    generator = torch.Generator().manual_seed(layers)
    shapes = {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (hidden, hidden),
              "self_attn.v_proj.weight": (hidden, hidden), "self_attn.o_proj.weight": (hidden, hidden),
              "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
              "mlp.down_proj.weight": (hidden, inter), "input_layernorm.weight": (hidden,),
              "post_attention_layernorm.weight": (hidden,)}
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=generator) * 0.02,
               "model.norm.weight": torch.ones(hidden), "lm_head.weight": torch.randn(vocab, hidden) * 0.02}
    for i in range(layers):
        for rest, shape in shapes.items():
            tensors[f"model.layers.{i}.{rest}"] = (torch.ones(shape) if len(shape) == 1
                                                   else torch.randn(shape, generator=generator) * 0.02)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 8,
        "num_key_value_heads": 8, "vocab_size": vocab, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}))
    add_char_tokenizer(folder)
    return sum(4 * (s[0] * (s[1] if len(s) > 1 else 1)) for s in shapes.values())


def test_prompt_gates_follow_the_device_and_a_missing_gpu_is_refused_first(tmp_path: Path, models: Path,
                                                                          capsys) -> None:
    """Steps that measure the model run on --device; without CUDA, --device cuda stops before any forward."""
    from recipekit.engine.cli import main

    recipe = stack(tmp_path, models, """
          - id: moe
            op: stack_experts
            base: base
            experts: [{model: e0, positive: ['the cat']}, {model: e1, positive: ['0123']}]
          - {op: init_gates, model: moe, mode: hidden}
        """)
    rc = main(["run", str(recipe), "-o", str(tmp_path / "gpu"), "--device", "cuda"])
    err = capsys.readouterr().err
    if torch.cuda.is_available():
        assert rc == 0, err
    else:
        assert rc == 2 and "--device cuda: no CUDA device is available here" in err
        assert "stack_experts: layout" not in err  # refused before the recipe was built
        assert not (tmp_path / "gpu").exists()


@pytest.mark.parametrize("gates", ["mode: hidden", "{mode: hidden, token: mean}", "mode: cheap_embed",
                                   "{mode: cheap_embed, token: mean}", "mode: random"])
def test_router_rows_from_prompts_are_the_same_with_device_cuda(tmp_path: Path, models: Path, gates: str) -> None:
    """On the stand-in device of tests/simulated_cuda.py (it computes on the CPU and refuses a host tensor mixed
    into device work), router rows measured on the device are the CPU's, bytes and all."""
    from recipekit.engine.cli import main
    from tests.simulated_cuda import simulated_cuda

    recipe = stack(tmp_path, models, f"""
          - id: moe
            op: stack_experts
            base: base
            experts: [{{model: e0, positive: ['the cat']}},
                      {{model: e1, positive: ['0123'], negative: ['x'], noise_scale: 0.01}}]
          - {{op: init_gates, model: moe, {gates.strip("{}")}}}
        """)
    assert main(["run", str(recipe), "-o", str(tmp_path / "cpu"), "-q"]) == 0
    with simulated_cuda() as placed:
        assert main(["run", str(recipe), "-o", str(tmp_path / "cuda"), "-q", "--device", "cuda"]) == 0
    assert placed.count > 0  # the prompts' forward, or the noise added to expert 1
    on_cpu, on_device = tensors_of(tmp_path / "cpu"), tensors_of(tmp_path / "cuda")
    assert on_device.keys() == on_cpu.keys() and all(torch.equal(on_device[k], on_cpu[k]) for k in on_cpu)


def test_experts_from_another_base_are_warned_about_and_fine_tunes_are_not(tmp_path: Path, models: Path,
                                                                          capsys) -> None:
    """Norm weights tell relatives apart: e0 is an unrelated model, `tuned` the base with every weight nudged."""
    import shutil

    from safetensors.torch import save_file

    from recipekit.engine.cli import main

    tuned = tmp_path / "tuned"
    shutil.copytree(models / "base", tuned)
    generator = torch.Generator().manual_seed(0)
    save_file({name: t + 0.01 * t.std() * torch.randn(t.shape, generator=generator)
               for name, t in tensors_of(models / "base").items()}, str(tuned / "model.safetensors"))
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{base: {models}/base, e0: {models}/e0, tuned: {tuned}}}
        steps:
          - id: moe
            op: stack_experts
            base: base
            experts: [{{model: tuned}}, {{model: e0}}]
          - {{op: init_gates, model: moe, mode: random}}
        """)
    assert main(["plan", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "warning: expert model 'e0' does not look like a fine-tune of the base 'base'" in err
    assert "'tuned' does not look like" not in err


def test_prompt_gates_are_byte_identical_across_runs(tmp_path: Path, models: Path) -> None:
    recipe = stack(tmp_path, models, """
          - id: moe
            op: stack_experts
            base: base
            experts: [{model: e0, positive: ['the cat', 'a dog']}, {model: e1, positive: ['0123'], negative: ['x']}]
          - {op: init_gates, model: moe, mode: hidden, token: mean}
        """)
    first, second = build(recipe, tmp_path / "a"), build(recipe, tmp_path / "b")
    for name in ("model-00001-of-00001.safetensors", "config.json", "README.md"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
