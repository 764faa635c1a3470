"""Tiny checkpoints for tests, built in a temporary folder.

`make_model` uses transformers' own config and model classes with random
init and `save_pretrained`, so the inputs are exactly what real users feed
recipekit. `write_recipe` writes a recipe next to them; `put_in_cache` lays a
model out as huggingface_hub's cache holds a Hub repo.
"""
from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo"  # the demo recipes and their models

FAMILIES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "gemma2": "Gemma2Config",
    "gemma3_text": "Gemma3TextConfig",
    "mixtral": "MixtralConfig",
    "qwen2_moe": "Qwen2MoeConfig",
    "qwen3_moe": "Qwen3MoeConfig",
    "phi3": "Phi3Config",
    "olmo2": "Olmo2Config",
    "granite": "GraniteConfig",  # Llama-like names, its own multipliers: a family the streamed forward does not run
}


def make_model(path: Path, *, family: str = "llama", layers: int = 4, seed: int = 0, tied: bool = False,
               shard_size: str | None = None, dtype: str = "float32", **config) -> Path:
    """Save a randomly initialised tiny model of `family` to `path` and return `path`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    settings = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=layers, vocab_size=96, head_dim=8, max_position_embeddings=128,
                    tie_word_embeddings=tied)
    if family == "phi3":  # its default pad and eos ids (32000) lie outside a tiny vocabulary
        settings.update(pad_token_id=0, eos_token_id=1)
    settings.update(config)
    cfg = getattr(transformers, FAMILIES[family])(**settings)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype))
    with torch.no_grad():  # make norms differ from 1 so dropped/moved layers show in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def make_multimodal_gemma3(path: Path, *, layers: int = 3, vision_layers: int = 2, seed: int = 0, tied: bool = True,
                           **text) -> Path:
    """Save a randomly initialised tiny Gemma3ForConditionalGeneration (a SigLIP vision tower of `vision_layers`
    layers, its projector and a text model of `layers` layers, `text` overriding its config) to `path`; norms made
    to differ from 0, the identity of Gemma's (1 + weight) norms, and the projector from its initial zeros, so a
    tensor taken from the wrong place shows. Untied, its head is saved as `language_model.lm_head.weight`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                num_hidden_layers=layers, vocab_size=96, max_position_embeddings=128, tie_word_embeddings=tied) | text
    config = transformers.Gemma3Config(
        text_config=text,
        # 28x28 images in 14x14 patches: 4 patches, as many as mm_tokens_per_image
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=vision_layers,
                           num_attention_heads=2, image_size=28, patch_size=14), mm_tokens_per_image=4,
        tie_word_embeddings=tied)
    model = transformers.Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "mm_input_projection" in name:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def load_causal_lm(path: Path):
    """Load an output the way users do, in fp32, for logits comparisons."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def tensors_of(path: Path) -> dict:
    """Every tensor of a model directory, by name."""
    from safetensors.torch import load_file

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def source_tensors(model_dir: Path) -> dict:
    """Tensors of an input model, read with the safetensors library (independent of recipekit's reader)."""
    return tensors_of(model_dir)


def assert_layers_from(out: Path, origins: list[tuple[Path, int]], base: Path, dtype=None,
                       head: Path | None = None) -> None:
    """Output layer j must equal layer `origins[j][1]` of the model in `origins[j][0]`, bit for bit
    (after casting to `dtype` when given); every other tensor must equal `base`'s, except the final norm and
    lm_head, which come from `head` when given (its embeddings when it ties them)."""
    import re

    import torch

    got = tensors_of(out)
    cache: dict[Path, dict] = {}

    def source(path: Path) -> dict:
        if path not in cache:
            cache[path] = tensors_of(path)
        return cache[path]

    expected = {}
    for name, tensor in source(base).items():
        if not re.match(r".*layers\.\d+\.", name):
            expected[name] = tensor
    if head is not None:  # a head with tied embeddings gives them as lm_head
        donor = source(head)
        expected["model.norm.weight"] = donor["model.norm.weight"]
        if "lm_head.weight" in expected:
            expected["lm_head.weight"] = donor.get("lm_head.weight", donor["model.embed_tokens.weight"])
    for j, (path, i) in enumerate(origins):
        for name, tensor in source(path).items():
            match = re.match(r"(.*layers)\.(\d+)\.(.*)", name)
            if match and int(match[2]) == i:
                expected[f"{match[1]}.{j}.{match[3]}"] = tensor
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        want = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        assert got[name].dtype == want.dtype, name
        assert torch.equal(got[name], want), name


def finetune(base: Path, out: Path, seed: int, scale: float = 0.02) -> Path:
    """A 'fine-tune' of `base`: every float tensor plus seeded noise, same config."""
    import shutil

    import torch
    from safetensors.torch import save_file

    shutil.copytree(base, out)
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: t + scale * torch.randn(t.shape, generator=generator) for name, t in tensors_of(base).items()}
    for file in out.glob("*.safetensors"):
        file.unlink()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    return out


def add_char_tokenizer(path: Path, vocab_size: int = 96) -> Path:
    """Give a tiny model a character-level `tokenizer.json` (BOS `<s>` = 0, `<unk>` = 1, then printable
    characters), as `recipe eval` and prompt gates need one."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"][: vocab_size - 2]
    vocab = {"<s>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "unk_token": "<unk>",
         "add_bos_token": True}))
    return path


def put_in_cache(cache: Path, repo_id: str, model_dir: Path, commit: str, ref: str | None = "main") -> Path:
    """Lay a model directory out as huggingface_hub caches it: blobs by hash, snapshot symlinks, refs.

    Done by hand because huggingface_hub has no offline way to fill its cache.
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(model_dir.iterdir()):
        data = file.read_bytes()
        digest = hashlib.sha256(data).hexdigest() if file.suffix == ".safetensors" else hashlib.sha1(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


# (layer, row, column) of the down_proj entries `make_spiky_model` plants
PLANTED_WEIGHT = (1, 5, 7)  # a super weight the model depends on
HARMLESS_SPIKES = ((2, 5, 11), (3, 5, 13))  # spikes just as found by the search, which the model does not need


def make_spiky_model(path: Path) -> Path:
    """A tiny random Llama (4 layers, character tokenizer) with one super weight it depends on (PLANTED_WEIGHT)
    and two spikes it does not need (HARMLESS_SPIKES); the search finds all three and only those.

    A random model has no super weight, so one is planted the way real ones work: every embedding row gets 1.0
    in residual channel 0, so intermediate channel PLANTED_WEIGHT[2] of layer PLANTED_WEIGHT[0], made to read
    that channel, fires on every token; its down_proj column writes only into residual channel
    PLANTED_WEIGHT[1] (about 100, a massive activation), and every later norm weight but that channel's is
    scaled by how much that grew its input's RMS. With the entry the model computes about what it did; zeroed,
    every later norm amplifies its input about a hundredfold. Each harmless spike reads the massive channel and
    adds about 1% to it: its input and output are hundreds of times its layer's median, but zeroing it moves
    perplexity by about 0.1%.
    """
    import torch

    make_model(path, layers=4, seed=3)
    model = load_causal_lm(path)
    layer, row, column = PLANTED_WEIGHT
    later = [norm for block in model.model.layers[layer + 1:]
             for norm in (block.input_layernorm, block.post_attention_layernorm)] + [model.model.norm]
    sample = torch.randint(2, 96, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        before = _input_rms(model, later, sample)
        _spike(model.model.layers[layer].mlp, reads=0, row=row, column=column, output=100.0)
        for norm, grown, was in zip(later, _input_rms(model, later, sample), before):
            scale = torch.full_like(norm.weight, float((grown / was).median()))
            scale[row] = 1.0
            norm.weight *= scale
        for at, spike_row, spike_column in HARMLESS_SPIKES:
            _spike(model.model.layers[at].mlp, reads=row, row=spike_row, column=spike_column, output=1.0)
    model.save_pretrained(path)
    return add_char_tokenizer(path)


def _spike(mlp, *, reads: int, row: int, column: int, output: float) -> None:
    """Intermediate channel `column` reads residual channel `reads` (about 5.7 after the norm, when it dominates
    the RMS of a 32-wide state, so silu(5.7) * 5.7 = 32) and writes about `output` into channel `row` alone."""
    import torch

    unit = torch.zeros_like(mlp.gate_proj.weight[column])
    unit[reads] = 1.0
    mlp.gate_proj.weight[column] = unit
    mlp.up_proj.weight[column] = unit
    mlp.down_proj.weight[:, column] = 0.0
    mlp.down_proj.weight[row, column] = output / 32.0


def _input_rms(model, norms: list, ids) -> list:
    """The RMS of what each of `norms` receives, per token, over `ids`."""
    seen = {}
    hooks = [norm.register_forward_hook(lambda module, args, out, k=k: seen.__setitem__(k, args[0]))
             for k, norm in enumerate(norms)]
    model(ids)
    for hook in hooks:
        hook.remove()
    return [seen[k].pow(2).mean(-1).sqrt() for k in range(len(norms))]


def add_word_tokenizer(path: Path, words: list[str], added: list[tuple[str, dict]] = ()) -> Path:
    """Give a tiny model a word-level `tokenizer.json`: `<unk>` = 0, then `words` in order, then the `added` tokens
    (content, AddedToken flags such as `special=True`) at the next ids; and a `tokenizer_config.json` that
    transformers loads as a fast tokenizer."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    for content, flags in added:
        token = AddedToken(content, **{"normalized": False, **flags})
        (tokenizer.add_special_tokens if flags.get("special") else tokenizer.add_tokens)([token])
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "model_max_length": 128}))
    return path
