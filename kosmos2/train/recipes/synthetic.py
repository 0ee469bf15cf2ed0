"""The synthetic world's recipe: train a small Kosmos-2 from scratch on kosmos2/data/synthetic.py.

This is how the built-in default model (kosmos2/assets/default) is made: `kosmos2 train --recipe default`
reproduces it, bit for bit on the same machine and torch build.

    Recipe ─► tokenizer (BPE on the world's text, Kosmos-2 layout; OUT/tokenizer)
           ─► model: the config preset with that vocabulary, fresh weights (synthetic_init: unit-gain layers,
              slot i looking at patch i, a centred connector, coded location tokens) + the slot read-out
              (slots.py; training only)
           ─► TrainTask(model, SyntheticBatches, compute_losses, heads=slot read-out) ─► loop.fit
           ─► OUT/model (Hugging Face layout, the world's decoding settings)

A batch is a pure function of (seed, step) (synthetic_batches.py), so a killed run resumes from its last
checkpoint to the same weights an uninterrupted one ends with. The loss is the next-token loss on each
sample's target (SPEC §3's mask with the prompt unlearned), plus the slot read-out's loss; with
`share_prefix` the decoder runs each scene's image prefix once for its samples (shared_prefix.py).
`world_scores` scores a model on the world's held-out sets with the one scorer, kosmos2/eval/synthetic.py.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch

from kosmos2.eval.synthetic import GENERATION
from kosmos2.predictor import TASKS_KEY
from kosmos2.train import distributed
from kosmos2.train.config import TrainConfig, with_overrides
from kosmos2.train.loop import TrainTask, fit
from kosmos2.train.loss import next_token_loss
from kosmos2.train.recipes.shared_prefix import forward_shared
from kosmos2.train.recipes.slots import build_slot_head, patch_grid, slot_loss
from kosmos2.train.recipes.synthetic_batches import PAD_ID, Batch, SyntheticBatches
from kosmos2.train.recipes.synthetic_init import center_connector, init_locations, init_patches, init_scaled

if TYPE_CHECKING:
    from kosmos2.model import Kosmos2
    from kosmos2.tokenizer import Kosmos2Tokenizer

TOKENIZER_DIR = "tokenizer"


def generation_settings(recipe: Recipe) -> dict[str, Any]:
    """The exported generation_config.json's settings: the world's decoding, and the tasks the model was
    trained on (predictor.TASKS_KEY, in the world's order), which the predictor and the CLI check prompts
    against."""
    from kosmos2.data.synthetic import ALL_TASKS

    # the world's decoding where it departs from the official settings (greedy, length penalty 1.0 are theirs)
    decoding = {k: GENERATION[k] for k in ("max_new_tokens", "no_repeat_ngram_size")}
    # absent / ambiguous REC queries (QUERY_TASKS) follow the seven tasks when trained on: the predictor
    # reads the model's own "not found" and "another box" from them (docs/TRUST.md)
    return {**decoding, TASKS_KEY: [t for t in ALL_TASKS if recipe.mixture.get(t, 0) > 0]}


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


@dataclass
class Recipe(TrainConfig):
    """The loop's settings (TrainConfig) and the world's: the same recipe gives the same weights.

    A step is `scenes_per_step` scenes × `samples_per_scene` task samples drawn from `mixture` (the world's
    tasks, and its absent / ambiguous REC queries `rec_absent`, `rec_ambiguous`). With `init_from` the run
    continues a trained model (its folder's weights, config and tokenizer) instead of building a fresh one.
    """

    bf16: bool = True
    preset: str = "small"  # kosmos2.config preset; the vocabulary size comes from the trained tokenizer
    vision_layers: int = 0  # the ViT's depth; 0 = the preset's
    text_layers: int = 0  # the decoder's depth; 0 = the preset's
    scenes_per_step: int = 16
    samples_per_scene: int = 4
    mixture: dict[str, float] = field(default_factory=_default_mixture)
    # weights of the plain VQA question kinds (synthetic.VQA_KINDS; a kind not named weighs 1), e.g.
    # {"count": 2.5}; empty: each kind alike
    vqa_kinds: dict[str, float] = field(default_factory=dict)
    # chance that a new object of a train scene copies an earlier one's attributes (groups of identical
    # objects: counting); None: the world's synthetic.P_COPY (0.25), which the held-out sets always use
    p_copy: float | None = None
    tokenizer_vocab_size: int = 256  # base BPE vocabulary (fairseq specials + pieces); 1036 tags follow
    tokenizer_corpus_lines: int = 20000
    # run each scene's image prefix (<s><image> slots </image>) once; all its samples attend to its keys
    # and values, each keeping its own positions (shared_prefix.py). The same loss as one row per sample
    # for ~half the decoder tokens
    share_prefix: bool = False
    # weight of the slot read-out's loss (slots.py; training only, not exported); 0 = no read-out
    slot_loss_weight: float = 1.0
    # with eval_every: held-out test queries per task scored during training (`world_metrics`)
    eval_queries: int = 50
    # a model folder (Hugging Face layout, e.g. kosmos2/assets/default) to continue from: its tokenizer and
    # config replace the recipe's (preset, layers and tokenizer fields are then unused) and its weights the
    # fresh initialisation; "" = build the tokenizer and the model from scratch
    init_from: str = ""

    def validate(self) -> Recipe:
        from kosmos2.config import PRESETS
        from kosmos2.data.synthetic import ALL_TASKS, check_p_copy, check_vqa_kinds

        try:
            super().validate()
        except ValueError as e:
            raise ValueError(f"recipe {e}") from None
        if self.preset not in PRESETS:
            raise ValueError(f"recipe preset {self.preset!r} is not one of {sorted(PRESETS)}")
        for name in ("scenes_per_step", "samples_per_scene", "eval_queries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"recipe {name} must be a positive int, got {value!r}")
        if not self.mixture or any(t not in ALL_TASKS for t in self.mixture):
            raise ValueError(f"recipe mixture {self.mixture} must name tasks of {ALL_TASKS}")
        if any(not w >= 0 for w in self.mixture.values()) or sum(self.mixture.values()) <= 0:
            raise ValueError(f"recipe mixture {self.mixture} needs weights >= 0 with a positive sum")
        try:
            check_vqa_kinds(self.vqa_kinds)
            check_p_copy(self.p_copy)
        except ValueError as e:
            raise ValueError(f"recipe {e}") from None
        if not self.slot_loss_weight >= 0:
            raise ValueError(f"recipe slot_loss_weight must be >= 0, got {self.slot_loss_weight}")
        for name in ("vision_layers", "text_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"recipe {name} must be an int >= 0 (0: the preset's), got {value!r}")
        if self.init_from:
            folder = Path(self.init_from)
            missing = [n for n in ("config.json", "tokenizer.json") if not (folder / n).is_file()]
            if missing:
                raise ValueError(
                    f"recipe init_from {self.init_from!r} is not a model folder (no {', '.join(missing)}); "
                    "give a folder written by `kosmos2 train` or Predictor.save_pretrained, e.g. "
                    "kosmos2/assets/default"
                )
        return self


RECIPES: dict[str, Callable[[], Recipe]] = {
    # the built-in default model: preset "small-128" (128 px images in 16 px patches), ~56 minutes on 2
    # CPU cores (3,100 steps of ~1.07 s; each step 32 scenes x 4 samples behind a shared image prefix: new
    # scenes teach more than more samples of a scene), Muon on the layers' matrices, the slot read-out
    # (with how many objects are identical to each slot's, and the word that tells them apart: the
    # counting the captions, REG and VQA need), the exported weights a moving average, the mixture shifted
    # towards plain VQA, plain VQA's count questions weighted 3 (docs/DEFAULT_MODEL.md)
    "default": lambda: Recipe(
        preset="small-128",
        steps=3100,
        scenes_per_step=32,
        samples_per_scene=4,
        share_prefix=True,
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
    # the default model continued on absent and ambiguous REC queries (issue 33, docs/TRUST.md): what the
    # default recipe exports, then a short run of its mixture with `rec_absent` ("the green triangle"
    # where there is none: `</s>` after the phrase) and `rec_ambiguous` (both boxes of "the red circle"
    # where two fit) at 0.15 each, the other tasks scaled to keep their shares among themselves; the image
    # encoder and connector frozen (what the decoder reads stays as trained; a cheaper step), the slot
    # read-out off (it trains the ViT), a fifth of the default's peak learning rates with a short warm-up,
    # the moving average shorter (0.98); the scenes of seed 1, not the ones the default run saw. Tried, not
    # shipped: in 120 steps it cost REC 18 points and caption recall a point (docs/TRUST.md)
    "trust": lambda: Recipe(
        init_from=str(Path(__file__).parents[2] / "assets" / "default"),
        steps=120,
        seed=1,
        scenes_per_step=16,
        samples_per_scene=4,
        share_prefix=True,
        optimizer="muon",
        lr=2e-4,
        muon_lr=1e-3,
        warmup_steps=10,
        ema_decay=0.98,
        freeze=("vision_model", "image_to_text_projection"),
        slot_loss_weight=0.0,
        vqa_kinds={"count": 3},
        mixture={
            "grounded_caption": 0.14,
            "caption": 0.021,
            "rec": 0.14,
            "phrase_grounding": 0.049,
            "reg": 0.105,
            "grounded_vqa": 0.035,
            "vqa": 0.21,
            "rec_absent": 0.15,
            "rec_ambiguous": 0.15,
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
    try:
        return with_overrides(RECIPES[name](), **overrides)
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith("recipe ") else f"recipe {message}") from None


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


def build_model(recipe: Recipe, tokenizer: Kosmos2Tokenizer) -> Kosmos2:
    """Fresh weights for the recipe's config, seeded by the recipe's seed (synthetic_init.py)."""
    from kosmos2.model import Kosmos2

    torch.manual_seed(recipe.seed)
    model = Kosmos2(model_config(recipe, tokenizer))
    init_scaled(model)
    init_patches(model)
    center_connector(model, recipe.seed, recipe.p_copy)
    init_locations(model, tokenizer)
    return model


def load_init(directory: str | os.PathLike[str]) -> Kosmos2:
    """The model of a trained folder (`Recipe.init_from`), in float32 and train mode, to continue training
    (a bfloat16 export is widened exactly; the optimizer and the moving average start afresh from it)."""
    from kosmos2.checkpoint import load_pretrained

    return load_pretrained(directory, dtype=torch.float32).train()


# ------------------------------------------------------------------------------------------------------------
# The loss


def compute_losses(
    model: Kosmos2, batch: Batch, head: torch.nn.Linear | None = None, slot_weight: float = 1.0
) -> dict[str, torch.Tensor]:
    """The losses of one batch: "lm", the mean cross-entropy over all target tokens of the batch;
    "location", the same over its location tokens only (a diagnostic; chance is ln 1024 = 6.93); with a slot
    read-out `head` and `batch.slots`, "slots", its loss (slots.slot_loss, in float32); "loss", what
    training minimises: lm + slot_weight * slots.

    The image encoder runs once per scene; each chunk's rows take their scene's embeddings, or with a
    shared prefix attend to their scene's prefix (shared_prefix.forward_shared). Runs under the loop's
    autocast (bf16 when the recipe asks).
    """
    from kosmos2.model import make_positions

    device = batch.pixel_values.device
    lm = torch.zeros((), device=device)
    location = torch.zeros((), device=device)
    location_count = 0
    decoder = model.text_model
    embeds = model.encode_image(batch.pixel_values)  # [S, Q, C]
    if batch.prefix is None:
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
        samples = [(c.input_ids, c.positions, c.image_index) for c in batch.chunks]
        _, hidden = forward_shared(
            decoder.model, prefix.input_ids, embeds, prefix.image_mask, samples, prefix_out=False
        )
    for chunk, h in zip(batch.chunks, hidden, strict=True):
        part = next_token_loss(decoder.lm_head, h, chunk.targets, batch.location_start)
        lm = lm + part.total
        location = location + part.location_total
        location_count += part.location_tokens
    losses = {"lm": lm / max(batch.loss_tokens, 1)}
    losses["location"] = location / max(location_count, 1)
    losses["loss"] = losses["lm"]
    if head is not None and batch.slots is not None:
        with torch.autocast(device.type, enabled=False):  # the read-out in float32
            losses["slots"] = slot_loss(head, embeds, batch.slots)
        losses["loss"] = losses["loss"] + slot_weight * losses["slots"]
    return losses


# ------------------------------------------------------------------------------------------------------------
# A run


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
    """Run (or resume) `recipe` in `out_dir` (loop.fit: same arguments); return OUT/model.

    The model is built and initialised on the CPU, so every device starts from the same weights; the floats
    of later steps differ between devices (other kernels), and the shipped model is the CPU run's. Under
    torchrun each process trains on its part of every step's scenes (rank 0 trains the tokenizer and writes
    the files); the language-model loss is then exactly the step's mean over all its target tokens, while the
    slot read-out's loss, a mean over each part's slots, enters weighted by the part's target tokens (close
    to, not exactly, the one-process value). With `eval_every` the model is scored on `eval_queries` test
    queries per task every so many steps (`world_metrics`: "rec", "grounded_caption_p",
    "grounded_caption_r", "reg", "vqa"), and `best_metric` keeps the best in OUT/best.
    """
    from kosmos2.tokenizer import Kosmos2Tokenizer
    from kosmos2.train.export import export

    recipe.validate()
    me, device = distributed.setup(device)
    out = Path(out_dir)
    tokenizer_dir = out / TOKENIZER_DIR
    from kosmos2.train.loop import check_config

    check_config(out, recipe, write=me.main)  # before the tokenizer: a folder of another recipe is refused
    if me.main and not (tokenizer_dir / "tokenizer.json").exists():
        if recipe.init_from:  # the model's own tokenizer, so its ids mean what its weights learned
            Kosmos2Tokenizer.from_pretrained(recipe.init_from).save_pretrained(tokenizer_dir)
        else:
            build_tokenizer(recipe, tokenizer_dir)
    distributed.barrier()
    tokenizer = Kosmos2Tokenizer.from_pretrained(tokenizer_dir)
    model = load_init(recipe.init_from) if recipe.init_from else build_model(recipe, tokenizer)
    head = build_slot_head(model.config.text.width) if recipe.slot_loss_weight > 0 else None
    config = model.config
    grid = patch_grid(config) if head is not None else None
    batches = SyntheticBatches(
        recipe, tokenizer_dir, config.vision.image_size, config.latent_query_num, grid, tokenizer
    )
    generation = generation_settings(recipe)

    def evaluate(model: Kosmos2, step: int) -> dict[str, float]:
        from kosmos2.predictor import Predictor

        return world_metrics(world_scores(Predictor(model, tokenizer), "test", recipe.eval_queries))

    task = TrainTask(
        model=model,
        batches=batches,
        loss=lambda m, b: compute_losses(m, b, head, recipe.slot_loss_weight),
        heads=head,
        weight=lambda b: b.loss_tokens,
        describe=lambda b: {"rows": len(b.tasks), "tokens": b.tokens},
        export=lambda m, d: export(m, tokenizer, d, recipe.export_dtype, generation),
        evaluate=evaluate,
    )
    kwargs = {"progress": progress, "progress_stream": progress_stream, "device": device}
    return fit(task, recipe, out, stop_after=stop_after, prefetch=prefetch, **kwargs)


# ------------------------------------------------------------------------------------------------------------
# Measuring a model on the world


def world_scores(
    predictor: Any,
    split: str = "test",
    n_per_task: int = 200,
    tasks: Sequence[str] = ("rec", "grounded_caption", "reg", "vqa"),
    seed: int | None = None,
    batch_size: int = 64,
) -> dict[str, dict[str, Any]]:
    """Score `predictor` on `n_per_task` samples per task of the world's split (`make_eval_set`; `seed`
    None: the split's fixed set), with kosmos2/eval/synthetic.py's scorer and decoding settings: {task:
    summarize_task(...)} (REC "accuracy" = Acc@0.5 of the first box; grounded captions entity
    "precision"/"recall"; REG "exact_match"; VQA "accuracy")."""
    from kosmos2.data import synthetic
    from kosmos2.eval.runner import Query, run_queries
    from kosmos2.eval.synthetic import WorldQuery, score_world, summarize_task

    items = []
    for i, sample in enumerate(synthetic.make_eval_set(split, n_per_task, tasks=list(tasks), seed=seed)):
        scene = sample["scene"]
        query = Query(f"{split}/{sample['task']}/{i}", scene, sample["prompt"], (scene.width, scene.height))
        items.append(WorldQuery(query, sample))
    predictions, _ = run_queries(
        predictor,
        [item.query for item in items],
        model_id="training",
        batch_size=batch_size,
        generation=GENERATION,
        progress=False,
        load=synthetic.render,
    )
    records: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        records.setdefault(item.sample["task"], []).append(score_world(item, predictions[item.query.id]))
    return {task: summarize_task(task, rs) for task, rs in records.items()}


def world_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """`world_scores` results as flat headline numbers: REC and VQA accuracy, REG exact match, grounded
    caption entity precision / recall ("grounded_caption_p" / "_r")."""
    out: dict[str, float] = {}
    for task, r in results.items():
        if "precision" in r:
            out[f"{task}_p"], out[f"{task}_r"] = float(r["precision"]), float(r["recall"])
        else:
            out[task] = float(r.get("accuracy", r.get("exact_match", 0.0)))
    return out


def format_quality(split: str, results: Mapping[str, Mapping[str, Any]]) -> str:
    """One line: each task's headline number."""
    parts = []
    for task, r in results.items():
        if "precision" in r:
            parts.append(f"{task} P {r['precision']:.3f} R {r['recall']:.3f}")
        else:
            parts.append(f"{task} {r.get('accuracy', r.get('exact_match', 0.0)):.3f}")
    return f"{split}: " + ", ".join(parts)
