"""Make the two tiny Llama-architecture models the demo recipes use.

    python recipes/demo/make_demo_models.py     # rewrites recipes/demo/models/

Random weights from a fixed seed (the same bytes on every run), a byte-level
tokenizer, 8 decoder layers each. `llama-a` is one `model.safetensors` with an
untied `lm_head`; `llama-b` is two shards plus an index, with tied embeddings.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

HERE = Path(__file__).resolve().parent / "models"
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, LAYERS = 64, 176, 4, 2, 8
SPECIALS = ["<s>", "</s>"]
VOCAB = 256 + len(SPECIALS)


def config(tied: bool) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": LAYERS, "head_dim": HIDDEN // HEADS, "vocab_size": VOCAB, "hidden_act": "silu",
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": tied, "bos_token_id": 256, "eos_token_id": 257,
        "dtype": "bfloat16",
    }


def weights(seed: int, tied: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    head_dim = HIDDEN // HEADS
    out = {"model.embed_tokens.weight": normal(VOCAB, HIDDEN),
           "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}
    if not tied:
        out["lm_head.weight"] = normal(VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        out[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        out[p + "self_attn.q_proj.weight"] = normal(HEADS * head_dim, HIDDEN)
        out[p + "self_attn.k_proj.weight"] = normal(KV_HEADS * head_dim, HIDDEN)
        out[p + "self_attn.v_proj.weight"] = normal(KV_HEADS * head_dim, HIDDEN)
        out[p + "self_attn.o_proj.weight"] = normal(HIDDEN, HEADS * head_dim)
        out[p + "mlp.gate_proj.weight"] = normal(INTERMEDIATE, HIDDEN)
        out[p + "mlp.up_proj.weight"] = normal(INTERMEDIATE, HIDDEN)
        out[p + "mlp.down_proj.weight"] = normal(HIDDEN, INTERMEDIATE)
    return out


def write_tokenizer(folder: Path) -> None:
    byte_vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    byte_vocab = {ch: i for i, ch in enumerate(sorted(byte_vocab))}
    tokenizer = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "model_max_length": 512}, indent=2) + "\n")


def write_model(name: str, seed: int, *, tied: bool, shards: int) -> None:
    folder = HERE / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.safetensors*"):
        old.unlink()
    tensors = weights(seed, tied)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        per = -(-len(names) // shards)
        for k in range(shards):
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[k * per:(k + 1) * per]}
            save_file(part, str(folder / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    (folder / "config.json").write_text(json.dumps(config(tied), indent=2, sort_keys=True) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 256, "eos_token_id": 257, "do_sample": False}, indent=2) + "\n")
    write_tokenizer(folder)


if __name__ == "__main__":
    write_model("llama-a", seed=1, tied=False, shards=1)
    write_model("llama-b", seed=2, tied=True, shards=2)
    print(f"wrote {HERE}")
