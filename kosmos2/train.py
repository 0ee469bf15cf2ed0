"""`kosmos2 train`: train a Kosmos-2 on the synthetic world (kosmos2/data/synthetic.py), from scratch.

This is how the built-in default model (kosmos2/assets/default) is made: `kosmos2 train --recipe default`
reproduces it, bit for bit on the same machine and torch build.

    recipe ─► tokenizer (BPE on the world's text, Kosmos-2 layout) ─► model (config preset, fresh weights,
              patch-aligned connector) + slot read-out (training only)
          ─► for step in steps:  batch(seed, step) ─► loss (answer tokens or SPEC §3 mask, + slot loss)
                                 ─► clip ─► LR schedule ─► AdamW (or AdamW + Muon)
                                 every N steps: checkpoint.pt (atomic); log.jsonl, progress bar
          ─► model/ (Hugging Face layout: config.json, model.safetensors, tokenizer files)

A batch is a pure function of (seed, step): `scenes_per_step` scenes, each rendered once and encoded once,
each posing `samples_per_scene` tasks drawn from the mixture; the rows of one scene share its image
embeddings (the vision encoder runs once per scene, the decoder once per row). So the data position of a
run is its step number, and a run killed at any moment resumes from its last checkpoint (model, optimizer,
schedule, step, RNG states) to the same weights an uninterrupted run ends with.

Output folder of a run:

    recipe.json     the recipe (a resumed run must match it)
    tokenizer/      the trained tokenizer
    checkpoint.pt   the latest training state (written to a temporary file, then renamed)
    log.jsonl       one JSON object per logged step: step, loss (and its parts: loss_lm, loss_location,
                    loss_slots), lr, grad_norm, tokens/s, elapsed
    model/          the final model, loadable by `Predictor.from_pretrained("OUT/model")`

`measure_world` scores a model on the world's fixed evaluation sets (REC, grounded captions, REG, VQA);
`kosmos2 train` prints a short version of it at the end of a run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # torch and the model are imported when a run starts: `kosmos2 --help` stays fast
    import torch

    from kosmos2.model import Kosmos2
    from kosmos2.predictor import Predictor
    from kosmos2.tokenizer import Kosmos2Tokenizer

CHECKPOINT_FILE = "checkpoint.pt"
RECIPE_FILE = "recipe.json"
LOG_FILE = "log.jsonl"
TOKENIZER_DIR = "tokenizer"
MODEL_DIR = "model"
CHECKPOINT_FORMAT = 2  # 2: the optimizer state is a list (AdamW[, Muon]); no scheduler state

# Decoding settings shipped with models trained here (generation_config.json). The world's captions repeat
# short word sequences ("</object>, <phrase> a small"), which the official no-repeat-ngram 3 would forbid.
GENERATION_SETTINGS = {"max_new_tokens": 96, "no_repeat_ngram_size": 0}


# ------------------------------------------------------------------------------------------------------------
# Recipes


def _default_mixture() -> dict[str, float]:
    # REC and grounded captions carry most of the location tokens; every task of the world is present so the
    # model answers every prompt of SPEC §1 the world has.
    return {
        "grounded_caption": 0.25,
        "caption": 0.03,
        "rec": 0.3,
        "phrase_grounding": 0.07,
        "reg": 0.15,
        "grounded_vqa": 0.05,
        "vqa": 0.15,
    }


INITS = ("patches", "scaled", "std")
SLOT_LOSSES = ("counts", "groups", "objects", "objectness", "none")
OPTIMIZERS = ("adamw", "muon")


@dataclass
class Recipe:
    """Everything that decides a training run: the same recipe gives the same weights.

    Steps and batch: `steps` optimizer steps of `scenes_per_step` scenes × `samples_per_scene` task samples.
    Optimizer: AdamW (betas, eps, weight decay on matrices only; or Muon on the layers' matrices:
    `optimizer`), LR linear warm-up over `warmup_steps` to `lr`, then cosine decay to
    `lr * final_lr_fraction`; gradients clipped to norm `grad_clip`.
    """

    preset: str = "small"  # kosmos2.config preset; the vocabulary size comes from the trained tokenizer
    vision_layers: int = 0  # the ViT's depth; 0 = the preset's
    text_layers: int = 0  # the decoder's depth; 0 = the preset's
    steps: int = 3000
    scenes_per_step: int = 16
    samples_per_scene: int = 4
    mixture: dict[str, float] = field(default_factory=_default_mixture)
    # weights of the plain VQA question kinds (synthetic.VQA_KINDS; a kind not named weighs 1), e.g.
    # {"count": 2.5}; empty: each kind alike
    vqa_kinds: dict[str, float] = field(default_factory=dict)
    # chance that a new object of a train scene copies an earlier one's attributes (groups of identical
    # objects: counting); None: the world's synthetic.P_COPY (0.25), which the held-out sets always use
    p_copy: float | None = None
    lr: float = 1e-3
    final_lr_fraction: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0
    # "adamw": AdamW on every parameter. "muon": torch.optim.Muon (momentum, then the update orthogonalised
    # by Newton-Schulz, its size matched to AdamW's: adjust_lr_fn="match_rms_adamw") on the 2-D weights of
    # the ViT, connector and decoder layers at peak LR `muon_lr`; AdamW on the rest (embeddings, latent
    # queries, the patch convolution, norms, biases, the training-only read-outs). Same schedule for both
    optimizer: str = "adamw"
    muon_lr: float = 1e-3
    muon_momentum: float = 0.95
    bf16: bool = True  # autocast the forward pass to bfloat16 (weights and optimizer stay float32)
    seed: int = 0
    tokenizer_vocab_size: int = 256  # base BPE vocabulary (fairseq specials + pieces); 1036 tags follow
    tokenizer_corpus_lines: int = 20000
    location_init: bool = True  # start the location tokens from a 2-D sinusoidal code (see init_locations)
    # "patches": "scaled" plus a connector whose latent i starts attending to image patch i (init_patches);
    # "scaled": unit-gain layers and a centred connector (init_scaled, center_connector); "std": the model's
    # own init (std 0.02 everywhere)
    init: str = "patches"
    # "all": the loss covers every token after the image slots (SPEC §3); "target": only the sample's target
    # (what follows the prompt) and </s>, as in instruction tuning. With "all" the prompt text, which does not
    # depend on the image, is learned first and teaches the decoder to flatten the image slots
    # (docs/DEFAULT_MODEL.md).
    loss_on: str = "target"
    # run each scene's image prefix (<s><image> slots </image>) once; all its samples attend to its keys
    # and values, each keeping its own positions (split_prefixes, TextTransformer.forward_shared). The same
    # loss as one row per sample for ~half the decoder tokens; needs loss_on="target" (the prefix's last
    # position would otherwise predict a different first prompt token for each sample)
    share_prefix: bool = False
    # auxiliary loss on the image slots, training only (build_slot_head; not exported): "objects" reads from
    # each slot whether an object covers its patch, and that object's colour, shape, size and box;
    # "groups" also how many objects are identical to it (1, 2, 3, 4+) and which EXTREMES word tells it
    # from them (the count words of captions and VQA, the suffix of REG answers); "counts" also how many
    # objects share each part of its description (its size; colour; shape; size and colour; size and shape;
    # colour and shape: COUNT_PATTERNS), what a plain "How many blue objects" asks, so that the decoder can
    # read the answer off any one matching slot instead of adding slots up (a GPU A/B did not raise plain
    # VQA with it: docs/DEFAULT_MODEL.md); "objectness" only the first;
    # "none" trains on the language-model loss alone
    slot_loss: str = "objects"
    slot_loss_weight: float = 1.0
    # "groups" and "counts": the weight of its group-size and place terms (and the mean of the counts'
    # terms) within the slot loss
    group_loss_weight: float = 1.0
    # when set, that weight moves linearly from group_loss_weight at the first step to this at the last
    # (group_weight_at): the boxes learned first, the group sizes weighted up once they are (None: constant)
    group_loss_weight_final: float | None = None
    # auxiliary pointer loss, training only (build_pointer_head; not exported): where the decoder is about to
    # write a box (the input is <object> or the delimiter, the target an upper-left location token) or has
    # just read one in the prompt, a query of its hidden state is scored against keys of its hidden states at
    # the image slots, and the slot of the patch under the box's centre is the answer (pointer_targets,
    # pointer_loss). Aimed at the step REC failed at most, picking which object the words name (the slots
    # themselves know colour, shape and size), but at weight 1 it made the boxes worse
    # (docs/DEFAULT_MODEL.md); 0 = off. Needs share_prefix and one slot per patch
    pointer_loss_weight: float = 0.0
    # auxiliary count loss, training only (build_count_head; not exported): a linear read-out of the
    # decoder's residual stream at `</image>` after its first `count_layer` blocks predicts how many objects
    # of each (size, colour, shape) the scene holds (count_targets; squared error). Where the blocks after it
    # can read it, so that "two large orange circles", REG's twin suffix and VQA's counts have one place to
    # look; a uniform attention over slots that mark their object's kind gives these counts. 0 = off. Needs
    # share_prefix
    count_loss_weight: float = 0.0
    count_layer: int = 2
    # loss weight of the target tokens the decoder writes right after `<phrase>` or `</object>`: in a
    # grounded caption the word that opens a phrase ("a", "two", "three": how many identical objects the
    # group holds) and the word after a group's boxes ("," more than one group left, "and" one left, "."
    # none): the caption's counting decisions. The "lm" diagnostic stays the plain mean; 1 = every target
    # token alike
    decision_weight: float = 1.0
    # exponential moving average of the weights, exported instead of the last step's (0 = off): after each
    # step ema += (1 - d) * (weights - ema) with d = min(ema_decay, (1 + step) / (10 + step)); the checkpoint
    # keeps both, so a resumed run ends the same
    ema_decay: float = 0.0
    checkpoint_every: int = 100
    log_every: int = 10
    export_dtype: str = "bfloat16"  # dtype of the exported model/ weights

    def validate(self) -> Recipe:
        from kosmos2.config import PRESETS
        from kosmos2.data.synthetic import TASKS, check_p_copy, check_vqa_kinds

        if self.preset not in PRESETS:
            raise ValueError(f"recipe preset {self.preset!r} is not one of {sorted(PRESETS)}")
        for name in ("steps", "scenes_per_step", "samples_per_scene", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"recipe {name} must be a positive int, got {value!r}")
        if not self.mixture or any(t not in TASKS for t in self.mixture):
            raise ValueError(f"recipe mixture {self.mixture} must name tasks of {TASKS}")
        if any(not w >= 0 for w in self.mixture.values()) or sum(self.mixture.values()) <= 0:
            raise ValueError(f"recipe mixture {self.mixture} needs weights >= 0 with a positive sum")
        try:
            check_vqa_kinds(self.vqa_kinds)
            check_p_copy(self.p_copy)
        except ValueError as e:
            raise ValueError(f"recipe {e}") from None
        if not self.lr > 0 or not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(
                f"recipe lr must be > 0 and final_lr_fraction in [0, 1], got {self.lr}, "
                f"{self.final_lr_fraction}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"recipe optimizer {self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        if not self.muon_lr > 0 or not 0 <= self.muon_momentum < 1:
            raise ValueError(
                f"recipe muon_lr must be > 0 and muon_momentum in [0, 1), got {self.muon_lr}, "
                f"{self.muon_momentum}"
            )
        if self.warmup_steps < 0 or self.grad_clip <= 0 or self.weight_decay < 0:
            raise ValueError("recipe warmup_steps and weight_decay must be >= 0 and grad_clip > 0")
        if self.init not in INITS:
            raise ValueError(f"recipe init {self.init!r}: use one of {', '.join(INITS)}")
        if self.slot_loss not in SLOT_LOSSES or not self.slot_loss_weight >= 0:
            raise ValueError(
                f"recipe slot_loss {self.slot_loss!r} (weight {self.slot_loss_weight}): use one of "
                f"{', '.join(SLOT_LOSSES)} with a weight >= 0"
            )
        if not self.group_loss_weight >= 0:
            raise ValueError(f"recipe group_loss_weight must be >= 0, got {self.group_loss_weight}")
        final = self.group_loss_weight_final
        if final is not None and (
            isinstance(final, bool) or not isinstance(final, int | float) or not final >= 0
        ):
            raise ValueError(f"recipe group_loss_weight_final must be None or a number >= 0, got {final!r}")
        if not self.decision_weight >= 0:
            raise ValueError(f"recipe decision_weight must be >= 0, got {self.decision_weight}")
        for name in ("vision_layers", "text_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"recipe {name} must be an int >= 0 (0: the preset's), got {value!r}")
        if not self.pointer_loss_weight >= 0:
            raise ValueError(f"recipe pointer_loss_weight must be >= 0, got {self.pointer_loss_weight}")
        if self.pointer_loss_weight > 0 and not self.share_prefix:
            raise ValueError(
                "recipe pointer_loss_weight > 0 needs share_prefix=True (it reads the prefix's slots)"
            )
        if not self.count_loss_weight >= 0 or isinstance(self.count_layer, bool) or self.count_layer < 0:
            raise ValueError(
                f"recipe count_loss_weight must be >= 0 and count_layer >= 0, got {self.count_loss_weight}, "
                f"{self.count_layer}"
            )
        if self.count_loss_weight > 0 and not self.share_prefix:
            raise ValueError("recipe count_loss_weight > 0 needs share_prefix=True (it reads the prefix)")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"recipe ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.loss_on not in ("target", "all"):
            raise ValueError(f"recipe loss_on {self.loss_on!r}: use 'target' or 'all'")
        if self.share_prefix and self.loss_on != "target":
            raise ValueError("recipe share_prefix needs loss_on='target' (SPEC §3's mask learns the prompt)")
        if self.export_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"recipe export_dtype {self.export_dtype!r}: use float32, bfloat16 or float16")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown recipe fields {unknown}; known: {sorted(known)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d).validate()


RECIPES: dict[str, Callable[[], Recipe]] = {
    # the built-in default model: preset "small-128" (128 px images in 16 px patches), ~56 minutes on 2
    # CPU cores (3,100 steps of ~1.07 s; each step 32 scenes x 4 samples behind a shared image prefix: new
    # scenes teach more than more samples of a scene), Muon on the layers' matrices, the "groups" slot
    # read-out (how many objects are identical to each slot's, and the word that tells them apart: the
    # counting the captions, REG and VQA need), the exported weights a moving average, the mixture shifted
    # towards plain VQA, plain VQA's count questions weighted 3 (docs/DEFAULT_MODEL.md)
    "default": lambda: Recipe(
        preset="small-128",
        steps=3100,
        scenes_per_step=32,
        samples_per_scene=4,
        share_prefix=True,
        slot_loss="groups",
        optimizer="muon",
        muon_lr=5e-3,
        ema_decay=0.995,
        vqa_kinds={"count": 3},  # counting, the plain VQA kind it was weakest at, asked ~2x as often
        # plain VQA at 0.30 (0.05 each from REC and REG, both well over their targets): plain questions are
        # what the decoder learns to read the slots without a box from, and "how many" rose with them
        mixture={
            "grounded_caption": 0.2,
            "caption": 0.03,
            "rec": 0.2,
            "phrase_grounding": 0.07,
            "reg": 0.15,
            "grounded_vqa": 0.05,
            "vqa": 0.3,
        },
    ),
    # seconds, for tests and trying the loop: the "tiny" preset, a few steps
    "test": lambda: Recipe(
        preset="tiny",
        steps=8,
        scenes_per_step=2,
        samples_per_scene=2,
        lr=3e-3,
        warmup_steps=2,
        tokenizer_vocab_size=128,
        tokenizer_corpus_lines=400,
        checkpoint_every=2,
        log_every=1,
        export_dtype="float32",
    ),
}


def get_recipe(name: str, **overrides: Any) -> Recipe:
    """A named recipe (`RECIPES`) with some fields replaced, validated."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    recipe = RECIPES[name]()
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown recipe fields {unknown}; known: {sorted(known)}")
    overrides = {name: _typed(name, value, getattr(recipe, name)) for name, value in overrides.items()}
    return dataclasses.replace(recipe, **overrides).validate()


def _typed(name: str, value: Any, default: Any) -> Any:
    """`value` for recipe field `name` as the type of its `default` (an int where a float goes becomes a
    float; a list where a tuple goes, a tuple), or a ValueError naming the field."""
    if default is None:  # an optional field (p_copy): validate() checks it
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is tuple and isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"recipe {name} must be {kind.__name__} (like {default!r}), got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------------------
# Tokenizer and model


def build_tokenizer(recipe: Recipe, directory: str | os.PathLike[str]) -> Kosmos2Tokenizer:
    """Train the BPE tokenizer on the world's text (`synthetic.corpus`) and save it in `directory`."""
    from kosmos2.data.synthetic import corpus
    from kosmos2.tokenizer import train_tokenizer

    return train_tokenizer(
        corpus(recipe.tokenizer_corpus_lines, seed=recipe.seed), recipe.tokenizer_vocab_size, directory
    )


def model_config(recipe: Recipe, tokenizer: Kosmos2Tokenizer):
    """The recipe's preset with the vocabulary of `tokenizer` (the output head covers exactly its ids)."""
    from kosmos2.config import Kosmos2Config

    config = Kosmos2Config.from_preset(recipe.preset)
    text = dataclasses.replace(config.text, vocab_size=tokenizer.vocab_size)
    if recipe.text_layers:
        text = dataclasses.replace(text, layers=recipe.text_layers)
    vision = config.vision
    if recipe.vision_layers:
        vision = dataclasses.replace(vision, layers=recipe.vision_layers)
    return dataclasses.replace(config, text=text, vision=vision)


def grid_code(grid: int, width: int) -> torch.Tensor:
    """A 2-D sinusoidal code of the cells of a `grid` × `grid` board, [grid², width], cells in row-major
    order: the first half of the width codes the row, the second half the column, as sines and cosines at
    geometric periods from 2 to 2·grid cells. Neighbouring cells get similar codes. Unit-scale (±1)."""
    import torch

    quarter = width // 4
    cells = torch.arange(grid * grid)
    rows, cols = (cells // grid).float(), (cells % grid).float()
    periods = 2.0 * grid ** (torch.arange(quarter).float() / max(quarter - 1, 1))
    freqs = 2 * math.pi / periods  # [quarter]

    def code(x: torch.Tensor) -> torch.Tensor:  # [cells] -> [cells, 2*quarter]
        angles = x[:, None] * freqs[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    table = torch.zeros(grid * grid, width)
    table[:, : 2 * quarter] = code(rows)
    table[:, 2 * quarter : 4 * quarter] = code(cols)
    return table


def init_locations(model: Kosmos2, tokenizer: Kosmos2Tokenizer) -> None:
    """Give the 1024 location tokens the 2-D sinusoidal code of their cell (`grid_code`, periods 2 to 64
    cells), scaled to the std of the other embeddings (0.02).

    Neighbouring cells start with similar embeddings, and since the output head is the embedding, a logit
    starts as a sum of a row score and a column score: the model can learn where a corner is along each axis
    instead of learning 1024 unrelated classes.
    """
    import torch

    from kosmos2.grounding import GRID

    embedding = model.text_model.model.embed_tokens.weight  # [V, C]
    C = embedding.shape[1]
    table = grid_code(GRID, C)
    table *= 0.02 / table[:, : 4 * (C // 4)].std()
    start = tokenizer.patch_index_offset
    with torch.no_grad():
        embedding[start : start + GRID * GRID] = table.to(embedding.dtype)


def build_model(recipe: Recipe, tokenizer: Kosmos2Tokenizer) -> Kosmos2:
    """Fresh weights for the recipe's config, seeded by the recipe's seed."""
    import torch

    from kosmos2.model import Kosmos2

    torch.manual_seed(recipe.seed)
    model = Kosmos2(model_config(recipe, tokenizer))
    if recipe.init in ("scaled", "patches"):
        init_scaled(model)
        if recipe.init == "patches":
            init_patches(model)
        center_connector(model, recipe)
    if recipe.location_init:
        init_locations(model, tokenizer)
    return model


def init_scaled(model: Kosmos2, slot_std: float = 0.1, position_std: float = 0.5) -> None:
    """Re-initialise for a small model trained from scratch: every linear layer at unit gain (std
    1/sqrt(fan_in)), the residual branches' output layers (out_proj, fc2) further divided by sqrt(2 * layers),
    the ViT's position embeddings at std `position_std`, the connector's dense layer at std 1 (its inputs are
    unit-norm, ~1/sqrt(width) each) and its output at ~`slot_std` per element.

    The model's own init (std 0.02 everywhere) suits widths of ~1000 and more. At the small preset's widths it
    shrinks each layer's output ~3x: through the connector's three layers the image slots start ~30x smaller
    than the text embeddings, and a probe reading the image through them learns ~10x slower
    (docs/DEFAULT_MODEL.md). Embeddings, layer norms and the latent queries (std 1) keep the model's init.
    """
    import torch

    vision_layers = len(model.vision_model.model.encoder.layers)
    text_layers = len(model.text_model.model.layers)
    connector = model.image_to_text_projection
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or module is model.text_model.lm_head:
                continue
            std = module.weight.shape[1] ** -0.5
            if name.endswith(("out_proj", "fc2")) and not name.startswith("image_to_text_projection"):
                std /= math.sqrt(2 * (vision_layers if name.startswith("vision_model") else text_layers))
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        embeddings = model.vision_model.model.embeddings
        patch = embeddings.patch_embedding.weight
        patch.normal_(0.0, patch[0].numel() ** -0.5)
        embeddings.position_embedding.weight.normal_(0.0, position_std)
        connector.dense.weight.normal_(0.0, 1.0)
        out = connector.x_attn.out_proj.weight
        out.normal_(0.0, slot_std * out.shape[1] ** -0.5)


def patch_grid(model_config) -> int:
    """Patches per side of the vision encoder's input."""
    return model_config.vision.image_size // model_config.vision.patch_size


def slot_patches(num_slots: int, num_patches: int) -> list[int]:
    """The image patch (row-major index) that image slot i starts looking at under `init_patches`: slots
    spread evenly over the patches (slot i <-> patch i when there are as many slots as patches)."""
    return [min(num_patches - 1, round((i + 0.5) * num_patches / num_slots - 0.5)) for i in range(num_slots)]


def init_patches(model: Kosmos2, sharpness: float = 12.0, slot_std: float = 0.1) -> None:
    """Start each image slot as a view of one image patch (after `init_scaled`).

    The ViT's patch position embeddings become a 2-D sinusoidal code (`grid_code`) at twice the scale of a
    patch embedding, so each patch's features say where it is. The connector's query projection becomes the
    identity and latent i a scaled copy of the key that patch `slot_patches(…)[i]`'s position alone produces,
    so that at initialisation slot i attends mostly to that patch (attention logit `sharpness` on it), and
    the slots come out in raster order. Key, value and dense layers at unit gain; the output projection at
    ~`slot_std` per element.

    Why (docs/DEFAULT_MODEL.md): the decoder learns to point at once when the slots say which patches hold an
    object; sixteen slots that each pool the whole image never gave it that within an hour of training.
    """
    import torch
    import torch.nn.functional as F

    embeddings = model.vision_model.model.embeddings
    grid = patch_grid(model.config)
    connector = model.image_to_text_projection
    attn = connector.x_attn
    Q, C = connector.latent_query.shape
    with torch.no_grad():
        position = embeddings.position_embedding.weight  # [1 + grid², Cv]; row 0 is the class token's
        code = grid_code(grid, position.shape[1])
        patch = embeddings.patch_embedding.weight
        patch_scale = float(patch.std()) * patch[0].numel() ** 0.5  # std of a patch embedding
        position[1:] = code * (2 * patch_scale / float(code.std()))
        connector.dense.weight.normal_(0.0, 1.0)
        connector.dense.bias.zero_()
        for layer in (attn.k_proj, attn.v_proj):
            layer.weight.normal_(0.0, layer.weight.shape[1] ** -0.5)
            layer.bias.zero_()
        attn.q_proj.weight.copy_(torch.eye(C))
        attn.q_proj.bias.zero_()
        # the key of each patch position alone, as the ViT's final LayerNorm and the L2 norm would pass it
        features = F.normalize(F.layer_norm(position[1:], (position.shape[1],)), dim=-1)
        keys = attn.k_proj(connector.dense(features))  # [grid², C]
        heads, head_dim = attn.heads, C // attn.heads
        chosen = keys[slot_patches(Q, grid * grid)].view(Q, heads, head_dim)
        # q·k / sqrt(head_dim) = sharpness on the chosen patch, in every head
        chosen = chosen * (sharpness * head_dim**0.5 / chosen.pow(2).sum(-1, keepdim=True))
        connector.latent_query.copy_(chosen.reshape(Q, C))
        attn.out_proj.weight.normal_(0.0, slot_std * C**-0.5)
        attn.out_proj.bias.zero_()


# ------------------------------------------------------------------------------------------------------------
# The auxiliary slot loss (training only)


SLOT_BOX_TERMS = 4  # x1, y1, x2, y2 of the covering object, relative to the patch centre, in patches


GROUP_CLASSES = 4  # objects identical to a slot's object, itself included: 1, 2, 3, 4 or more
PLACE_CLASSES = ("", "on the left", "on the right", "at the top", "at the bottom", None)  # Facts.place
# the "counts" read-out: which of (size, colour, shape) each count shares with the slot's object (the full
# description is the group's), and its classes: 1 .. COUNT_CLASSES objects, itself included (the world
# draws at most synthetic.OBJECT_COUNTS[-1] = 6 objects; more would be capped)
COUNT_PATTERNS = (
    (True, False, False),
    (False, True, False),
    (False, False, True),
    (True, True, False),
    (True, False, True),
    (False, True, True),
)
COUNT_CLASSES = 6
COUNT_PATTERN_NAMES = tuple(
    "+".join(n for n, k in zip(("size", "colour", "shape"), p, strict=True) if k) for p in COUNT_PATTERNS
)


def slot_columns(width: int | None = None) -> dict[str, slice]:
    """The slot read-out's columns, in order: "objectness" (1 logit), then the "objects" read-out's
    "colour", "shape", "size" logits and "box" (SLOT_BOX_TERMS), then the "groups" read-out's "group"
    (GROUP_CLASSES) and "place" logits, then the "counts" read-out's COUNT_CLASSES logits for each of
    COUNT_PATTERNS. With `width`, only the sections that fit in it."""
    from kosmos2.data import synthetic

    sections = (
        ("objectness", 1),
        ("colour", len(synthetic.COLOURS)),
        ("shape", len(synthetic.SHAPES)),
        ("size", len(synthetic.SIZES)),
        ("box", SLOT_BOX_TERMS),
        ("group", GROUP_CLASSES),
        ("place", len(PLACE_CLASSES)),
        ("counts", len(COUNT_PATTERNS) * COUNT_CLASSES),
    )
    columns, k = {}, 0
    for name, n in sections:
        if width is not None and k + n > width:
            break
        columns[name] = slice(k, k + n)
        k += n
    return columns


def slot_head_outputs(slot_loss: str) -> int:
    """Read-out width: 1 objectness logit, then (for "objects") colour, shape, size logits and the box,
    then (for "groups") group-size and place logits, then (for "counts") the pattern counts' logits
    (`slot_columns`)."""
    last = {"objectness": "objectness", "groups": "place", "counts": "counts"}.get(slot_loss, "box")
    return slot_columns()[last].stop


def build_slot_head(recipe: Recipe, model: Kosmos2) -> torch.nn.Linear | None:
    """The linear read-out of the auxiliary slot loss (None when the recipe has none). It lives only in
    training checkpoints: the exported model is the plain Kosmos-2 network."""
    import torch

    if recipe.slot_loss == "none" or recipe.slot_loss_weight == 0:
        return None
    return torch.nn.Linear(model.config.text.width, slot_head_outputs(recipe.slot_loss))


@dataclass
class SlotTargets:
    """What the slot read-out should say, per scene and slot [S, Q]: cover (1.0 when an object's box
    overlaps the slot's patch), colour / shape / size class of the object covering most of the patch (-100
    where none does), box [S, Q, 4] of that object relative to the patch centre, in patches; group: the
    number of objects identical to it, less one, capped at GROUP_CLASSES - 1; place: its index in
    PLACE_CLASSES; counts [S, Q, len(COUNT_PATTERNS)]: per pattern the number of objects sharing those
    attributes with it, less one, capped at COUNT_CLASSES - 1."""

    cover: torch.Tensor
    colour: torch.Tensor
    shape: torch.Tensor
    size: torch.Tensor
    box: torch.Tensor
    group: torch.Tensor
    place: torch.Tensor
    counts: torch.Tensor


def slot_targets(scenes: Sequence[Any], grid: int, num_slots: int) -> SlotTargets:
    """Targets of the slot loss from the scenes' true boxes. The model sees each scene resized to a square
    (no crop), so a normalised box maps straight onto the `grid` × `grid` patches. A slot's object is the
    one whose box overlaps its patch most (ties go to the later object: it is drawn on top)."""
    import numpy as np
    import torch

    from kosmos2.data import synthetic

    colours, shapes = list(synthetic.COLOURS), list(synthetic.SHAPES)
    patches = np.array(slot_patches(num_slots, grid * grid))
    r, c = np.divmod(patches, grid)
    px1, py1, px2, py2 = c / grid, r / grid, (c + 1) / grid, (r + 1) / grid  # [Q] float64
    cx, cy = (c + 0.5) / grid, (r + 0.5) / grid
    S = len(scenes)
    cover = np.zeros((S, num_slots), dtype=np.float32)
    classes = np.full((5, S, num_slots), -100, dtype=np.int64)
    box = np.zeros((S, num_slots, SLOT_BOX_TERMS), dtype=np.float32)
    counts = np.full((S, num_slots, len(COUNT_PATTERNS)), -100, dtype=np.int64)
    for s, scene in enumerate(scenes):
        if not scene.objects:
            continue
        boxes = np.array([o.norm_box for o in scene.objects], dtype=np.float64)  # [n, 4]
        x1, y1, x2, y2 = (boxes[:, k, None] for k in range(4))  # [n, 1] against the patches [Q]
        width = np.maximum(0.0, np.minimum(x2, px2) - np.maximum(x1, px1))
        height = np.maximum(0.0, np.minimum(y2, py2) - np.maximum(y1, py1))
        area = width * height  # [n, Q]
        largest = area.max(axis=0)
        # the last object reaching the largest overlap
        which = len(scene.objects) - 1 - np.argmax(area[::-1] == largest, axis=0)
        q = np.flatnonzero(largest > 0)
        w = which[q]
        twins = synthetic.twin_facts(scene)
        per_object = np.array(
            [
                (
                    colours.index(o.colour),
                    shapes.index(o.shape),
                    synthetic.SIZES.index(o.size),
                    min(count, GROUP_CLASSES) - 1,
                    PLACE_CLASSES.index(place),
                )
                for o, (count, place) in zip(scene.objects, twins, strict=True)
            ],
            dtype=np.int64,
        )  # [n, 5]
        sharing = (
            np.minimum(synthetic.sharing_counts(scene, COUNT_PATTERNS), COUNT_CLASSES) - 1
        )  # [n, patterns]
        cover[s, q] = 1.0
        classes[:, s, q] = per_object[w].T
        counts[s, q] = sharing[w]
        relative = boxes[w] - np.stack([cx[q], cy[q], cx[q], cy[q]], axis=1)  # float64, then float32 × grid
        box[s, q] = relative.astype(np.float32) * np.float32(grid)
    classes_t = torch.from_numpy(classes)
    return SlotTargets(
        torch.from_numpy(cover),
        *classes_t[:3],
        torch.from_numpy(box),
        *classes_t[3:],
        torch.from_numpy(counts),
    )


def slot_loss(
    head: torch.nn.Linear, slots: torch.Tensor, targets: SlotTargets, group_weight: float = 1.0
) -> torch.Tensor:
    """Objectness binary cross-entropy over all slots; with the "objects" read-out also the colour, shape
    and size cross-entropies and the box L1 (in patches), each a mean over the covered slots; with "groups"
    also the group-size and place cross-entropies, each times `group_weight`; with "counts" also the mean
    of the pattern counts' cross-entropies, times `group_weight`."""
    import torch.nn.functional as F

    out = head(slots.float())  # [S, Q, K]
    loss = F.binary_cross_entropy_with_logits(out[..., 0], targets.cover)
    columns = slot_columns(out.shape[-1])
    covered = targets.cover.bool()
    if "colour" not in columns or not covered.any():
        return loss
    picked = out[covered]  # [N, K]
    for name in ("colour", "shape", "size"):
        loss = loss + F.cross_entropy(picked[:, columns[name]], getattr(targets, name)[covered])
    loss = loss + F.l1_loss(picked[:, columns["box"]], targets.box[covered])
    for name in ("group", "place"):
        if name in columns:
            loss = loss + group_weight * F.cross_entropy(
                picked[:, columns[name]], getattr(targets, name)[covered]
            )
    if "counts" in columns:
        logits = picked[:, columns["counts"]].reshape(-1, COUNT_CLASSES)  # [N * patterns, classes]
        loss = loss + group_weight * F.cross_entropy(logits, targets.counts[covered].reshape(-1))
    return loss


def slot_report(out: torch.Tensor, targets: SlotTargets) -> dict[str, Any]:
    """How well a slot read-out's outputs `out` [S, Q, K] (`slot_head_outputs` wide) match `targets`:
    "objectness", the share of all slots whose logit sign agrees with cover; over the covered slots the
    share of "colour", "shape" and "size" read right, "box_l1" the mean absolute box error (in patches);
    with the "groups" read-out "place" likewise and "group", the confusion matrix of the group size (row:
    true 1, 2, 3, 4+; column: read), and "group_recall", its diagonal over its row sums (None for an
    empty row); with "counts" also "counts", the share read right per pattern (COUNT_PATTERN_NAMES).
    "slots": the number of covered slots."""
    out = out.float()
    columns = slot_columns(out.shape[-1])
    covered = targets.cover.bool()
    report: dict[str, Any] = {
        "slots": int(covered.sum()),
        "objectness": float(((out[..., 0] > 0) == covered).float().mean()),
    }
    if "colour" not in columns:
        return report
    picked = out[covered]  # [N, K]

    def read(name: str) -> torch.Tensor:
        return picked[:, columns[name]].argmax(-1)

    for name in ("colour", "shape", "size"):
        report[name] = float((read(name) == getattr(targets, name)[covered]).float().mean())
    report["box_l1"] = float((picked[:, columns["box"]] - targets.box[covered]).abs().mean())
    if "place" not in columns:
        return report
    confusion = [[0] * GROUP_CLASSES for _ in range(GROUP_CLASSES)]
    for t, r in zip(targets.group[covered].tolist(), read("group").tolist(), strict=True):
        confusion[t][r] += 1
    report["group"] = confusion
    report["group_recall"] = [row[i] / sum(row) if sum(row) else None for i, row in enumerate(confusion)]
    report["place"] = float((read("place") == targets.place[covered]).float().mean())
    if "counts" in columns:
        read_counts = picked[:, columns["counts"]].reshape(len(picked), len(COUNT_PATTERNS), -1).argmax(-1)
        right = (read_counts == targets.counts[covered]).float().mean(0)
        report["counts"] = dict(zip(COUNT_PATTERN_NAMES, right.tolist(), strict=True))
    return report


def probe_slots(run: str | os.PathLike[str], scenes: int = 400, split: str = "test") -> dict[str, Any]:
    """`slot_report` of a training run's slot read-out (its checkpoint's last-step weights, not the moving
    average: the read-out was trained with those) on `scenes` fresh scenes of a held-out split, seen as
    in training (rendered, resized by `kosmos2.image.preprocess`, bf16 autocast if the recipe uses it)."""
    import torch

    from kosmos2.data import synthetic
    from kosmos2.image import preprocess
    from kosmos2.tokenizer import Kosmos2Tokenizer

    run = Path(run)
    if split not in ("test", "compositional"):
        raise ValueError(f"split {split!r}: probe a held-out split, 'test' or 'compositional'")
    if isinstance(scenes, bool) or not isinstance(scenes, int) or scenes < 1:
        raise ValueError(f"scenes {scenes!r}: probe at least one scene")
    if not (run / CHECKPOINT_FILE).is_file():
        raise ValueError(f"{run}: no {CHECKPOINT_FILE}; give the --out folder of a `kosmos2 train` run")
    state = load_checkpoint(run / CHECKPOINT_FILE)
    recipe = Recipe.from_dict(state["recipe"])
    if state.get("slot_head") is None:
        raise ValueError(f"{run}: the run has no slot read-out (recipe slot_loss {recipe.slot_loss!r})")
    model = build_model(recipe, Kosmos2Tokenizer.from_pretrained(run / TOKENIZER_DIR))
    model.load_state_dict(state["model"])
    model.eval()
    head = build_slot_head(recipe, model)
    head.load_state_dict(state["slot_head"])
    grid, num_slots = patch_grid(model.config), model.config.latent_query_num
    world = [
        synthetic.make_scene(synthetic.scene_seed(split, synthetic.SPLIT_SEEDS[split], "slots", i), split)
        for i in range(scenes)
    ]
    outs = []
    with torch.no_grad():
        for start in range(0, scenes, 50):
            part = world[start : start + 50]
            pixels = preprocess([synthetic.render(s) for s in part], size=model.config.vision.image_size)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
                slots = model.encode_image(pixels)
            outs.append(head(slots.float()))  # in float32, as `compute_losses` reads it
    return slot_report(torch.cat(outs), slot_targets(world, grid, num_slots))


def count_kinds() -> list[tuple[str, str, str]]:
    """The (size, colour, shape) kinds the count read-out counts, in its output order."""
    from kosmos2.data import synthetic

    return [(z, c, h) for z in synthetic.SIZES for c in synthetic.COLOURS for h in synthetic.SHAPES]


def count_targets(scenes: Sequence[Any]) -> torch.Tensor:
    """[S, K] float: how many objects of each `count_kinds()` kind each scene holds."""
    import torch

    index = {kind: k for k, kind in enumerate(count_kinds())}
    counts = torch.zeros(len(scenes), len(index))
    for s, scene in enumerate(scenes):
        for o in scene.objects:
            counts[s, index[(o.size, o.colour, o.shape)]] += 1
    return counts


def build_count_head(recipe: Recipe, model: Kosmos2) -> torch.nn.Linear | None:
    """The linear read-out of the auxiliary count loss (None when the recipe has none); training only."""
    import torch

    if recipe.count_loss_weight == 0:
        return None
    if recipe.count_layer > model.config.text.layers:
        raise ValueError(
            f"recipe count_layer {recipe.count_layer}: preset {recipe.preset!r} has "
            f"{model.config.text.layers} decoder blocks; use 0 to {model.config.text.layers}"
        )
    return torch.nn.Linear(model.config.text.width, len(count_kinds()))


def count_loss(head: torch.nn.Linear, state: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Squared error of the read counts, summed over the kinds and averaged over the scenes: state [S, C]
    (each scene's `</image>` after `count_layer` blocks), counts [S, K] (`count_targets`)."""
    return (head(state.float()) - counts).pow(2).sum(-1).mean()


POINTER_WIDTH = 64  # query/key width of the pointer read-out


def build_pointer_head(recipe: Recipe, model: Kosmos2) -> torch.nn.ModuleDict | None:
    """The query and key projections of the auxiliary pointer loss (None when the recipe has none). Like the
    slot read-out it lives only in training checkpoints."""
    import torch

    if recipe.pointer_loss_weight == 0:
        return None
    grid = patch_grid(model.config)
    if model.config.latent_query_num != grid * grid:
        raise ValueError(
            f"recipe pointer_loss_weight > 0 needs one image slot per patch ({grid}x{grid} = {grid * grid}), "
            f"but preset {recipe.preset!r} has {model.config.latent_query_num}; set pointer_loss_weight=0"
        )
    width = model.config.text.width
    return torch.nn.ModuleDict(
        {"query": torch.nn.Linear(width, POINTER_WIDTH), "key": torch.nn.Linear(width, POINTER_WIDTH)}
    )


def pointer_targets(
    input_ids: torch.Tensor, targets: torch.Tensor, location_start: int, grid: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the rows point at a box and which image slot holds it: (row, position, slot) index tensors.

    Two kinds of place: where the model starts writing a box (the input is not a location token, the target
    is one: the upper-left corner after <object> or the delimiter), the REC step; and where it has just read
    a box of the prompt (the input is a lower-right corner after an upper-left one, with no loss there: REG
    and grounded VQA). The box's centre, from its corner pair (SPEC §4 cells), falls in patch (row, col) of
    the `grid` x `grid` patches, which is slot row * grid + col (one slot per patch)."""
    import torch

    from kosmos2.grounding import GRID

    is_location = input_ids >= location_start
    writes = (targets >= location_start) & ~is_location
    writes[:, -1] = False
    w_rows, w_positions = writes.nonzero(as_tuple=True)
    w_ul = targets[w_rows, w_positions] - location_start
    w_lr = targets[w_rows, w_positions + 1] - location_start
    whole = w_lr >= 0  # a written box always has both corners; guard against a cut row all the same
    reads = torch.zeros_like(is_location)
    reads[:, 2:] = is_location[:, 2:] & is_location[:, 1:-1] & ~is_location[:, :-2] & (targets[:, 2:] == -100)
    r_rows, r_positions = reads.nonzero(as_tuple=True)
    rows = torch.cat([w_rows[whole], r_rows])
    positions = torch.cat([w_positions[whole], r_positions])
    ul = torch.cat([w_ul[whole], input_ids[r_rows, r_positions - 1] - location_start])
    lr = torch.cat([w_lr[whole], input_ids[r_rows, r_positions] - location_start])
    cy = ((ul // GRID) + (lr // GRID) + 1).float() / (2 * GRID)
    cx = ((ul % GRID) + (lr % GRID) + 1).float() / (2 * GRID)
    prow = torch.clamp((cy * grid).long(), 0, grid - 1)
    pcol = torch.clamp((cx * grid).long(), 0, grid - 1)
    return rows, positions, prow * grid + pcol


def pointer_loss(
    head: torch.nn.ModuleDict,
    hidden: torch.Tensor,
    slot_states: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """Summed cross-entropy of picking `slots` among a row's image slots: query(hidden at the box start) ·
    key(hidden at each slot) / sqrt(width). hidden [R,T,C] is the decoder's last layer over the rows,
    slot_states [R,Q,C] the same layer at the image slots each row reads."""
    import torch.nn.functional as F

    if rows.numel() == 0:
        return hidden.sum() * 0.0 + slot_states.sum() * 0.0
    query = head["query"](hidden[rows, positions].float())  # [N, D]
    keys = head["key"](slot_states[rows].float())  # [N, Q, D]
    scores = (keys @ query.unsqueeze(-1)).squeeze(-1) / math.sqrt(query.shape[-1])
    return F.cross_entropy(scores, slots, reduction="sum")


def center_connector(model: Kosmos2, recipe: Recipe, scenes: int = 64) -> None:
    """Data-dependent init: shift the connector's biases so that its dense output and its image slots have
    mean zero over `scenes` training images (drawn from the recipe's seed). What every image shares carries
    no information and, left in, would be most of each slot."""
    import torch
    import torch.nn.functional as F

    from kosmos2.data import synthetic
    from kosmos2.image import preprocess

    images = [
        synthetic.render(
            synthetic.make_scene(
                synthetic.scene_seed("train", recipe.seed, "init", i), "train", recipe.p_copy
            )
        )
        for i in range(scenes)
    ]
    pixels = preprocess(images, size=model.config.vision.image_size)
    connector = model.image_to_text_projection
    training = model.training
    model.eval()  # no dropout
    with torch.no_grad():
        features = F.normalize(model.vision_model(pixels), dim=-1)
        connector.dense.bias.sub_(connector.dense(features).mean((0, 1)))
        connector.x_attn.out_proj.bias.sub_(connector(features).mean((0, 1)))
    model.train(training)


# ------------------------------------------------------------------------------------------------------------
# Data: a batch is a pure function of (seed, step)


@dataclass
class Chunk:
    """Rows of similar length, RIGHT padded: input_ids, targets [R,T] (targets[r,t] is the token to predict
    at t, -100 outside the loss and on padding), image_mask [R,T] (the image slots), image_index [R] (the
    scene of each row)."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    image_mask: torch.Tensor
    image_index: torch.Tensor
    # samples behind a shared prefix (Recipe.share_prefix): the rows hold each sample's tokens after its
    # scene's image prefix (`Batch.prefix`, row image_index), positions [R,T] are the decoder positions they
    # have in a row of their own, and image_mask is all False; None = one sample a row, prefix included
    positions: torch.Tensor | None = None


@dataclass
class Prefix:
    """The image prefix of each scene (`<s><image>` slots `</image>`), run once for all its samples:
    input_ids and image_mask [S,P] (one length: the template is fixed)."""

    input_ids: torch.Tensor
    image_mask: torch.Tensor


def _move(data: Any, device: torch.device | str) -> Any:
    """A copy of the dataclass `data` with its tensors on `device`, those of the dataclasses and lists it
    holds (chunks, prefix, slot targets) included."""
    import torch

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, list):
            return [move(v) for v in value]
        if dataclasses.is_dataclass(value):
            return dataclasses.replace(
                value, **{f.name: move(getattr(value, f.name)) for f in dataclasses.fields(value)}
            )
        return value

    return move(data)


@dataclass
class Batch:
    """One training step's data: pixel_values [S,3,H,W] (one image per scene) and the rows in chunks.

    Rows are sorted by length and cut into chunks (`chunk_bounds`), each padded on the right to its own
    longest row. Right padding needs no attention mask: a causal row never looks ahead at its padding, and
    pad tokens do not shift positions (SPEC §6), so every row computes what it would alone.
    """

    pixel_values: torch.Tensor
    chunks: list[Chunk]
    tasks: list[str]
    location_start: int  # the first location token's id: targets >= it are location tokens
    slots: SlotTargets | None = None  # targets of the auxiliary slot loss, when asked for
    counts: torch.Tensor | None = None  # targets of the auxiliary count loss [S, K], when asked for
    prefix: Prefix | None = None  # the shared image prefixes (Recipe.share_prefix)

    @property
    def loss_tokens(self) -> int:
        return sum(int((c.targets != -100).sum()) for c in self.chunks)

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        shared = self.prefix.input_ids.numel() if self.prefix is not None else 0
        return shared + sum(int((c.input_ids != PAD_ID).sum()) for c in self.chunks)

    def to(self, device: torch.device | str) -> Batch:
        """This batch with every tensor on `device` (tasks and location_start as they are)."""
        return _move(self, device)


# what a chunk of rows costs beyond its tokens, in tokens (`chunk_bounds`): the attention calls, gathers and
# concatenations each chunk adds to a decoder block, forward and backward, take about the time of this many
# tokens' projections and MLP on the default recipe's decoder (2 CPU threads)
CHUNK_COST = 64


def chunk_bounds(lengths: Sequence[int], cost: int = CHUNK_COST) -> list[tuple[int, int]]:
    """Cut rows of ascending `lengths` into chunks [start, end), each padded to its last (longest) row, so
    that the padded tokens plus `cost` per chunk are fewest (dynamic programming over the cut points; a
    cut inside a run of equal lengths never pays, so cuts fall between runs). With `cost` 0 each run of
    equal lengths is a chunk of its own (no padding)."""
    if any(b < a for a, b in itertools.pairwise(lengths)):
        raise ValueError("chunk_bounds: the row lengths must be in ascending order")
    ends = [j for j in range(1, len(lengths) + 1) if j == len(lengths) or lengths[j] != lengths[j - 1]]
    points = [0, *ends]  # the possible cut points
    best = [0] + [math.inf] * len(ends)  # best[b]: the least cost of the rows before points[b]
    cut = [0] * len(points)
    for b in range(1, len(points)):
        j = points[b]
        for a in range(b):
            total = best[a] + (j - points[a]) * lengths[j - 1] + cost
            if total < best[b]:
                best[b], cut[b] = total, a
    bounds, b = [], len(points) - 1
    while b:
        bounds.append((points[cut[b]], points[b]))
        b = cut[b]
    return bounds[::-1]


PAD_ID = 1  # the fairseq <pad> id of every Kosmos-2 tokenizer


def batch_samples(recipe: Recipe, step: int) -> list[tuple[Any, list[dict[str, Any]]]]:
    """The (scene, samples) of training step `step`: `scenes_per_step` train scenes, each with up to
    `samples_per_scene` samples of tasks drawn from the mixture (a task the scene cannot pose is skipped)."""
    from kosmos2.data import synthetic

    names = [t for t, w in recipe.mixture.items() if w > 0]
    weights = [recipe.mixture[t] for t in names]
    out = []
    for k in range(recipe.scenes_per_step):
        seed = synthetic.scene_seed("train", recipe.seed, "scene", step, k)
        scene = synthetic.make_scene(seed, "train", recipe.p_copy)
        rng = random.Random(synthetic.scene_seed("train", recipe.seed, "tasks", step, k))
        samples = []
        for task in rng.choices(names, weights=weights, k=recipe.samples_per_scene):
            sample = synthetic.build_sample(scene, task, rng, recipe.vqa_kinds or None)
            if sample is not None:
                samples.append(sample)
        if samples:
            out.append((scene, samples))
    return out


def make_batch(
    recipe: Recipe,
    step: int,
    tokenizer: Kosmos2Tokenizer,
    image_size: int,
    num_image_tokens: int,
    grid: int | None = None,
    counts: bool = False,
) -> Batch:
    """Render, preprocess and tokenise the samples of `step` (see `batch_samples`).

    Scenes are rendered at their native size and resized by `kosmos2.image.preprocess`, exactly as an image
    reaches the model at inference. Each row is `tokenizer.encode_for_training(prompt, target)`. With `grid`
    (patches per side) the batch also carries the targets of the auxiliary slot loss (`slot_targets`), with
    `counts` those of the count loss (`count_targets`).
    """
    import torch

    from kosmos2.data import synthetic
    from kosmos2.image import preprocess

    if tokenizer.pad_id != PAD_ID:
        raise ValueError(
            f"the tokenizer's <pad> id is {tokenizer.pad_id}, expected {PAD_ID} (fairseq layout)"
        )
    scenes = batch_samples(recipe, step)
    pixels = preprocess([synthetic.render(scene) for scene, _ in scenes], size=image_size)
    rows = []  # (ids, image_mask, targets, scene index, task)
    for i, (_, samples) in enumerate(scenes):
        for sample in samples:
            ids, image_mask, loss_mask = tokenizer.encode_for_training(
                sample["prompt"],
                sample["target"],
                num_image_tokens=num_image_tokens,
                learn_prompt=recipe.loss_on == "all",  # SPEC §3; "target": the answer only
            )
            # next-token targets: position t predicts ids[t + 1] where the loss covers it (SPEC §3)
            targets = [n if learn else -100 for n, learn in zip(ids[1:], loss_mask[1:], strict=True)] + [-100]
            rows.append((ids, image_mask, targets, i, sample["task"], None))
    prefix = None
    if recipe.share_prefix:
        prefix, rows = split_prefixes(rows)
    rows.sort(key=lambda r: len(r[0]))  # stable: equal lengths keep their order
    chunks = []
    for start, end in chunk_bounds([len(r[0]) for r in rows]):
        part = rows[start:end]
        T = len(part[-1][0])
        input_ids = torch.full((len(part), T), PAD_ID, dtype=torch.long)
        targets = torch.full((len(part), T), -100, dtype=torch.long)
        image_mask = torch.zeros((len(part), T), dtype=torch.bool)
        positions = torch.ones((len(part), T), dtype=torch.long) if prefix is not None else None
        for r, (ids, mask, tgt, _, _, pos) in enumerate(part):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            targets[r, : len(ids)] = torch.tensor(tgt)
            image_mask[r, : len(ids)] = torch.tensor(mask)
            if positions is not None:
                positions[r, : len(ids)] = torch.tensor(pos)
        index = torch.tensor([r[3] for r in part], dtype=torch.long)
        chunks.append(Chunk(input_ids, targets, image_mask, index, positions))
    slots = None
    if grid is not None:
        slots = slot_targets([scene for scene, _ in scenes], grid, num_image_tokens)
    return Batch(
        pixel_values=pixels,
        chunks=chunks,
        tasks=[r[4] for r in rows],
        location_start=tokenizer.patch_index_offset,
        slots=slots,
        prefix=prefix,
        counts=count_targets([scene for scene, _ in scenes]) if counts else None,
    )


class BatchWorker:
    """`make_batch` for steps start, start + 1, ... made ahead in a worker process while the model trains.

    A batch is a pure function of (recipe, step) (no global RNG is drawn), so a run gets the same batches,
    and ends on the same weights, with or without the worker: only where the time of making them goes
    changes. The worker (spawned, one torch thread) keeps up to `ahead` batches ready; `get(step)` returns
    the next one, which must be for `step`. A failure in the worker is raised here, with its traceback.
    `workers` > 1 starts that many, worker k making steps start + k, start + k + workers, ... (for a GPU
    that trains faster than one CPU core makes batches). Use as a context manager (or call `close`): the
    workers are stopped on exit.
    """

    def __init__(
        self,
        recipe: Recipe,
        start: int,
        end: int,
        tokenizer_dir: str | os.PathLike[str],
        image_size: int,
        num_image_tokens: int,
        grid: int | None = None,
        counts: bool = False,
        ahead: int = 2,
        workers: int = 1,
    ) -> None:
        import multiprocessing

        if ahead < 1:
            raise ValueError(f"BatchWorker ahead={ahead}: keep at least one batch ready")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"BatchWorker workers={workers!r}: use a positive number of worker processes")
        context = multiprocessing.get_context("spawn")  # no fork of a process running OpenMP threads
        self._start, self._queues, self._processes = start, [], []
        for k in range(workers):
            q = context.Queue(maxsize=ahead)
            args = (q, recipe.to_dict(), start + k, end, str(tokenizer_dir))
            args += (image_size, num_image_tokens, grid, counts, workers)
            name = f"kosmos2-batches-{k}"
            process = context.Process(target=_batch_worker, args=args, name=name, daemon=True)
            process.start()
            self._queues.append(q)
            self._processes.append(process)

    def get(self, step: int) -> Batch:
        import pickle
        import queue

        k = (step - self._start) % len(self._queues)
        source, process = self._queues[k], self._processes[k]
        while True:
            try:
                made, payload = source.get(timeout=5.0)
                break
            except queue.Empty:
                if not process.is_alive():
                    raise RuntimeError(
                        f"the batch worker stopped (exit code {process.exitcode}) before the batch of "
                        f"step {step}; run again without the worker (prefetch off) to see the error here"
                    ) from None
        if made is None:
            raise RuntimeError(f"the batch worker failed making the batch of step {step}:\n{payload}")
        if made != step:
            raise RuntimeError(f"the batch worker sent the batch of step {made}, expected step {step}")
        return pickle.loads(payload)

    def close(self) -> None:
        for process in self._processes:
            if process.is_alive():
                process.terminate()
        for process, q in zip(self._processes, self._queues, strict=True):
            process.join(timeout=10)
            q.close()
            q.cancel_join_thread()

    def __enter__(self) -> BatchWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BatchThread:
    """`make_batch` for the next step made in a background thread of this process while the model trains on
    this one. The same batches as without it (a batch is a pure function of (recipe, step)) and so the same
    weights. On the CPU it pays where a worker process did not: the batch's Pillow resizes, numpy and
    tokenizer calls release the GIL and fill the moments the trainer's OpenMP threads leave a core idle
    (Python between the model's operations, the optimizer's small ones), with nothing to pickle or copy
    between processes (benchmarks/batch_worker.py; docs/DEFAULT_MODEL.md). `get(step)` returns the
    batch of `step` and starts the next one; an error in the thread is raised there. Use as a context
    manager: on exit it waits for the batch in flight (at most one) and stops the thread."""

    def __init__(self, recipe: Recipe, end: int, tokenizer: Kosmos2Tokenizer, *batch_args: Any) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._make = lambda step: make_batch(recipe, step, tokenizer, *batch_args)
        self._end = end
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kosmos2-batch")
        self._pending: tuple[int, Any] | None = None

    def get(self, step: int) -> Batch:
        if self._pending is not None and self._pending[0] == step:
            batch = self._pending[1].result()
        else:  # the first step (or a step out of order): made here
            if self._pending is not None:
                self._pending[1].cancel()
            batch = self._make(step)
        nxt = step + 1
        self._pending = (nxt, self._pool.submit(self._make, nxt)) if nxt < self._end else None
        return batch

    def close(self) -> None:
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None
        self._pool.shutdown(wait=True)

    def __enter__(self) -> BatchThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _batch_worker(
    out: Any,
    recipe: dict[str, Any],
    start: int,
    end: int,
    tokenizer_dir: str,
    image_size: int,
    num_image_tokens: int,
    grid: int | None,
    counts: bool,
    every: int = 1,
) -> None:
    """BatchWorker's process: one torch thread (the trainer has the cores), the batches of steps start,
    start + every, ... before end pickled in step order.
    When its steps are made it waits for the trainer to stop it; it ends by itself when the trainer is gone
    (killed: nobody left to stop it, and nobody to read what is still in the pipe)."""
    import multiprocessing
    import pickle
    import queue
    import traceback

    import torch

    from kosmos2.tokenizer import Kosmos2Tokenizer

    trainer = multiprocessing.parent_process()

    def send(item: tuple[int | None, Any]) -> bool:
        while True:
            try:
                out.put(item, timeout=1.0)
                return True
            except queue.Full:
                if trainer is not None and not trainer.is_alive():
                    return False

    out.cancel_join_thread()  # at exit, do not wait to flush batches into a pipe that nobody reads
    torch.set_num_threads(1)
    step = start
    try:
        tokenizer = Kosmos2Tokenizer.from_pretrained(tokenizer_dir)
        run = Recipe.from_dict(recipe)
        for step in range(start, end, every):
            batch = make_batch(run, step, tokenizer, image_size, num_image_tokens, grid, counts=counts)
            if not send((step, pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))):
                return
    except Exception:
        send((None, f"step {step}: {traceback.format_exc()}"))
    if trainer is not None:
        trainer.join()  # the last batches are still in the pipe until the trainer reads them


def split_prefixes(rows: list[tuple]) -> tuple[Prefix, list[tuple]]:
    """The shared image prefix of each scene (everything up to `</image>`) and, from one row per sample
    (`make_batch`'s tuples), each sample's remaining tokens with the decoder positions they have in their own
    row (make_positions: 2 + index, no padding before them). `TextTransformer.forward_shared` then computes
    for every token what it computes in the sample's own row."""
    import torch

    prefixes: dict[int, tuple[list[int], list[int]]] = {}
    samples = []
    for ids, mask, targets, scene, task, _ in rows:
        P = max(t for t, m in enumerate(mask) if m) + 2  # the slots, then </image>
        first = prefixes.setdefault(scene, (ids[:P], mask[:P]))
        if ids[:P] != first[0] or any(t != -100 for t in targets[:P]) or any(mask[P:]):
            raise ValueError("share_prefix: a scene's samples must share the image prefix, unlearned")
        samples.append((ids[P:], mask[P:], targets[P:], scene, task, list(range(P + 2, len(ids) + 2))))
    scenes = sorted(prefixes)
    if scenes != list(range(len(scenes))) or len({len(p[0]) for p in prefixes.values()}) != 1:
        raise ValueError("share_prefix: every scene needs a sample, and all prefixes one length")
    prefix = Prefix(
        input_ids=torch.tensor([prefixes[s][0] for s in scenes], dtype=torch.long),
        image_mask=torch.tensor([prefixes[s][1] for s in scenes], dtype=torch.bool),
    )
    return prefix, samples


def compute_losses(
    model: Kosmos2,
    batch: Batch,
    *,
    bf16: bool = False,
    head: torch.nn.Linear | None = None,
    slot_weight: float = 1.0,
    pointer: torch.nn.ModuleDict | None = None,
    pointer_weight: float = 1.0,
    counter: torch.nn.Linear | None = None,
    count_weight: float = 1.0,
    count_layer: int = 2,
    group_weight: float = 1.0,
    decision_ids: Sequence[int] = (),
    decision_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The losses of one batch: "lm", the mean cross-entropy over all target tokens of the batch;
    "location", the same over its location tokens only (a diagnostic; chance is ln 1024 = 6.93); with a slot
    read-out `head` and `batch.slots`, "slots", the auxiliary slot loss (`slot_loss`, its "groups" terms
    times `group_weight`); with a `pointer` head (a shared prefix only), "pointer", the mean pointer loss per
    box (`pointer_loss`); with a `counter` and
    `batch.counts` (a shared prefix only), "counts", the count loss (`count_loss`) read at `</image>` after
    `count_layer` blocks; "loss", what training minimises: lm + slot_weight * slots + pointer_weight *
    pointer + count_weight * counts, where with `decision_weight` != 1 the lm term weighs the target tokens
    that follow one of `decision_ids` (input tokens) by `decision_weight` (the sum over the batch's target
    tokens, still divided by their number; "lm" itself stays the plain mean).

    The image encoder runs once per scene; each chunk's rows take their scene's embeddings.
    """
    import torch
    import torch.nn.functional as F

    from kosmos2.model import make_positions

    device = batch.pixel_values.device
    lm = torch.zeros((), device=device)
    weighted = decision_weight != 1 and len(decision_ids) > 0
    lm_weighted = torch.zeros((), device=device)
    if weighted:
        deciding = torch.tensor(list(decision_ids), dtype=torch.long, device=device)
    location = torch.zeros((), device=device)
    location_count = 0
    pointed = torch.zeros((), device=device)
    pointer_count = 0
    decoder = model.text_model
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        embeds = model.encode_image(batch.pixel_values)  # [S, Q, C]
        if batch.prefix is None:
            if pointer is not None or counter is not None:
                raise ValueError(
                    "the pointer and count losses need a shared prefix (Recipe.share_prefix=True)"
                )
            hidden = [
                decoder.model(
                    chunk.input_ids,
                    make_positions(chunk.input_ids, PAD_ID),
                    None,  # right padding: causal is enough
                    embeds[chunk.image_index],  # [R, Q, C]: a scene's rows share its embeddings
                    chunk.image_mask,
                )
                for chunk in batch.chunks
            ]
        else:
            prefix = batch.prefix
            shared, hidden, tapped = decoder.model.forward_shared(
                prefix.input_ids,
                embeds,
                prefix.image_mask,
                [(c.input_ids, c.positions, c.image_index) for c in batch.chunks],
                tap=count_layer if counter is not None else None,
                prefix_out=pointer is not None,  # the pointer loss reads the prefix's slot states
            )
            if pointer is not None:
                slot_states = shared[prefix.image_mask].view(*embeds.shape[:2], -1)  # [S, Q, C]
        for chunk, h in zip(batch.chunks, hidden, strict=True):
            if pointer is not None:
                grid = math.isqrt(embeds.shape[1])
                found = pointer_targets(chunk.input_ids, chunk.targets, batch.location_start, grid)
                pointed = pointed + pointer_loss(pointer, h, slot_states[chunk.image_index], *found)
                pointer_count += int(found[0].numel())
            learned = chunk.targets != -100
            targets = chunk.targets[learned]
            logits = decoder.lm_head(h[learned])  # the output head only where the loss is
            ce = F.cross_entropy(logits.float(), targets, reduction="none")
            lm = lm + ce.sum()
            if weighted:
                at = torch.isin(chunk.input_ids[learned], deciding)
                lm_weighted = lm_weighted + torch.where(at, ce * decision_weight, ce).sum()
            is_location = targets >= batch.location_start
            location = location + ce[is_location].detach().sum()
            location_count += int(is_location.sum())
    losses = {"lm": lm / max(batch.loss_tokens, 1)}
    losses["location"] = location / max(location_count, 1)
    losses["loss"] = lm_weighted / max(batch.loss_tokens, 1) if weighted else losses["lm"]
    if head is not None and batch.slots is not None:
        losses["slots"] = slot_loss(head, embeds, batch.slots, group_weight)
        losses["loss"] = losses["loss"] + slot_weight * losses["slots"]
    if pointer is not None:
        losses["pointer"] = pointed / max(pointer_count, 1)
        losses["loss"] = losses["loss"] + pointer_weight * losses["pointer"]
    if counter is not None and batch.counts is not None:
        losses["counts"] = count_loss(counter, tapped[:, -1], batch.counts)  # </image> ends the prefix
        losses["loss"] = losses["loss"] + count_weight * losses["counts"]
    return losses


def compute_loss(model: Kosmos2, batch: Batch, bf16: bool = False) -> torch.Tensor:
    """Mean cross-entropy over all target tokens of the batch (`compute_losses`' language-model loss)."""
    return compute_losses(model, batch, bf16=bf16)["lm"]


# ------------------------------------------------------------------------------------------------------------
# Optimizer and schedule


class Optimizers:
    """The run's optimizers (AdamW, or AdamW and Muon over disjoint parameters), stepped as one.

    The LR schedule is set on every parameter group before each step: lr = peak (the group's
    "initial_lr") × `lr_factor(step)`, the floats `torch.optim.lr_scheduler.LambdaLR` would set.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def set_lr(self, factor: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self) -> list[dict[str, Any]]:
        return [optimizer.state_dict() for optimizer in self.optimizers]

    def load_state_dict(self, states: Sequence[dict[str, Any]]) -> None:
        if len(states) != len(self.optimizers):
            raise ValueError(
                f"the checkpoint holds {len(states)} optimizer states, this run has {len(self.optimizers)}"
            )
        for optimizer, state in zip(self.optimizers, states, strict=True):
            optimizer.load_state_dict(state)


def muon_parameter(name: str, parameter: torch.Tensor) -> bool:
    """Whether Recipe.optimizer="muon" trains this model parameter with Muon: the 2-D weights of the
    transformer layers (ViT, decoder) and of the connector, not embeddings or latent queries."""
    inside = ".layers." in name or name.startswith("image_to_text_projection.")
    return parameter.dim() == 2 and inside and "latent_query" not in name


def make_optimizer(model: Kosmos2, recipe: Recipe, head: torch.nn.Module | None = None) -> Optimizers:
    """AdamW with weight decay on matrices (linear, embedding, latent queries), none on biases and norms;
    over the model's parameters and those of `head` (the training-only read-outs), if any. With
    recipe.optimizer "muon", the layers' 2-D weights (`muon_parameter`) go to Muon instead: torch.optim.Muon's
    algorithm and floats, its orthogonalisation batched per matrix shape (kosmos2.muon.StackedMuon)."""
    import itertools

    import torch

    from kosmos2.muon import StackedMuon

    decay, no_decay, muon = [], [], []
    named = itertools.chain(model.named_parameters(), head.named_parameters(prefix="head") if head else ())
    for name, p in named:
        if recipe.optimizer == "muon" and muon_parameter(name, p):
            muon.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizers = [torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.betas, eps=recipe.eps)]
    if muon:
        optimizers.append(
            StackedMuon(
                muon,
                lr=recipe.muon_lr,
                weight_decay=recipe.weight_decay,
                momentum=recipe.muon_momentum,
                adjust_lr_fn="match_rms_adamw",
            )
        )
    return Optimizers(optimizers)


def group_weight_at(step: int, recipe: Recipe) -> float:
    """The "groups" read-out's group-size and place weight at `step` (0-based): `group_loss_weight`, or
    with `group_loss_weight_final` set, linear from the one at step 0 to the other at the last step."""
    start, final = recipe.group_loss_weight, recipe.group_loss_weight_final
    if final is None:
        return start
    progress = min(step / max(recipe.steps - 1, 1), 1.0)
    return start + (final - start) * progress


def lr_factor(step: int, recipe: Recipe) -> float:
    """LR multiplier at `step`: linear warm-up from 1/warmup to 1, then cosine to `final_lr_fraction`."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    span = max(recipe.steps - recipe.warmup_steps, 1)
    progress = min((step - recipe.warmup_steps) / span, 1.0)
    floor = recipe.final_lr_fraction
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename over it: a reader (or a run killed
    mid-write) sees either the previous checkpoint or the new one, never a partial file."""
    import torch

    from kosmos2.fileio import atomic_write

    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"{path}: not a readable training checkpoint ({reason}); delete it to start over"
        ) from e
    if not isinstance(state, dict) or "format" not in state:
        raise ValueError(f"{path}: not a kosmos2 training checkpoint (format {CHECKPOINT_FORMAT})")
    if state["format"] != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path}: a training checkpoint of format {state['format']}, this kosmos2 reads format "
            f"{CHECKPOINT_FORMAT} (the optimizer state changed); start the run again in a new --out folder"
        )
    return state


@contextlib.contextmanager
def _flush_denormals(enabled: bool) -> Iterator[None]:
    """Flush denormal floats to zero while training on the CPU: trained attention is sharp, its softmax
    underflows into denormals, and x86 cores compute on them many times slower. Deterministic, so a resumed
    run still matches an uninterrupted one."""
    import torch

    on = enabled and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on:
            torch.set_flush_denormal(False)


def _rng_state() -> dict[str, Any]:
    import torch

    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ------------------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A one-line progress bar on a terminal (a plain line every `every` steps otherwise): step, loss,
    tokens/s and the estimated time left."""

    def __init__(self, total: int, start: int, stream: TextIO | None = None, every: int = 50):
        self.total, self.start, self.every = total, start, every
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.monotonic()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        done = step + 1
        if not self.tty and done % self.every and done != self.total:
            return
        rate = (done - self.start) / max(time.monotonic() - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        width = 24
        filled = int(width * done / self.total)
        bar = "#" * filled + "." * (width - filled)
        line = (
            f"step {done}/{self.total} [{bar}] loss {loss:.4f} "
            f"{tokens_per_s / 1000:.1f}k tok/s ETA {_clock(eta)}"
        )
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


# ------------------------------------------------------------------------------------------------------------
# The loop


def train(
    recipe: Recipe,
    out_dir: str | os.PathLike[str],
    *,
    stop_after: int | None = None,
    progress: bool = True,
    progress_stream: TextIO | None = None,
    device: torch.device | str = "cpu",
    prefetch: bool | int | str = False,
) -> Path:
    """Run (or resume) `recipe` in `out_dir`; return the folder of the exported model (`out_dir/model`).

    A folder holding a checkpoint resumes from it; its recipe.json must equal `recipe`. `stop_after`: stop
    (with a checkpoint) once that many steps are done, without exporting, as if the run had been killed
    after a checkpoint. The model is exported when the last step is done.

    `device`: where the model trains (batches are made on the CPU and moved). The model is built and
    initialised on the CPU, so every device starts from the same weights; the floats of later steps differ
    between devices (other kernels), and the shipped model is the CPU run's.

    `prefetch`: make the next batches while the model trains on this one; the same batches and the same
    weights. "thread": the next one in a background thread (`BatchThread`), which on the 2-core CPU made a
    step ~6 % cheaper (docs/DEFAULT_MODEL.md), so `kosmos2 train` uses it for a CPU run. True or a
    number: in that many worker processes (`BatchWorker(workers=...)`; True is one, False and 0 none), for a
    GPU `device`, which would otherwise wait for the CPU's ~0.1 s a batch, or train faster than one core
    makes batches; on the 2-core CPU, whose cores the model keeps busy, worker processes did not pay.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: this torch build sees no CUDA device; use --device cpu")

    from kosmos2.grounding import OBJECT_END, PHRASE_START
    from kosmos2.tokenizer import Kosmos2Tokenizer

    recipe.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe_path, checkpoint_path = out / RECIPE_FILE, out / CHECKPOINT_FILE
    if recipe_path.exists():
        saved = json.loads(recipe_path.read_text(encoding="utf-8"))
        # fields added to Recipe since the run began read as their defaults; a file that is not a recipe of
        # this version stays as it is, and the comparison below names the fields that differ
        with contextlib.suppress(TypeError, ValueError):
            saved = Recipe.from_dict(saved).to_dict()
        wanted = recipe.to_dict()
        if saved != wanted:
            changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            raise ValueError(
                f"{out} holds a run of another recipe (differs in {changed}); choose a new --out folder "
                "or delete this one to start over"
            )
    else:
        recipe_path.write_text(json.dumps(recipe.to_dict(), indent=2) + "\n", encoding="utf-8")

    tokenizer_dir = out / TOKENIZER_DIR
    if (tokenizer_dir / "tokenizer.json").exists():
        tokenizer = Kosmos2Tokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = build_tokenizer(recipe, tokenizer_dir)
    model = build_model(recipe, tokenizer)
    head = build_slot_head(recipe, model)
    pointer = build_pointer_head(recipe, model)
    counter = build_count_head(recipe, model)
    heads = torch.nn.ModuleList([m for m in (head, pointer, counter) if m is not None])
    model.to(device)
    heads.to(device)
    optimizer = make_optimizer(model, recipe, heads)

    # the moving average of the weights (Recipe.ema_decay): float tensors of the state dict, float32
    ema = None
    if recipe.ema_decay > 0:
        ema = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    step, elapsed, tokens_seen = 0, 0.0, 0
    if checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        model.load_state_dict(state["model"])
        if head is not None:
            head.load_state_dict(state["slot_head"])
        if pointer is not None:
            pointer.load_state_dict(state["pointer_head"])
        if counter is not None:
            counter.load_state_dict(state["count_head"])
        if ema is not None:
            ema = {k: v.to(device) for k, v in state["ema"].items()}
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        step, elapsed, tokens_seen = state["step"], state["elapsed"], state["tokens"]
    else:
        torch.manual_seed(recipe.seed + 1)  # dropout's stream, independent of the initialisation's

    config = model.config
    image_size, num_image_tokens = config.vision.image_size, config.latent_query_num
    end = recipe.steps if stop_after is None else min(recipe.steps, stop_after)
    bar = Progress(recipe.steps, step, progress_stream) if progress and step < end else None
    params = list(model.parameters()) + list(heads.parameters())
    grid = patch_grid(config) if head is not None else None
    decision_ids = [tokenizer.token_to_id(t) for t in (PHRASE_START, OBJECT_END)]
    model.train()
    batch_args = (image_size, num_image_tokens, grid, counter is not None)  # after make_batch's tokenizer
    worker: Any = contextlib.nullcontext()
    if prefetch == "thread" and step < end:
        worker = BatchThread(recipe, end, tokenizer, *batch_args)
    elif prefetch and step < end:
        worker = BatchWorker(recipe, step, end, tokenizer_dir, *batch_args, workers=int(prefetch))
    with worker, _flush_denormals(device.type == "cpu"), open(out / LOG_FILE, "a", encoding="utf-8") as log:
        while step < end:
            t0 = time.monotonic()
            batch = worker.get(step) if prefetch else make_batch(recipe, step, tokenizer, *batch_args)
            if device.type != "cpu":
                batch = batch.to(device)
            group_weight = group_weight_at(step, recipe)
            losses = compute_losses(
                model,
                batch,
                bf16=recipe.bf16,
                head=head,
                slot_weight=recipe.slot_loss_weight,
                pointer=pointer,
                pointer_weight=recipe.pointer_loss_weight,
                counter=counter,
                count_weight=recipe.count_loss_weight,
                count_layer=recipe.count_layer,
                group_weight=group_weight,
                decision_ids=decision_ids,
                decision_weight=recipe.decision_weight,
            )
            loss = losses["loss"]
            optimizer.zero_grad()
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip))
            optimizer.set_lr(lr_factor(step, recipe))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            if ema is not None:
                update_ema(ema, model, min(recipe.ema_decay, (1 + step) / (10 + step)))
            step += 1
            dt = time.monotonic() - t0
            elapsed += dt
            tokens = batch.tokens
            tokens_seen += tokens
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"step {step}: the loss is {loss_value}; lower the recipe's lr")
            if step % recipe.log_every == 0 or step == end:
                record = {
                    "step": step,
                    "loss": round(loss_value, 5),
                    **{f"loss_{k}": round(float(v.detach()), 5) for k, v in losses.items() if k != "loss"},
                    "lr": lr,
                    "grad_norm": round(grad_norm, 4),
                    "rows": len(batch.tasks),
                    "tokens": tokens,
                    "tokens_per_s": round(tokens / dt, 1),
                    "elapsed_s": round(elapsed, 2),
                }
                if recipe.group_loss_weight_final is not None:
                    record["group_weight"] = round(group_weight, 5)
                log.write(json.dumps(record) + "\n")
                log.flush()
            if bar is not None:
                bar.update(step - 1, loss_value, tokens / dt)
            if step % recipe.checkpoint_every == 0 or step == end:
                state = {
                    "format": CHECKPOINT_FORMAT,
                    "step": step,
                    "elapsed": elapsed,
                    "tokens": tokens_seen,
                    "recipe": recipe.to_dict(),
                    "model": model.state_dict(),
                    "slot_head": head.state_dict() if head is not None else None,
                    "pointer_head": pointer.state_dict() if pointer is not None else None,
                    "count_head": counter.state_dict() if counter is not None else None,
                    "ema": ema,
                    "optimizer": optimizer.state_dict(),
                    "rng": _rng_state(),
                }
                save_checkpoint(checkpoint_path, state)
    model_dir = out / MODEL_DIR
    if step >= recipe.steps:
        if ema is not None:  # the checkpoint keeps the last step's weights; the export is the average
            model.load_state_dict(ema, strict=False)
        export(model, tokenizer, model_dir, recipe.export_dtype)
    return model_dir


def update_ema(ema: dict[str, torch.Tensor], model: Kosmos2, decay: float) -> None:
    """ema += (1 - decay) * (weights - ema), for every float tensor of the model's state dict."""
    import torch

    with torch.no_grad():
        state = model.state_dict()
        for name, average in ema.items():
            average.lerp_(state[name].float(), 1 - decay)


def export(
    model: Kosmos2, tokenizer: Kosmos2Tokenizer, directory: str | os.PathLike[str], dtype: str
) -> Path:
    """Write `model` and `tokenizer` as a Hugging Face layout checkpoint (weights in `dtype`), with decoding
    settings that suit the world's text (GENERATION_SETTINGS) and a CLIP preprocessor config."""
    import copy

    import torch

    from kosmos2.checkpoint import GENERATION_CONFIG, save_pretrained
    from kosmos2.image import CLIP_MEAN, CLIP_STD

    directory = Path(directory)
    copy_ = copy.deepcopy(model).to("cpu", getattr(torch, dtype)).eval()
    save_pretrained(copy_, directory)
    tokenizer.save_pretrained(directory)
    generation = {**GENERATION_CONFIG, **GENERATION_SETTINGS}
    (directory / "generation_config.json").write_text(
        json.dumps(generation, indent=2) + "\n", encoding="utf-8"
    )
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


# ------------------------------------------------------------------------------------------------------------
# Measuring a model on the world


def _entity_matches(predicted: Sequence[tuple[str, Sequence]], truth: Sequence[tuple[str, Sequence]]) -> int:
    """Entities of `predicted` that match a distinct entity of `truth`: same phrase, same number of boxes,
    and a one-to-one pairing of the boxes with IoU >= 0.5 (greedy by IoU, which is exact here: the world's
    boxes of one phrase barely overlap)."""
    from kosmos2.grounding import iou

    used = [False] * len(truth)
    matched = 0
    for phrase, boxes in predicted:
        for j, (true_phrase, true_boxes) in enumerate(truth):
            if used[j] or phrase != true_phrase or len(boxes) != len(true_boxes):
                continue
            pairs = sorted(
                ((iou(p, t), a, b) for a, p in enumerate(boxes) for b, t in enumerate(true_boxes)),
                reverse=True,
            )
            taken_p, taken_t, good = set(), set(), 0
            for value, a, b in pairs:
                if a in taken_p or b in taken_t:
                    continue
                taken_p.add(a)
                taken_t.add(b)
                good += value >= 0.5
            if good == len(true_boxes):
                used[j] = True
                matched += 1
                break
    return matched


def score_sample(sample: Mapping[str, Any], text: str) -> dict[str, float]:
    """Scores of one generated continuation `text` (markup kept) for a world sample.

    rec / phrase_grounding: acc (the first generated box has IoU >= 0.5 with a true box); grounded_caption:
    matched, predicted, true entity counts; reg, vqa, grounded_vqa, caption: exact (the answer equals the
    reference after stripping).
    """
    from kosmos2 import grounding

    task = sample["task"]
    if task in ("rec", "phrase_grounding"):
        boxes = [b for e in grounding.parse(text).entities for b in e.boxes]
        if not boxes:  # an <object> right after the prompt's phrase has no phrase of its own in the text
            boxes = [b for e in grounding.parse(sample["prompt"] + text).entities for b in e.boxes]
        ok = bool(boxes) and max(grounding.iou(boxes[0], t) for t in sample["boxes"]) >= 0.5
        return {"acc": float(ok)}
    if task == "grounded_caption":
        parsed = grounding.parse(sample["prompt"] + text)
        predicted = [(e.phrase.strip(), e.boxes) for e in parsed.entities]
        truth = [(phrase.strip(), boxes) for phrase, boxes in sample["entities"]]
        return {"matched": _entity_matches(predicted, truth), "predicted": len(predicted), "true": len(truth)}
    answer = grounding.parse(text).caption.strip()
    reference = sample["answer"]
    if task == "caption":
        answer = grounding.parse(sample["prompt"] + text).caption.strip()
    return {"exact": float(answer == reference.strip())}


def summarize(task: str, scores: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Task metrics from `score_sample` results: accuracy, or entity precision / recall for captions."""
    n = len(scores)
    if task == "grounded_caption":
        matched = sum(s["matched"] for s in scores)
        predicted = sum(s["predicted"] for s in scores)
        true = sum(s["true"] for s in scores)
        return {
            "precision": matched / predicted if predicted else 0.0,
            "recall": matched / true if true else 0.0,
            "n": n,
        }
    key = "acc" if task in ("rec", "phrase_grounding") else "exact"
    return {"accuracy": sum(s[key] for s in scores) / n if n else 0.0, "n": n}


def measure_world(
    predictor: Predictor,
    split: str = "test",
    n_per_task: int = 1000,
    tasks: Iterable[str] = ("rec", "grounded_caption", "reg", "vqa"),
    seed: int | None = None,
    batch_size: int = 64,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Score `predictor` on the world's fixed evaluation set of `split` (`synthetic.make_eval_set`).

    Images are rendered at their native size; decoding is greedy with the model's settings. Returns
    {task: {"accuracy": …, "n": …}} (REC and phrase grounding: Acc@0.5 of the first box; REG, VQA, captions:
    exact match) and for grounded captions {"precision": …, "recall": …} over entities (phrase and every box,
    IoU >= 0.5). on_batch(done, total) is called after each batch.
    """
    from kosmos2.data import synthetic

    tasks = list(tasks)
    samples = synthetic.make_eval_set(split, n_per_task, tasks=tasks, seed=seed)
    scores: dict[str, list[dict[str, float]]] = {t: [] for t in tasks}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images = [synthetic.render(s["scene"]) for s in chunk]
        results = predictor.ground(images, [s["prompt"] for s in chunk], **GENERATION_SETTINGS)
        for sample, result in zip(chunk, results, strict=True):
            scores[sample["task"]].append(score_sample(sample, result.text))
        if on_batch is not None:
            on_batch(min(start + batch_size, len(samples)), len(samples))
    return {task: summarize(task, s) for task, s in scores.items()}


def format_quality(split: str, results: Mapping[str, Mapping[str, float]]) -> str:
    parts = []
    for task, r in results.items():
        if "precision" in r:
            parts.append(f"{task} P {r['precision']:.3f} R {r['recall']:.3f}")
        else:
            parts.append(f"{task} {r['accuracy']:.3f}")
    return f"{split}: " + ", ".join(parts)


# ------------------------------------------------------------------------------------------------------------
# Command line


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`--set FIELD=VALUE` items as recipe overrides: VALUE parsed as JSON where it is JSON, else a string
    (`get_recipe` checks each against its field's type)."""
    overrides: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set {item!r}: write FIELD=VALUE, e.g. --set optimizer=muon")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        overrides[name.strip()] = value
    return overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `kosmos2 train` to the top-level parser."""
    p = subparsers.add_parser(
        "train",
        help="train a Kosmos-2 on the synthetic world (reproduces the built-in default model)",
        description="Train from scratch on the synthetic world. A folder with a checkpoint resumes where it "
        "stopped. The final model goes to OUT/model (Hugging Face layout).",
    )
    p.add_argument("--recipe", default="default", choices=sorted(RECIPES), help="(default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/default"), help="run folder (default: %(default)s)")
    p.add_argument("--steps", type=int, help="override the recipe's number of steps")
    p.add_argument("--seed", type=int, help="override the recipe's seed")
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
        help="override any recipe field, e.g. --set optimizer=muon --set lr=2e-3; VALUE is read as JSON "
        "(numbers, true/false, {\"rec\": 1.0}), else as a string; repeatable",
    )  # fmt: skip
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    p.add_argument(
        "--device", default="cpu",
        help="torch device to train on, e.g. cuda (default: %(default)s; the shipped model is a CPU run)",
    )  # fmt: skip
    p.add_argument(
        "--eval-per-task", type=int, default=200,
        help="after training, score the model on this many held-out queries per task (0: skip)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--prefetch", choices=("auto", "on", "thread", "off"), default="auto",
        help="make the next batches while the model trains (the same batches and weights either way): on: in "
        "worker processes, thread: the next one in a background thread of the trainer; auto: on for a GPU "
        "--device, where the CPU's batch would otherwise leave the GPU waiting, thread on the CPU, whose "
        "cores the model keeps busy but for moments the thread fills (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--prefetch-workers", type=int, default=1, metavar="N",
        help="with prefetch on, this many worker processes make batches (default: %(default)s)",
    )  # fmt: skip
    p.set_defaults(func=run_train)


def use_huge_pages() -> bool:
    """Ask torch to put its big CPU tensors on transparent huge pages (`THP_MEM_ALLOC_ENABLE=1`: on Linux,
    tensors of 2 MB and more are allocated on 2 MB boundaries and advised to use huge pages) unless the
    environment already says. The same floats; on the 2-core development CPU the default recipe's first 60
    steps run 5 % faster (benchmarks/huge_pages.py) and the gap grows as a run's heap fragments: ~13 % from
    step 500 on (docs/DEFAULT_MODEL.md). torch reads the variable once, at its first tensor, so this works
    only before torch is imported; returns whether it was set here."""
    if "torch" in sys.modules or "THP_MEM_ALLOC_ENABLE" in os.environ:
        return False
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    return True


def run_train(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    try:
        overrides.update(parse_overrides(args.overrides))
        recipe = get_recipe(args.recipe, **overrides)
    except ValueError as e:
        print(f"kosmos2 train: error: {e}", file=sys.stderr)
        return 2
    use_huge_pages()
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        print(f"kosmos2 train: error: --device {args.device!r}: {e}", file=sys.stderr)
        return 2
    if args.prefetch_workers < 1:
        message = f"--prefetch-workers {args.prefetch_workers}: use 1 or more worker processes"
        print(f"kosmos2 train: error: {message}", file=sys.stderr)
        return 2
    on = args.prefetch == "on" or (args.prefetch == "auto" and device.type != "cpu")
    thread = args.prefetch == "thread" or (args.prefetch == "auto" and device.type == "cpu")
    # the number of batch worker processes (0: none), or the trainer's own batch thread
    prefetch: int | str = args.prefetch_workers if on else "thread" if thread else 0
    try:
        model_dir = train(recipe, args.out, progress=not args.no_progress, device=device, prefetch=prefetch)
    except ValueError as e:
        print(f"kosmos2 train: error: {e}", file=sys.stderr)
        return 2
    print(f"model: {model_dir}")
    if args.eval_per_task > 0:
        from kosmos2.predictor import Predictor

        predictor = Predictor.from_pretrained(model_dir, device=args.device)
        for split in ("test", "compositional"):
            tasks = ("rec", "grounded_caption", "reg", "vqa") if split == "test" else ("rec",)
            print(format_quality(split, measure_world(predictor, split, args.eval_per_task, tasks)))
    return 0
