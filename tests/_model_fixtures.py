"""Builders for tiny random-weight Kosmos-2 models and checkpoints (no downloads).

- `tiny_config()` / `other_config()`: two small configs of different sizes (the second with a different head
  dim, patch grid and LayerNorm eps).
- `randomize_(module, seed)`: every parameter random and non-default (LayerNorm weights around 1 and biases
  around 0 perturbed, biases non-zero), so parity tests exercise every tensor.
- `random_model(config, seed)`: our `Kosmos2` with such weights, in eval mode.
- `write_tiny_checkpoint(directory, ...)`: a HF-layout checkpoint written by our `save_pretrained`; other test
  files use it to get a loadable model directory (pass `vocab_size` to match a small tokenizer).
- `write_hf_checkpoint(directory, config, seed)`: the same through transformers' own `save_pretrained`
  (needs transformers; only for `reference` tests).
- `image_prompt(text_ids)`: the SPEC §3 layout `<s> <image> [64 slots 4..67] </image> text`, with its mask.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from kosmos2.checkpoint import save_pretrained
from kosmos2.config import Kosmos2Config, TextConfig, VisionConfig
from kosmos2.model import Kosmos2

BOS, PAD, EOS = 0, 1, 2
IMAGE_START, IMAGE_END = 64003, 64004
PHRASE_START, PHRASE_END, OBJECT_START, OBJECT_END, GROUNDING = 64007, 64008, 64009, 64010, 64012
PATCH_INDEX_0 = 64013


def tiny_config(vocab_size: int = 65037) -> Kosmos2Config:
    cfg = Kosmos2Config.from_preset("tiny")
    if vocab_size != cfg.text.vocab_size:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=vocab_size))
    return cfg


def other_config() -> Kosmos2Config:
    """Different sizes from `tiny`: head dim 16, 3x3 patch grid, 3 layers each side, eps 1e-6."""
    return Kosmos2Config(
        vision=VisionConfig(
            width=48, layers=3, heads=3, mlp_dim=80, image_size=42, patch_size=14, layer_norm_eps=1e-6
        ),
        text=TextConfig(width=96, layers=3, heads=6, mlp_dim=160, max_positions=256, layer_norm_eps=1e-6),
        latent_query_num=64,
    )


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter with seeded random values: weights N(0, 0.05), biases N(0, 0.05), LayerNorm
    weights 1 + N(0, 0.1) and biases N(0, 0.1), the latent queries and class embedding N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    norm_weights = {id(m.weight) for m in module.modules() if isinstance(m, nn.LayerNorm)}
    norm_biases = {id(m.bias) for m in module.modules() if isinstance(m, nn.LayerNorm)}
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if id(p) in norm_weights:
            p.copy_(1 + 0.1 * noise)
        elif id(p) in norm_biases:
            p.copy_(0.1 * noise)
        elif name.endswith(("latent_query", "class_embedding")):
            p.copy_(noise)
        else:
            p.copy_(0.05 * noise)
    return module


def random_model(config: Kosmos2Config | None = None, seed: int = 0) -> Kosmos2:
    model = Kosmos2(config or tiny_config())
    return randomize_(model, seed).eval()


def write_tiny_checkpoint(
    directory: str | Path,
    config: Kosmos2Config | None = None,
    seed: int = 0,
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A loadable HF-layout checkpoint directory of a random model (config.json, model.safetensors,
    generation_config.json). `vocab_size` shrinks the tiny config's vocabulary to match a test tokenizer."""
    config = config or tiny_config(vocab_size or 65037)
    model = random_model(config, seed).to(dtype)
    save_pretrained(model, directory)
    return Path(directory)


def write_hf_checkpoint(directory: str | Path, config: Kosmos2Config, seed: int = 0) -> Path:
    """A random-weight checkpoint written by transformers' own `save_pretrained`."""
    from transformers import Kosmos2Config as HFConfig
    from transformers import Kosmos2ForConditionalGeneration

    hf = Kosmos2ForConditionalGeneration(HFConfig(**config.to_hf_config()))
    randomize_(hf, seed)
    hf.save_pretrained(directory)
    return Path(directory)


def load_hf_reference(directory: str | Path):
    """transformers' model from `directory`, eager attention, eval mode (the behavioural reference)."""
    from transformers import Kosmos2ForConditionalGeneration

    return Kosmos2ForConditionalGeneration.from_pretrained(directory, attn_implementation="eager").eval()


def image_prompt(text_ids: list[int], num_slots: int = 64) -> tuple[list[int], list[bool]]:
    """ids `0, 64003, 4..4+num_slots-1, 64004, *text_ids` and the mask marking the slots (SPEC §3)."""
    ids = [BOS, IMAGE_START, *range(4, 4 + num_slots), IMAGE_END, *text_ids]
    mask = [False, False, *([True] * num_slots), False, *([False] * len(text_ids))]
    return ids, mask


def left_pad(
    rows: list[list[int]], masks: list[list[bool]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad to one length: (input_ids [B,T], attention_mask [B,T], image_mask [B,T])."""
    T = max(map(len, rows))
    ids = torch.tensor([[PAD] * (T - len(r)) + r for r in rows])
    attn = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    img = torch.tensor([[False] * (T - len(m)) + m for m in masks])
    return ids, attn, img
