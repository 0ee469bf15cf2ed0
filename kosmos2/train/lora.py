"""LoRA through peft, and merged weights for the Hugging Face layout.

Our module names equal transformers' (`text_model.model.layers.3.self_attn.q_proj`,
`vision_model.model.encoder.layers.0.mlp.fc1`, `image_to_text_projection.x_attn.v_proj`), so an adapter
saved here with peft's `save_pretrained` (adapter_config.json + adapter_model.safetensors) loads into
transformers' `Kosmos2ForConditionalGeneration` with `PeftModel.from_pretrained`, and one made there loads
here (`load_adapter`). The adapter config names its target modules with a regular expression over those
names, so the same config picks the same layers in both.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
MLP = ("fc1", "fc2")
PARTS = {"text": "text_model", "vision": "vision_model", "connector": "image_to_text_projection"}


def target_regex(parts: tuple[str, ...] = ("text", "vision", "connector"), mlp: bool = False) -> str:
    """peft `target_modules` (a full-match regex): the attention projections (and with `mlp` fc1/fc2, and
    the connector's `dense` projection from image features to the decoder's width, its one MLP-like layer)
    of the given parts of the network."""
    prefixes = "|".join(PARTS[p] for p in parts)
    layers = "|".join(ATTENTION + (MLP if mlp else ()))
    pattern = rf"({prefixes})\..*\.({layers})"
    if mlp and "connector" in parts:
        pattern = rf"{pattern}|{PARTS['connector']}\.dense"
    return pattern


def add_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    parts: tuple[str, ...] = ("text", "vision", "connector"),
    mlp: bool = False,
):
    """Wrap `model` (our Kosmos2) in a peft LoRA model; only the LoRA matrices are trainable. Returns the
    PeftModel; `peft_model.base_model.model` is the Kosmos2 with LoRA layers inside (what Predictor takes)."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"--lora-rank must be at least 1, got {rank}")
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_regex(parts, mlp)
    )
    return get_peft_model(model, config)


def load_adapter(model: nn.Module, directory: str | os.PathLike, trainable: bool = False):
    """Our Kosmos2 with the peft adapter in `directory` (peft's files, from here or from transformers)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)


def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The base model's state dict under its own names with every LoRA update added to its weight
    (W + B·A·alpha/r), computed without touching the live model (training goes on afterwards)."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.base_model.model
    state = {
        name.replace(".base_layer.", "."): t.detach()
        for name, t in base.state_dict().items()
        if ".lora_" not in name
    }
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight
            delta = sum(
                (module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A),
                torch.zeros_like(weight),
            )
            state[f"{name}.weight"] = (weight.detach().float() + delta.detach().float()).to(weight.dtype)
    return state


def save_adapter(peft_model, directory: str | os.PathLike, base_model_path: str = "") -> Path:
    """peft's adapter files (adapter_config.json, adapter_model.safetensors) into `directory`."""
    peft_model.peft_config["default"].base_model_name_or_path = base_model_path or None
    peft_model.save_pretrained(str(directory))
    return Path(directory)
