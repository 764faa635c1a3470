"""The streamed forward equals transformers' own forward, family by family, and holds one layer at a time."""
from __future__ import annotations

import pytest
import torch

from recipekit.engine.core.graph import LazyModel
from recipekit.engine.errors import PlanError
from recipekit.engine.forward.streamed import StreamedForward
from recipekit.engine.io.source import open_model
from tests.tiny import add_char_tokenizer, load_causal_lm, make_model, make_multimodal_gemma3

BATCH = [[5, 17, 42, 3, 88, 9, 61, 23, 7, 11], [1, 2, 3, 4, 5, 6], [90, 4]]

FAMILIES = {
    "llama": ("llama", {}),
    "llama-bf16": ("llama", {"dtype": "bfloat16"}),
    "llama-tied": ("llama", {"tied": True}),
    "llama-linear-rope": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                        "rope_theta": 500.0}}),
    "llama3-rope": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8, "rope_theta": 500000.0}}),
    "mistral-sliding": ("mistral", {"sliding_window": 3}),
    "qwen2-bias-sliding": ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "qwen3-qk-norm": ("qwen3", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 2}),
    "mixtral-top2": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2-moe-shared-expert": ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                                              "shared_expert_intermediate_size": 40, "norm_topk_prob": False}),
    "qwen2-moe-dense-layers": ("qwen2_moe", {"num_experts": 3, "num_experts_per_tok": 1, "moe_intermediate_size": 48,
                                             "decoder_sparse_step": 2, "mlp_only_layers": [2]}),
    "qwen3-moe-normalised": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 3, "moe_intermediate_size": 48,
                                           "norm_topk_prob": True}),
    "phi3": ("phi3", {}),
    "phi3-sliding": ("phi3", {"sliding_window": 3}),
    # BATCH is 10 tokens long, past the pretraining context of 8: the long factors apply (SHORT_BATCH: the short)
    "phi3-longrope": ("phi3", {"rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 4.0],
                                                "long_factor": [2.0, 3.0, 5.0, 9.0]},
                               "original_max_position_embeddings": 8, "max_position_embeddings": 64}),
    "phi3-su-partial-rotary": ("phi3", {"partial_rotary_factor": 0.5, "rope_scaling": {
        "type": "su", "short_factor": [1.0, 2.0], "long_factor": [3.0, 5.0], "original_max_position_embeddings": 8}}),
    "olmo2": ("olmo2", {}),
    "gemma2": ("gemma2", {"sliding_window": 3, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 0.02,
                          "final_logit_softcapping": 2.0}),
    "gemma2-tied": ("gemma2", {"tied": True, "layer_types": ["full_attention", "sliding_attention", "full_attention"],
                               "sliding_window": 2}),
    "gemma3-text": ("gemma3_text", {"sliding_window": 3, "query_pre_attn_scalar": 12, "layer_types": [
        "sliding_attention", "full_attention", "sliding_attention"], "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0}}}),
    "gemma3-text-softcap": ("gemma3_text", {"tied": True, "final_logit_softcapping": 2.0, "sliding_window": 2,
                                            "sliding_window_pattern": 2}),
}
SHORT_BATCH = [[5, 17, 42, 3, 88, 9, 61, 23], [1, 2, 3], [90]]


def lazy(path) -> LazyModel:
    return LazyModel.from_source("m", open_model(str(path), base_dir=path.parent))


def padded(batch):
    length = max(map(len, batch))
    ids = torch.tensor([s + [0] * (length - len(s)) for s in batch])
    mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in batch])
    return ids, mask


def assert_forward_equals(reference, forward: StreamedForward, batch: list[list[int]], layers: int) -> None:
    """Hidden states entering every layer, the final normed states and the logits of the streamed forward equal
    transformers' own on a right-padded batch, at every real token, to 1e-4."""
    ids, mask = padded(batch)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, output_hidden_states=True)
    residuals = {}
    final, valid = forward.run(batch, observer=lambda a: residuals.__setitem__(a.layer, a.tensor.clone())
                               if a.point == "residual" else None)
    assert torch.equal(valid, mask.bool())
    assert len(expected.hidden_states) == layers + 1
    for layer in range(layers):
        torch.testing.assert_close(residuals[layer][valid], expected.hidden_states[layer][valid], atol=1e-4, rtol=0)
    torch.testing.assert_close(final[valid], expected.hidden_states[layers][valid], atol=1e-4, rtol=0)
    logits = forward.logits(final, forward.lm_head())
    torch.testing.assert_close(logits[valid], expected.logits[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", FAMILIES)
def test_hidden_states_and_logits_equal_transformers(case, tmp_path):
    family, settings = FAMILIES[case]
    path = make_model(tmp_path / case, family=family, layers=3, seed=3, **settings)
    reference = load_causal_lm(path)
    if "qwen2" in case:
        assert reference.model.layers[0].self_attn.q_proj.bias is not None
    forward = StreamedForward(lazy(path))
    assert_forward_equals(reference, forward, BATCH, 3)
    if "longrope" in case or "su" in case:  # within the pretraining context: the short factors
        assert_forward_equals(reference, forward, SHORT_BATCH, 3)


def test_what_makes_each_new_family_differ_is_in_play(tmp_path):
    """The cases above would pass vacuously if a feature were inert in them: each changes the output."""
    def last_logits(path, **changes):
        if changes:
            _edit_config(path, **changes)
        forward = StreamedForward(lazy(path))
        final, _ = forward.run(BATCH)
        return forward.logits(final, forward.lm_head())[0]

    gemma2 = make_model(tmp_path / "g2", family="gemma2", layers=3, seed=3, **FAMILIES["gemma2"][1])
    capped = last_logits(gemma2)
    assert capped.abs().max() < 2.0  # the final soft cap
    assert not torch.allclose(capped, last_logits(gemma2, attn_logit_softcapping=None), atol=1e-3)
    assert not torch.allclose(capped, last_logits(gemma2, sliding_window=64), atol=1e-3)
    longrope = make_model(tmp_path / "p", family="phi3", layers=2, seed=3, **FAMILIES["phi3-longrope"][1])
    assert not torch.allclose(last_logits(longrope), last_logits(longrope, original_max_position_embeddings=16),
                              atol=1e-3)  # long against short factors
    gemma3 = make_model(tmp_path / "g3", family="gemma3_text", layers=3, seed=3, **FAMILIES["gemma3-text"][1])
    two_bases = last_logits(gemma3)
    rope = FAMILIES["gemma3-text"][1]["rope_parameters"]
    assert not torch.allclose(two_bases, last_logits(gemma3, rope_parameters={
        **rope, "sliding_attention": rope["full_attention"]}), atol=1e-3)


OLDER_SPELLINGS = {  # config.json as checkpoints on the Hub spell RoPE, before `rope_parameters`
    "gemma3_text": {"rope_theta": 50000.0, "rope_local_base_freq": 100.0,
                    "rope_scaling": {"rope_type": "linear", "factor": 4.0}, "sliding_window_pattern": 2,
                    "sliding_window": 3},
    "phi3": {"rope_theta": 500.0, "original_max_position_embeddings": 8, "max_position_embeddings": 64,
             "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 4.0],
                              "long_factor": [2.0, 3.0, 5.0, 9.0]}},
}


@pytest.mark.parametrize("family", OLDER_SPELLINGS)
def test_older_rope_spellings_are_read_as_transformers_reads_them(tmp_path, family):
    import json

    path = make_model(tmp_path / family, family=family, layers=3, seed=5)
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters")
    config.pop("layer_types", None)
    config.update(OLDER_SPELLINGS[family])
    (path / "config.json").write_text(json.dumps(config))
    reference = load_causal_lm(path)
    assert reference.config.rope_parameters  # transformers turned the older keys into its own
    forward = StreamedForward(lazy(path))
    assert_forward_equals(reference, forward, BATCH, 3)
    assert_forward_equals(reference, forward, SHORT_BATCH, 3)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_multimodal_gemma3_runs_its_language_model_text_only(tmp_path, tied):
    """Gemma3ForConditionalGeneration: the decoder under `language_model.model`, the spec from `text_config`,
    the head tied or `language_model.lm_head`, the vision tower and projector left unread."""
    make_multimodal_gemma3(tmp_path / "mm", layers=3, seed=4, tied=tied, sliding_window=3,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    reference = load_causal_lm(tmp_path / "mm")
    assert type(reference).__name__ == "Gemma3ForConditionalGeneration"
    forward = StreamedForward(lazy(tmp_path / "mm"))
    assert forward.decoder.prefix == "language_model.model.layers"
    head = "language_model.model.embed_tokens.weight" if tied else "language_model.lm_head.weight"
    assert forward.head_name == head
    read = [name for layer in forward.decoder.layers for name in layer.values()]
    assert read and not any("vision" in name or "projector" in name for name in read)
    assert_forward_equals(reference, forward, BATCH, 3)


def test_a_bf16_gemma_scales_its_embeddings_in_bf16_as_transformers_does(tmp_path):
    """sqrt(hidden_size) is rounded to bfloat16 and so is the product, as transformers' scaled embedding module
    computes it for a bfloat16 model."""
    import transformers

    path = make_model(tmp_path / "g", family="gemma3_text", layers=2, dtype="bfloat16", hidden_size=40, head_dim=10)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ids, _ = padded(BATCH)
    with torch.no_grad():
        expected = reference.model.embed_tokens(ids).float()
    seen = {}
    StreamedForward(lazy(path)).run(BATCH, observer=lambda a: seen.setdefault(a.point, a.tensor.clone()))
    assert torch.equal(seen["residual"], expected)
    assert not torch.equal(seen["residual"], reference.model.embed_tokens.weight[ids].float() * 40 ** 0.5)


def test_observers_see_every_point_of_every_layer(tmp_path):
    path = make_model(tmp_path / "m", layers=2)
    seen = []
    StreamedForward(lazy(path)).run(BATCH, observer=lambda a: seen.append((a.point, a.layer, tuple(a.tensor.shape))))
    points = ["residual", "attn_in", "mlp_in", "down_in", "down_out"]
    assert seen == [(p, layer, (3, 10, 64 if p == "down_in" else 32)) for layer in range(2) for p in points] + [
        ("residual", 2, (3, 10, 32)), ("final", 2, (3, 10, 32))]


@pytest.mark.parametrize("family", ["llama", "phi3", "olmo2", "gemma2", "gemma3_text"])
def test_weights_held_do_not_grow_with_depth(tmp_path, family):
    peaks = {}
    for layers in (4, 16):
        forward = StreamedForward(lazy(make_model(tmp_path / f"m{layers}", family=family, layers=layers,
                                                  vocab_size=16)))
        forward.run([[1, 2, 3, 4]])
        peaks[layers] = forward.peak_weight_bytes
        assert forward.weight_bytes_held == 0
    layer_bytes = sum(p.numel() * 4 for n, p in load_causal_lm(tmp_path / "m4").named_parameters()
                      if ".layers.0." in n)
    assert peaks[4] == peaks[16] <= 2 * layer_bytes


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    path = make_model(tmp_path / "g", family="granite", layers=2)
    with pytest.raises(PlanError, match="supports model types llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, "
                                        "qwen3_moe, phi3, olmo2, gemma2, gemma3_text; this model is 'granite'"):
        StreamedForward(lazy(path))


def test_capture_maxabs_and_last_token_equal_direct_computation(tmp_path):
    from recipekit.engine.forward.capture import LastToken, MaxAbs

    forward = StreamedForward(lazy(make_model(tmp_path / "m", layers=2)))
    kept = {}
    maxabs, last = MaxAbs(("down_in", "down_out")), LastToken(("residual", "final"))

    def observe(a):
        kept[(a.point, a.layer)] = a.tensor.clone()
        maxabs(a)
        last(a)

    _, valid = forward.run(BATCH, observer=observe)
    lengths = [len(s) for s in BATCH]
    for key, peak in maxabs.values.items():
        assert torch.equal(peak, kept[key][valid].abs().amax(dim=0))
    assert set(maxabs.values) == {(p, layer) for p in ("down_in", "down_out") for layer in range(2)}
    for key, states in last.values.items():
        assert torch.equal(states, torch.stack([kept[key][b, n - 1] for b, n in enumerate(lengths)]))
    assert set(last.values) == {("residual", 0), ("residual", 1), ("residual", 2), ("final", 2)}


def _edit_config(path, **changes):
    import json

    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, words", [
    ({"num_key_value_heads": 3}, ("num_attention_heads 4 is not a multiple of num_key_value_heads 3",)),
    ({"num_key_value_heads": 0}, ("must all be positive",)),
    ({"num_attention_heads": "four"}, ("config.json lacks hidden_size, num_attention_heads",)),
    ({"head_dim": "8"}, ("head_dim should be an integer", "'8'")),
    ({"rms_norm_eps": True}, ("rms_norm_eps should be a number", "True")),
    ({"head_dim": 16}, ("self_attn.q_proj.weight has shape [32, 32]", "[64, 32]")),
    ({"hidden_size": 48, "head_dim": 8}, ("has shape", "hidden_size")),
])
def test_a_config_that_contradicts_the_weights_is_refused_before_computing(tmp_path, capsys, changes, words):
    from recipekit.engine.cli import main

    model = add_char_tokenizer(make_model(tmp_path / "m", layers=2))
    _edit_config(model, **changes)
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    capsys.readouterr()  # what building the model printed
    assert main(["eval", str(model), "--text", str(text), "--seq-len", "4"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), err


def test_an_moe_without_a_router_or_an_expert_is_named_as_such(tmp_path, capsys):
    import shutil

    from recipekit.engine.cli import main
    from tests.bad_inputs.test_model_files import rewrite_header

    model = add_char_tokenizer(make_model(tmp_path / "moe", family="mixtral", layers=2, num_local_experts=2,
                                          num_experts_per_tok=1))
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    file = next(model.glob("*.safetensors"))
    names: dict = {}
    rewrite_header(file, lambda h: names.update(h))
    router = next(n for n in names if n.startswith("model.layers.1.") and n.endswith("gate.weight")
                  and "experts" not in n)
    expert = next(n for n in names if n.startswith("model.layers.0.") and "experts.1." in n)
    for kind, victim, words in (("router", router, "layer 1 has experts but no router"),
                                ("expert", expert, "layer 0 has a router for 2 experts but no")):
        broken = tmp_path / kind
        shutil.copytree(model, broken)
        rewrite_header(next(broken.glob("*.safetensors")), lambda h, victim=victim: h.pop(victim))
        capsys.readouterr()
        assert main(["eval", str(broken), "--text", str(text), "--seq-len", "4"]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    _edit_config(model, num_experts_per_tok=3)
    capsys.readouterr()
    assert main(["eval", str(model), "--text", str(text), "--seq-len", "4"]) == 2
    assert "num_experts_per_tok 3 must lie in 1..2" in capsys.readouterr().err


@pytest.mark.parametrize("family, changes, words", [
    ("phi3", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
     "RoPE type 'dynamic' is not supported by the streamed forward for model type 'phi3' (supported RoPE types: "
     "default, longrope)"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4}},
     "config.json: RoPE type 'longrope' needs long_factor"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported by the streamed forward "
                                              "for model type 'llama' (supported: 1.0, every dim rotates)"),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0},
                                         "sliding_attention": {"rope_type": "default"}}},
     "RoPE type 'yarn' is not supported by the streamed forward for model type 'gemma3_text' (supported RoPE "
     "types: default, linear)"),
    ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention is not supported"),
    ("gemma2", {"hidden_activation": "silu"}, "hidden_activation 'silu' is not supported by the streamed forward "
                                              "for 'gemma2' (supported: gelu_pytorch_tanh, gelu)"),
])
def test_what_a_family_does_not_support_is_refused_by_name(tmp_path, family, changes, words):
    path = make_model(tmp_path / "m", family=family, layers=2)
    _edit_config(path, **changes)
    with pytest.raises(PlanError) as refused:
        StreamedForward(lazy(path))
    assert words in str(refused.value)


def test_a_fused_phi3_layer_is_checked_against_its_config(tmp_path, capsys):
    from recipekit.engine.cli import main

    model = add_char_tokenizer(make_model(tmp_path / "m", family="phi3", layers=2))
    _edit_config(model, num_key_value_heads=4)
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    capsys.readouterr()
    assert main(["eval", str(model), "--text", str(text), "--seq-len", "4"]) == 2
    err = capsys.readouterr().err
    assert ("model.layers.0.self_attn.qkv_proj.weight has shape [64, 32], the config (num_attention_heads 4 x "
            "head_dim 8, hidden_size 32; num_key_value_heads 4 x head_dim 8, hidden_size 32) says [96, 32]") in err, err


@pytest.mark.parametrize("case", ["llama", "qwen2-moe-shared-expert", "phi3-su-partial-rotary", "olmo2", "gemma2",
                                  "gemma3-text"])
def test_a_decoder_layer_is_differentiable_in_its_weights_and_input(tmp_path, case):
    """Training runs the same layers under autograd: every weight of a layer and its input get a finite,
    non-zero gradient, and the forward leaves the tensors it was given unchanged."""
    from recipekit.engine.forward.blocks import attention_mask
    from recipekit.engine.forward.families import decoder_layer

    family, settings = FAMILIES[case]
    from safetensors.torch import load_file

    forward = StreamedForward(lazy(make_model(tmp_path / case, family=family, layers=3, seed=3, **settings)))
    stored = load_file(str(next((tmp_path / case).glob("*.safetensors"))))
    at = f"{forward.decoder.prefix}.1."
    weights = {rest: stored[name].clone().requires_grad_() for rest, name in forward.decoder.layers[1].items()}
    before = {rest: w.detach().clone() for rest, w in weights.items()}
    hidden = torch.randn(3, 10, 32, requires_grad=True)
    valid = padded(BATCH)[1].bool()
    out = decoder_layer(forward.spec, 1, weights, hidden, attention_mask(valid, forward.spec.sliding[1]),
                        forward.spec.rope_tables(10, torch.device("cpu"))[1], lambda point, tensor: None)
    (out[valid] ** 2).sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0
    for rest, w in weights.items():
        assert w.grad is not None and torch.isfinite(w.grad).all(), at + rest
        assert w.grad.abs().sum() > 0 or ".experts." in rest, at + rest  # an expert no token chose gets none
        assert torch.equal(w.detach(), before[rest]), at + rest


GEMMA2_PEAK = """
import re, sys
from pathlib import Path
from recipekit.engine.core.graph import LazyModel
from recipekit.engine.forward.streamed import StreamedForward
from recipekit.engine.io.source import open_model
path = Path(sys.argv[1])
forward = StreamedForward(LazyModel.from_source("m", open_model(str(path), base_dir=path.parent)))
sequences = [[(7 * i + j) % 90 + 1 for j in range(512)] for i in range(24)]
def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
before = status("VmRSS")
forward.run(sequences)
print(forward.held_bytes([512] * 24), status("VmHWM") - before)
"""


def test_the_memory_estimate_counts_the_scores_gemma2_soft_capping_holds(tmp_path):
    """Gemma 2 computes its attention scores itself: [24, 8, 512, 512] floats, 200 MB a copy, twice the rest of
    the forward; the estimate that plans count stays within 1.5x of the peak RSS a fresh process adds."""
    import subprocess
    import sys

    path = make_model(tmp_path / "g", family="gemma2", layers=2, hidden_size=64, intermediate_size=256,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=1024)
    result = subprocess.run([sys.executable, "-c", GEMMA2_PEAK, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    estimated, measured = map(int, result.stdout.split())
    assert measured > 2 * 24 * 8 * 512 * 512 * 4  # the scores dominate
    assert 1 / 1.5 < estimated / measured < 1.5, (estimated, measured)
