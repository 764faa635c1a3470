"""add_modules: the output loads through recipekit's classes with transformers and computes what the base did;
it trains; token mixing is causal; the streamed forward and `recipe eval` compute the modules exactly as the
classes do once they are off identity; bad requests are located errors that write nothing."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from recipekit.engine.cli import main
from recipekit.engine.core.added_modules import FAMILIES
from recipekit.engine.core.graph import LazyModel
from recipekit.engine.forward.streamed import StreamedForward
from recipekit.engine.io.source import open_model
from tests.bad_inputs.checks import assert_no_output, cli
from tests.tiny import add_char_tokenizer, load_causal_lm, make_model, read_config, tensors_of, write_recipe

ALL = "[adaptive_norm, token_mixing, se_block]"
SETTINGS = {"mistral": {"sliding_window": 4},
            "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}}


def _add(tmp_path, family: str = "llama", modules: str = ALL, options: str = "token_mixing: {kernel_size: 3}",
         dtype: str | None = None):
    base = make_model(tmp_path / family, family=family, layers=3, seed=5, **SETTINGS.get(family, {}))
    output = f"output: {{dtype: {dtype}}}" if dtype else ""
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{base: {family}}}
        steps:
          - op: add_modules
            model: base
            modules: {modules}
            {options}
        {output}
        """)
    out = tmp_path / "out"
    assert main(["run", str(recipe), "-o", str(out), "-q"]) == 0
    return base, out


def _load(path):
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert all(not keys for keys in info.values()), info  # every tensor of the output is a parameter, and back
    return model.eval()


def _batch():
    ids = torch.randint(2, 96, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left-padded
    mask[2, 8:] = 0  # right-padded
    return ids, mask


def _perturb(out, seed: int = 0) -> None:
    """Move every added parameter off identity (what training would do), rewriting the checkpoint."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = tensors_of(out)
    for name, t in tensors.items():
        if any(part in name for part in ("_scale.", "token_mixing.", "se_block.")):
            tensors[name] = t + 0.3 * torch.randn(t.shape, generator=generator)
    for file in out.glob("*.safetensors"):
        file.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_output_loads_through_recipekit_classes_and_computes_what_the_base_did(tmp_path, family):
    base, out = _add(tmp_path, family)
    model = _load(out)
    assert type(model).__name__ == f"Recipekit{FAMILIES[family]}ForCausalLM"
    ids, mask = _batch()
    with torch.no_grad():
        before = load_causal_lm(base)(ids, attention_mask=mask).logits
        after = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.allclose(before[valid], after[valid], rtol=0, atol=1e-6), (before - after)[valid].abs().max()

    config = read_config(out)
    assert config["model_type"] == f"recipekit_{family}"
    assert config["architectures"] == [f"Recipekit{FAMILIES[family]}ForCausalLM"]
    assert config["added_modules"] == {"adaptive_norm": {"width": 2}, "token_mixing": {"kernel_size": 3},
                                       "se_block": {"width": 2}}  # hidden 32 // 16
    got, original = tensors_of(out), tensors_of(base)
    assert all(torch.equal(got[name], value) for name, value in original.items())
    new = {name: got[name] for name in set(got) - set(original)}
    assert len(new) == 3 * 9
    for name, value in new.items():
        if name.endswith("up.bias"):
            assert torch.equal(value, torch.ones(32))
        elif "down" in name:
            assert value.std() > 0.005 and value.shape[0] == 2
        else:
            assert not value.any(), name


def test_output_dtype_and_options(tmp_path):
    _, out = _add(tmp_path, modules="[se_block, adaptive_norm]", options="adaptive_norm: {reduction: 4}",
                  dtype="bfloat16")
    config, got = read_config(out), tensors_of(out)
    assert config["added_modules"] == {"adaptive_norm": {"width": 8}, "se_block": {"width": 2}}
    assert got["model.layers.2.input_layernorm_scale.down.weight"].shape == (8, 32)
    assert got["model.layers.2.input_layernorm_scale.up.bias"].dtype == torch.bfloat16
    assert torch.equal(got["model.layers.2.input_layernorm_scale.up.bias"], torch.ones(32, dtype=torch.bfloat16))
    assert not any("token_mixing" in name for name in got)
    card = (out / "README.md").read_text()
    assert "import recipekit\nfrom transformers import AutoModelForCausalLM\n" in card
    assert "pip install 'recipekit[modules]'" in card and "trust_remote_code" in card
    assert not list(out.glob("*.py"))  # no code in the output


def test_one_optimiser_step_changes_the_new_parameters_and_the_loss(tmp_path):
    _, out = _add(tmp_path)
    model = _load(out).train()
    ids = torch.tensor([[2 + ord(c) % 90 for c in "the new modules learn from the first step on"]])
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    added = {n: p for n, p in model.named_parameters() if any(k in n for k in ("_scale.", "token_mixing", "se_block"))}
    assert len(added) == 3 * 9
    start = {n: p.detach().clone() for n, p in added.items()}
    losses = []
    for step in range(2):
        optimiser.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        if step == 0:  # the zero-initialised outputs get gradients at once; the random inputs once those moved
            for name, p in added.items():
                assert (p.grad.abs().sum() > 0) == ("down" not in name), name
        else:
            assert all(p.grad.abs().sum() > 0 for p in added.values())
        optimiser.step()
    assert all(not torch.equal(p.detach(), start[n]) for n, p in added.items())
    with torch.no_grad():
        assert float(model(ids, labels=ids).loss) != losses[0]
    assert losses[1] < losses[0]
    model.save_pretrained(tmp_path / "trained")  # what was trained saves and loads back as it is
    assert not list((tmp_path / "trained").glob("*.py"))
    with torch.no_grad():
        assert torch.equal(_load(tmp_path / "trained")(ids).logits, model.eval()(ids).logits)


def test_token_mixing_is_causal_and_ignores_left_padding(tmp_path):
    _, out = _add(tmp_path, modules="[token_mixing]", options="token_mixing: {kernel_size: 4}")
    _perturb(out)
    model = _load(out)
    ids, _ = _batch()
    changed = ids.clone()
    changed[:, 6] = (ids[:, 6] + 7) % 96
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
        assert torch.equal(a[:, :6], b[:, :6])  # no earlier position reads token 6
        assert not torch.allclose(a[:, 6:], b[:, 6:])
        # a left-padded row computes what the sequence alone does
        row = ids[:1, 3:]
        padded = torch.cat((torch.zeros(1, 3, dtype=ids.dtype), row), dim=1)
        mask = torch.cat((torch.zeros(1, 3, dtype=ids.dtype), torch.ones_like(row)), dim=1)
        torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 3:], model(row).logits,
                                   atol=1e-5, rtol=0)


def test_cached_generation_computes_what_a_full_forward_does(tmp_path):
    _, out = _add(tmp_path)
    _perturb(out)
    model = _load(out)
    ids, _ = _batch()
    with torch.no_grad():
        full = model(ids).logits
        step = model(ids[:, :5], use_cache=True)
        logits, cache = [step.logits], step.cache
        for t in range(5, ids.shape[1]):
            step = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            logits.append(step.logits)
            cache = step.cache
        torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-5, rtol=0)
        generated = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
        uncached = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, use_cache=False)
        assert torch.equal(generated, uncached)
        cache.crop(-2)  # what assisted decoding does: token mixing's saved inputs no longer follow the cache
        with pytest.raises(ValueError, match="holds other tokens than token mixing saw"):
            model(ids[:, 7:8], cache=cache, use_cache=True)


def test_beam_search_reorders_token_mixings_saved_inputs_with_the_cache(tmp_path):
    """Beam search reorders the cache between steps: token mixing's saved inputs must follow their beams, so a
    cached beam search finds what one that recomputes every step (no cache) finds."""
    _, out = _add(tmp_path, modules="[token_mixing]", options="token_mixing: {kernel_size: 4}")
    _perturb(out, seed=3)
    model = _load(out)
    ids, mask = (t[:2] for t in _batch())  # the full row and the left-padded one
    settings = dict(max_new_tokens=8, num_beams=4, num_return_sequences=2, do_sample=False,
                    return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, **settings)
        uncached = model.generate(ids, attention_mask=mask, use_cache=False, **settings)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_streamed_forward_computes_the_modules_as_the_classes_do(tmp_path, family):
    _, out = _add(tmp_path, family, options="token_mixing: {kernel_size: 3}\n            seed: 4")
    _perturb(out, seed=2)
    model = _load(out)
    batch = [[5, 17, 42, 3, 88, 9, 61, 23, 7, 11], [1, 2, 3, 4, 5, 6], [90, 4]]
    length = max(map(len, batch))
    ids = torch.tensor([s + [0] * (length - len(s)) for s in batch])
    mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in batch])
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, output_hidden_states=True)
    residuals = {}
    forward = StreamedForward(LazyModel.from_source("m", open_model(str(out), base_dir=out.parent)))
    final, valid = forward.run(batch, observer=lambda a: residuals.__setitem__(a.layer, a.tensor.clone())
                               if a.point == "residual" else None)
    for layer in range(3):
        torch.testing.assert_close(residuals[layer][valid], expected.hidden_states[layer][valid], atol=1e-5, rtol=0)
    torch.testing.assert_close((final @ forward.lm_head().T)[valid], expected.logits[valid], atol=1e-5, rtol=0)


def test_recipe_eval_computes_the_modules(tmp_path, capsys):
    _, out = _add(tmp_path)
    _perturb(out, seed=3)
    add_char_tokenizer(out)
    text = tmp_path / "text.txt"
    text.write_text("Squeeze, excite and mix: every token reads the ones before it. " * 3)
    capsys.readouterr()
    assert main(["eval", str(out), "--text", str(text), "--seq-len", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)

    from recipekit.engine.forward.tokenize import TextTokenizer
    from recipekit.engine.measure.perplexity import windows

    lazy = LazyModel.from_source("m", open_model(str(out), base_dir=out.parent))
    tokenizer = TextTokenizer.of(lazy.side_files)
    model = _load(out)
    total, count = 0.0, 0
    for tokens, first in windows(tokenizer.encode_plain(text.read_text()), tokenizer.bos_id, 64, result["stride"]):
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0]
        total += float(F.cross_entropy(logits[first - 1:-1], torch.tensor(tokens[first:]), reduction="sum"))
        count += len(tokens) - first
    assert result["tokens"] == count
    assert math.isclose(result["perplexity"], math.exp(total / count), rel_tol=1e-5)
    identity = math.exp(total / count)
    _, plain = _add(tmp_path / "again")  # the same model on identity computes something else
    add_char_tokenizer(plain)
    capsys.readouterr()
    assert main(["eval", str(plain), "--text", str(text), "--seq-len", "64", "--json"]) == 0
    at_identity = json.loads(capsys.readouterr().out)["perplexity"]
    assert not math.isclose(at_identity, identity, rel_tol=1e-3)
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{base: {tmp_path / "again" / "llama"}}}
        steps: [{{op: add_modules, model: base, modules: [adaptive_norm, token_mixing, se_block]}}]
        """, name="unwritten.yaml")
    add_char_tokenizer(tmp_path / "again" / "llama")
    for model in (recipe, tmp_path / "again" / "llama"):  # a recipe's output before it is written, and its base
        assert main(["eval", str(model), "--text", str(text), "--seq-len", "64", "--json"]) == 0
        assert math.isclose(json.loads(capsys.readouterr().out)["perplexity"], at_identity, rel_tol=1e-6)


def test_import_recipekit_registers_the_classes_without_importing_transformers(tmp_path):
    _, out = _add(tmp_path, modules="[se_block]", options="")
    script = ("import importlib.util, sys\nimport recipekit\nimport recipekit.engine.cli\n"
              "assert importlib.util.find_spec('transformers') is not None  # asking does not use the watch up\n"
              "assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n"
              "from transformers import AutoModelForCausalLM\n"
              "print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)\n")
    after = ("import sys\nfrom transformers import AutoModelForCausalLM\nimport recipekit\n"
             "print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)\n")
    for code in (script, after):
        result = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == "RecipekitLlamaForCausalLM"
    without = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
               "AutoModelForCausalLM.from_pretrained(sys.argv[1])\n")  # the guard above can fail
    assert subprocess.run([sys.executable, "-c", without, str(out)], capture_output=True).returncode != 0


def test_a_model_made_from_a_config_starts_at_identity_too(tmp_path):
    import transformers

    base = make_model(tmp_path / "m", layers=2)
    config = read_config(base)
    config.update(model_type="recipekit_llama", added_modules={"adaptive_norm": {"width": 2}, "se_block": {"width": 4},
                                                               "token_mixing": {"kernel_size": 2}})
    grown = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config)).eval()
    plain = load_causal_lm(base)
    missing = grown.load_state_dict(plain.state_dict(), strict=False).missing_keys  # the added modules
    assert len(missing) == 2 * 9
    for name in missing:
        value = grown.get_parameter(name)
        if name.endswith("down.weight"):
            assert value.std() > 0.01, name
        else:
            assert torch.equal(value, torch.ones_like(value) if name.endswith("bias") else torch.zeros_like(value))
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(grown(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits,
                                   atol=1e-6, rtol=0)


def test_the_classes_cover_the_families_the_op_accepts():
    from recipekit.engine.modeling.families import CAUSAL_LMS

    assert [m.config_class.model_type for m in CAUSAL_LMS] == [f"recipekit_{f}" for f in FAMILIES]


@pytest.mark.parametrize("family, body, where, message", [
    ("llama", "modules: [adaptive_norm, se_blok]", "steps[0].modules[1]", "(did you mean 'se_block'?)"),
    ("llama", "modules: [token_mixing]\n    token_mixing: {kernel_size: 0}", "steps[0].token_mixing.kernel_size",
     "greater than or equal to 1"),
    ("llama", "modules: [se_block]\n    token_mixing: {kernel_size: 3}", "steps[0]",
     "options for token_mixing given, but modules does not name it"),
    ("llama", "modules: [se_block, se_block]", "steps[0]", "each module may be named once"),
    ("llama", "modules: []", "steps[0].modules", "at least 1 item"),
    ("llama", "modules: [se_block]\n    se_block: {reduction: 4, width: 2}", "steps[0].se_block.width",
     "unknown key 'width'"),
    ("gemma2", "modules: [se_block]", "steps[0].model",
     "add_modules has modelling classes for model types llama, mistral, qwen2, qwen3; 'base' is 'gemma2'"),
])
def test_bad_requests_are_located_and_write_nothing(tmp_path, capsys, family, body, where, message):
    make_model(tmp_path / "m", family=family, layers=2)
    recipe = write_recipe(tmp_path, f"recipe: 1\nmodels: {{base: m}}\nsteps:\n  - op: add_modules\n    model: base\n"
                                    f"    {body}\n")
    result = cli(capsys, "run", recipe, "-o", tmp_path / "out")
    assert result.rc == 2 and len(result.err.splitlines()) == 1, result.err
    assert result.err.startswith(f"{recipe}:") and f": {where}: " in result.err and message in result.err, result.err
    assert_no_output(tmp_path / "out")


def test_layer_surgery_after_add_modules_keeps_the_identity(tmp_path):
    base, out = _add(tmp_path, "qwen2")
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{grown: {out}}}
        steps: [{{op: expand_layers, model: grown, after: [1]}}]
        """, name="expand.yaml")
    assert main(["run", str(recipe), "-o", str(tmp_path / "deeper"), "-q"]) == 0
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path / "deeper")(ids, attention_mask=mask).logits[mask.bool()],
                                   load_causal_lm(base)(ids, attention_mask=mask).logits[mask.bool()],
                                   atol=1e-6, rtol=0)
    assert read_config(tmp_path / "deeper")["layer_types"] == read_config(base)["layer_types"][:2] + \
        read_config(base)["layer_types"][1:]


def test_without_transformers_the_op_still_builds_and_the_card_says_what_to_install(tmp_path):
    base = make_model(tmp_path / "m", layers=2)
    recipe = write_recipe(tmp_path, "recipe: 1\nmodels: {base: m}\n"
                                    "steps: [{op: add_modules, model: base, modules: [token_mixing]}]\n")
    script = ("import sys\n"
              "class NoTransformers:\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name.split('.')[0] == 'transformers':\n"
              "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
              "sys.meta_path.insert(0, NoTransformers())\n"
              "import recipekit\n"
              "from recipekit.engine.cli import main\n"
              "assert main(['plan', sys.argv[1]]) == 0 and 'torch' not in sys.modules\n"
              "assert main(['run', sys.argv[1], '-o', sys.argv[2], '-q']) == 0\n"
              "try:\n    import transformers\nexcept ModuleNotFoundError:\n    print('no transformers')\n")
    result = subprocess.run([sys.executable, "-c", script, str(recipe), str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "no transformers"
    assert "pip install 'recipekit[modules]'" in (tmp_path / "out" / "README.md").read_text()
    assert read_config(tmp_path / "out")["added_modules"] == {"token_mixing": {"kernel_size": 3}}
    assert base.is_dir()


def test_modules_are_added_once(tmp_path, capsys):
    _, out = _add(tmp_path, modules="[se_block]", options="")
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{grown: {out}}}
        steps: [{{op: add_modules, model: grown, modules: [token_mixing]}}]
        """, name="again.yaml")
    result = cli(capsys, "run", recipe, "-o", tmp_path / "out2")
    assert result.rc == 2 and "steps[0].model: 'grown' already has added modules" in result.err, result.err
    assert_no_output(tmp_path / "out2")
