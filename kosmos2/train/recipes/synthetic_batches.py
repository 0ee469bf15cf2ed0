"""The synthetic recipe's batches: a pure function of (recipe, step), cut into parts for micro-batches and
processes.

A step's global batch is `scenes_per_step` scenes, each rendered once and encoded once, each posing
`samples_per_scene` tasks drawn from the mixture; part p of P holds the scenes k with k % P == p. The rows
of one scene share its image embeddings (the vision encoder runs once per scene, the decoder once per row),
and with `share_prefix` the decoder runs each scene's image prefix once for all its rows
(kosmos2/train/recipes/shared_prefix.py). Rows are sorted by length and cut into right-padded chunks.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kosmos2.data import synthetic
from kosmos2.train.loss import next_token_targets
from kosmos2.train.recipes.slots import SlotTargets, slot_targets

if TYPE_CHECKING:
    from kosmos2.tokenizer import Kosmos2Tokenizer
    from kosmos2.train.recipes.synthetic import Recipe

PAD_ID = 1  # the fairseq <pad> id of every Kosmos-2 tokenizer


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


@dataclass
class Batch:
    """One micro-batch: pixel_values [S,3,H,W] (one image per scene) and the rows in chunks.

    Rows are sorted by length and cut into chunks (`chunk_bounds`), each padded on the right to its own
    longest row. Right padding needs no attention mask: a causal row never looks ahead at its padding, and
    pad tokens do not shift positions (SPEC §6), so every row computes what it would alone.
    """

    pixel_values: torch.Tensor
    chunks: list[Chunk]
    tasks: list[str]
    location_start: int  # the first location token's id: targets >= it are location tokens
    slots: SlotTargets | None = None  # targets of the slot read-out, when asked for
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
        from kosmos2.train.loop import move

        return move(self, device)


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


def batch_samples(recipe: Recipe, step: int, part: int = 0, parts: int = 1) -> list[tuple[Any, list[dict]]]:
    """The (scene, samples) of training step `step`, part `part` of `parts`: the train scenes k <
    `scenes_per_step` with k % parts == part, each with up to `samples_per_scene` samples of tasks drawn from
    the mixture (a task the scene cannot pose is skipped)."""
    names = [t for t, w in recipe.mixture.items() if w > 0]
    weights = [recipe.mixture[t] for t in names]
    out = []
    for k in range(part, recipe.scenes_per_step, parts):
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
    part: int = 0,
    parts: int = 1,
) -> Batch:
    """Render, preprocess and tokenise the samples of `step` (part `part` of `parts`; `batch_samples`).

    Scenes are rendered at their native size and resized by `kosmos2.image.preprocess`, exactly as an image
    reaches the model at inference. Each row is `tokenizer.encode_for_training(prompt, target)`, the loss on
    the target and `</s>` (SPEC §3's mask with the prompt not learned: learned, the prompt text, which does
    not depend on the image, teaches the decoder to flatten the image slots; docs/DEFAULT_MODEL.md). With
    `grid` (patches per side) the batch also carries the slot read-out's targets (`slot_targets`).
    """
    from kosmos2.image import preprocess

    if tokenizer.pad_id != PAD_ID:
        raise ValueError(
            f"the tokenizer's <pad> id is {tokenizer.pad_id}, expected {PAD_ID} (fairseq layout)"
        )
    scenes = batch_samples(recipe, step, part, parts)
    pixels = preprocess([synthetic.render(scene) for scene, _ in scenes], size=image_size)
    rows = []  # (ids, image_mask, targets, scene index, task, positions)
    for i, (_, samples) in enumerate(scenes):
        for sample in samples:
            ids, image_mask, loss_mask = tokenizer.encode_for_training(
                sample["prompt"], sample["target"], num_image_tokens=num_image_tokens, learn_prompt=False
            )
            rows.append((ids, image_mask, next_token_targets(ids, loss_mask), i, sample["task"], None))
    prefix = None
    if recipe.share_prefix:
        prefix, rows = split_prefixes(rows)
    rows.sort(key=lambda r: len(r[0]))  # stable: equal lengths keep their order
    chunks = []
    for start, end in chunk_bounds([len(r[0]) for r in rows]):
        part_rows = rows[start:end]
        T = len(part_rows[-1][0])
        input_ids = torch.full((len(part_rows), T), PAD_ID, dtype=torch.long)
        targets = torch.full((len(part_rows), T), -100, dtype=torch.long)
        image_mask = torch.zeros((len(part_rows), T), dtype=torch.bool)
        positions = torch.ones((len(part_rows), T), dtype=torch.long) if prefix is not None else None
        for r, (ids, mask, tgt, _, _, pos) in enumerate(part_rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            targets[r, : len(ids)] = torch.tensor(tgt)
            image_mask[r, : len(ids)] = torch.tensor(mask)
            if positions is not None:
                positions[r, : len(ids)] = torch.tensor(pos)
        index = torch.tensor([r[3] for r in part_rows], dtype=torch.long)
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
    )


def split_prefixes(rows: list[tuple]) -> tuple[Prefix, list[tuple]]:
    """The shared image prefix of each scene (everything up to `</image>`) and, from one row per sample
    (`make_batch`'s tuples), each sample's remaining tokens with the decoder positions they have in their own
    row (make_positions: 2 + index, no padding before them). `shared_prefix.forward_shared` then computes for
    every token what it computes in the sample's own row."""
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


class SyntheticBatches:
    """The recipe's `TrainTask.batches`: `make_batch` for (step, part, parts). It pickles as the recipe and
    the tokenizer's folder, so a batch worker process can make the same batches."""

    def __init__(
        self,
        recipe: Recipe,
        tokenizer_dir: str | os.PathLike[str],
        image_size: int,
        num_image_tokens: int,
        grid: int | None,
        tokenizer: Kosmos2Tokenizer | None = None,
    ) -> None:
        self.recipe, self.tokenizer_dir = recipe, os.fspath(tokenizer_dir)
        self.image_size, self.num_image_tokens, self.grid = image_size, num_image_tokens, grid
        self._tokenizer = tokenizer

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "recipe": self.recipe.to_dict(), "_tokenizer": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from kosmos2.train.recipes.synthetic import Recipe

        self.__dict__.update(state)
        self.recipe = Recipe.from_dict(state["recipe"])

    @property
    def tokenizer(self) -> Kosmos2Tokenizer:
        if self._tokenizer is None:
            from kosmos2.tokenizer import Kosmos2Tokenizer

            self._tokenizer = Kosmos2Tokenizer.from_pretrained(self.tokenizer_dir)
        return self._tokenizer

    def __call__(self, step: int, part: int = 0, parts: int = 1) -> Batch:
        return make_batch(
            self.recipe,
            step,
            self.tokenizer,
            self.image_size,
            self.num_image_tokens,
            self.grid,
            part=part,
            parts=parts,
        )
