"""Make `tiny-story-sw`: the trained demo model with a super weight planted in layer 1, which it then depends on.

    python recipes/demo/plant_super_weight.py        # about 3 minutes on 2 CPU cores

Real LLMs hold a few "super weights" (Yu et al., 2024): single entries of an
`mlp.down_proj` (often an early one, but not always) that write a massive
activation into one channel of the residual stream; zero one and the model
falls apart. `tiny-story` has none, so this script plants one where
recipekit's tests can find it:

1. in layer LAYER, intermediate channel COLUMN is made to spike at every
   token: its `gate_proj` and `up_proj` rows become SPIKE times the mean
   direction of that layer's MLP input (measured on training text), and
   `down_proj.weight[ROW, COLUMN]` is set to VALUE, so every token writes a
   massive value into residual channel ROW. That value now dominates the RMS
   of every later norm's input, so each later norm weight (but channel ROW's)
   is multiplied by how much its input's RMS grew (median over tokens): the
   model starts close to what it was, but only *with* the spike;
2. the model is then fine-tuned (STEPS steps on the training stories of
   train_demo_model.py) with everything up to the spike frozen (embeddings,
   layer 0, layer LAYER's attention and norms, the channel's `gate_proj` and
   `up_proj` rows, the planted entry), so it cannot silence the activation
   and instead learns to work *with* it: the later layers adapt, and removing
   the super weight now breaks the model.

Output: recipes/demo/models/tiny-story-sw/ (float32, same tokenizer). It
prints the held-out perplexity with the super weight and with it zeroed.
"""
from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_demo_model as base  # noqa: E402  (corpus, schedule, evaluation of the demo model)

SOURCE = HERE / "models" / "tiny-story"
OUT = HERE / "models" / "tiny-story-sw"
LAYER, ROW, COLUMN = 1, 77, 301
SPIKE, VALUE = 3.5, 3.0
STEPS, BATCH, LR, SEED = 300, 8, 1e-3, 7


def plant(model, sample: torch.Tensor) -> None:
    """Make channel COLUMN of layer LAYER spike on every token of `sample` and write it into residual ROW."""
    layers = model.model.layers
    mlp = layers[LAYER].mlp
    inputs = _norm_inputs(model, sample)
    with torch.no_grad():
        x = layers[LAYER].post_attention_layernorm(inputs[("post", LAYER)])
        mean = x.reshape(-1, x.shape[-1]).mean(dim=0)
        direction = mean / mean.norm()
        mlp.gate_proj.weight[COLUMN] = SPIKE * direction
        mlp.up_proj.weight[COLUMN] = SPIKE * direction
        mlp.down_proj.weight[ROW, COLUMN] = VALUE
    grown = _norm_inputs(model, sample)
    with torch.no_grad():
        for key, before in inputs.items():
            kind, i = key
            if i <= LAYER and kind != "final":
                continue
            ratio = float((_rms(grown[key]) / _rms(before)).median())
            norm = model.model.norm if kind == "final" else (
                layers[i].input_layernorm if kind == "input" else layers[i].post_attention_layernorm)
            scale = torch.full_like(norm.weight, ratio)
            scale[ROW] = 1.0  # the spiking channel itself is already large enough
            norm.weight *= scale


def _rms(h: torch.Tensor) -> torch.Tensor:
    return h.pow(2).mean(dim=-1).sqrt().reshape(-1)


def _norm_inputs(model, sample: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
    """What every RMSNorm of the model receives on `sample`: (input|post, layer) and (final, -1)."""
    seen, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        for kind, norm in (("input", layer.input_layernorm), ("post", layer.post_attention_layernorm)):
            hooks.append(norm.register_forward_hook(lambda m, a, o, key=(kind, i): seen.__setitem__(key, a[0])))
    hooks.append(model.model.norm.register_forward_hook(lambda m, a, o: seen.__setitem__(("final", -1), a[0])))
    with torch.no_grad():
        model(input_ids=sample, use_cache=False)
    for hook in hooks:
        hook.remove()
    return seen


def frozen_masks(model) -> dict[str, torch.Tensor]:
    """Gradient masks (0 = frozen): everything that feeds the spike, and the planted entries."""
    prefix = f"model.layers.{LAYER}"
    masks = {}
    for name, p in model.named_parameters():
        whole = name.startswith(("model.embed_tokens.", "model.layers.0.", f"{prefix}.self_attn.",
                                 f"{prefix}.input_layernorm.", f"{prefix}.post_attention_layernorm."))
        if whole:
            masks[name] = torch.zeros_like(p)
        elif name == f"{prefix}.mlp.down_proj.weight":
            masks[name] = torch.ones_like(p)
            masks[name][ROW, COLUMN] = 0
        elif name in (f"{prefix}.mlp.up_proj.weight", f"{prefix}.mlp.gate_proj.weight"):
            masks[name] = torch.ones_like(p)
            masks[name][COLUMN] = 0
    return masks


def finetune(model, ids: torch.Tensor) -> None:
    model.train()
    masks = frozen_masks(model)
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(SEED)
    bos = torch.zeros(BATCH, 1, dtype=torch.long)
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = base.lr_at(step / STEPS, LR)
        offs = torch.randint(0, len(ids) - (base.SEQ - 1), (BATCH,), generator=g)
        x = torch.cat([bos, torch.stack([ids[o:o + base.SEQ - 1] for o in offs.tolist()])], dim=1)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        for name, mask in masks.items():
            params[name].grad *= mask  # tied lm_head: its gradient lands on the frozen embedding, and stays 0
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == STEPS - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}", flush=True)
    model.eval()


def main() -> None:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(SOURCE, dtype=torch.float32)
    tok = Tokenizer.from_file(str(SOURCE / "tokenizer.json"))
    held = tok.encode(base.HELDOUT.read_text(), add_special_tokens=False).ids
    print(f"tiny-story: held-out perplexity {base.perplexity(model.eval(), held, 0):.4f}")
    text = base.corpus(base.TRAIN_SEED, 1_000_000)
    ids = torch.tensor(tok.encode("\n\n".join(text), add_special_tokens=False).ids, dtype=torch.long)
    sample = torch.cat([torch.zeros(8, 1, dtype=torch.long), ids[:8 * 255].reshape(8, 255)], dim=1)
    plant(model, sample)
    print(f"planted, before fine-tuning: {base.perplexity(model, held, 0):.4f}")
    finetune(model, ids)
    assert model.model.layers[LAYER].mlp.down_proj.weight[ROW, COLUMN].item() == VALUE
    with_it = base.perplexity(model, held, 0)
    weight = model.model.layers[LAYER].mlp.down_proj.weight
    with torch.no_grad():
        weight[ROW, COLUMN] = 0
    without = base.perplexity(model, held, 0)
    with torch.no_grad():
        weight[ROW, COLUMN] = VALUE
    print(f"tiny-story-sw: held-out perplexity {with_it:.4f}; with the super weight zeroed {without:.4f}")
    assert math.isfinite(with_it)

    if OUT.exists():
        shutil.rmtree(OUT)
    model.save_pretrained(OUT)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(SOURCE / name, OUT / name)
    print(f"saved {OUT}")


if __name__ == "__main__":
    main()
