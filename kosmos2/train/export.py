"""Writing a trained model as a Hugging Face layout checkpoint that `Predictor`, the CLI and `kosmos2 eval`
load unchanged: config.json, model.safetensors, the tokenizer files, generation_config.json and a CLIP
preprocessor_config.json."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kosmos2.checkpoint import GENERATION_CONFIG, save_pretrained
from kosmos2.image import CLIP_MEAN, CLIP_STD


def generation_json(generation: Mapping[str, Any] | None = None) -> str:
    """generation_config.json's text: the official decoding settings (checkpoint.GENERATION_CONFIG) with
    `generation`'s overrides and additions."""
    return json.dumps({**GENERATION_CONFIG, **(generation or {})}, indent=2) + "\n"


def export(
    model: torch.nn.Module,
    tokenizer: Any,
    directory: str | os.PathLike[str],
    dtype: str,
    generation: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model` (a copy in `dtype`, on the CPU) and `tokenizer` to `directory`; `generation` overrides
    the official decoding settings (checkpoint.GENERATION_CONFIG) in generation_config.json."""
    directory = Path(directory)
    copy_ = copy.deepcopy(model).to("cpu", getattr(torch, dtype)).eval()
    save_pretrained(copy_, directory)
    tokenizer.save_pretrained(directory)
    (directory / "generation_config.json").write_text(generation_json(generation), encoding="utf-8")
    size = model.config.vision.image_size
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "Kosmos2Processor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 3,  # bicubic
        "do_center_crop": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
        "num_image_tokens": model.config.latent_query_num,
    }
    (directory / "preprocessor_config.json").write_text(
        json.dumps(preprocessor, indent=2) + "\n", encoding="utf-8"
    )
    return directory
