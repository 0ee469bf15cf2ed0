"""The synthetic recipe's slot read-out (training only): a linear layer on each image slot that says what
covers the slot's patch, trained beside the language-model loss and dropped at export.

Per slot it predicts whether an object's box overlaps the slot's patch (objectness) and, on covered
patches, that object's colour, shape, size, its box relative to the patch centre, how many objects are
identical to it (1, 2, 3, 4+) and which word tells it from them (`synthetic.twin_facts`): what the
captions' counting, REG's suffix and VQA read off the slots (docs/DEFAULT_MODEL.md). Targets come from the
world's true boxes (`slot_targets`); `probe_slots` measures a run's read-out on held-out scenes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kosmos2.data import synthetic

SLOT_BOX_TERMS = 4  # x1, y1, x2, y2 of the covering object, relative to the patch centre, in patches
GROUP_CLASSES = 4  # objects identical to a slot's object, itself included: 1, 2, 3, 4 or more
PLACE_CLASSES = ("", "on the left", "on the right", "at the top", "at the bottom", None)  # Facts.place


def slot_columns() -> dict[str, slice]:
    """The read-out's columns, in order: "objectness" (1 logit), "colour", "shape", "size" logits, "box"
    (SLOT_BOX_TERMS), "group" (GROUP_CLASSES) and "place" logits."""
    sections = (
        ("objectness", 1),
        ("colour", len(synthetic.COLOURS)),
        ("shape", len(synthetic.SHAPES)),
        ("size", len(synthetic.SIZES)),
        ("box", SLOT_BOX_TERMS),
        ("group", GROUP_CLASSES),
        ("place", len(PLACE_CLASSES)),
    )
    columns, k = {}, 0
    for name, n in sections:
        columns[name] = slice(k, k + n)
        k += n
    return columns


def build_slot_head(width: int) -> torch.nn.Linear:
    """The linear read-out over slots of `width` (the decoder's width). It lives only in training
    checkpoints: the exported model is the plain Kosmos-2 network."""
    return torch.nn.Linear(width, slot_columns()["place"].stop)


def patch_grid(model_config: Any) -> int:
    """Patches per side of the vision encoder's input."""
    return model_config.vision.image_size // model_config.vision.patch_size


def slot_patches(num_slots: int, num_patches: int) -> list[int]:
    """The image patch (row-major index) that image slot i starts looking at under `init_patches`: slots
    spread evenly over the patches (slot i <-> patch i when there are as many slots as patches)."""
    return [min(num_patches - 1, round((i + 0.5) * num_patches / num_slots - 0.5)) for i in range(num_slots)]


@dataclass
class SlotTargets:
    """What the slot read-out should say, per scene and slot [S, Q]: cover (1.0 when an object's box
    overlaps the slot's patch), colour / shape / size class of the object covering most of the patch (-100
    where none does), box [S, Q, 4] of that object relative to the patch centre, in patches; group: the
    number of objects identical to it, less one, capped at GROUP_CLASSES - 1; place: its index in
    PLACE_CLASSES."""

    cover: torch.Tensor
    colour: torch.Tensor
    shape: torch.Tensor
    size: torch.Tensor
    box: torch.Tensor
    group: torch.Tensor
    place: torch.Tensor


def slot_targets(scenes: Sequence[Any], grid: int, num_slots: int) -> SlotTargets:
    """Targets of the slot loss from the scenes' true boxes. The model sees each scene resized to a square
    (no crop), so a normalised box maps straight onto the `grid` × `grid` patches. A slot's object is the
    one whose box overlaps its patch most (ties go to the later object: it is drawn on top)."""
    import numpy as np

    colours, shapes = list(synthetic.COLOURS), list(synthetic.SHAPES)
    patches = np.array(slot_patches(num_slots, grid * grid))
    r, c = np.divmod(patches, grid)
    px1, py1, px2, py2 = c / grid, r / grid, (c + 1) / grid, (r + 1) / grid  # [Q] float64
    cx, cy = (c + 0.5) / grid, (r + 0.5) / grid
    S = len(scenes)
    cover = np.zeros((S, num_slots), dtype=np.float32)
    classes = np.full((5, S, num_slots), -100, dtype=np.int64)
    box = np.zeros((S, num_slots, SLOT_BOX_TERMS), dtype=np.float32)
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
        cover[s, q] = 1.0
        classes[:, s, q] = per_object[w].T
        relative = boxes[w] - np.stack([cx[q], cy[q], cx[q], cy[q]], axis=1)  # float64, then float32 × grid
        box[s, q] = relative.astype(np.float32) * np.float32(grid)
    classes_t = torch.from_numpy(classes)
    return SlotTargets(torch.from_numpy(cover), *classes_t[:3], torch.from_numpy(box), *classes_t[3:])


def slot_loss(head: torch.nn.Linear, slots: torch.Tensor, targets: SlotTargets) -> torch.Tensor:
    """Objectness binary cross-entropy over all slots, plus over the covered slots the colour, shape, size,
    group-size and place cross-entropies and the box L1 (in patches), each a mean. Computed in float32."""
    out = head(slots.float())  # [S, Q, K]
    loss = F.binary_cross_entropy_with_logits(out[..., 0], targets.cover)
    columns = slot_columns()
    covered = targets.cover.bool()
    if not covered.any():
        return loss
    picked = out[covered]  # [N, K]
    for name in ("colour", "shape", "size"):
        loss = loss + F.cross_entropy(picked[:, columns[name]], getattr(targets, name)[covered])
    loss = loss + F.l1_loss(picked[:, columns["box"]], targets.box[covered])
    for name in ("group", "place"):
        loss = loss + F.cross_entropy(picked[:, columns[name]], getattr(targets, name)[covered])
    return loss


def slot_report(out: torch.Tensor, targets: SlotTargets) -> dict[str, Any]:
    """How well a slot read-out's outputs `out` [S, Q, K] match `targets`: "objectness", the share of all
    slots whose logit sign agrees with cover; over the covered slots the share of "colour", "shape", "size"
    and "place" read right, "box_l1" the mean absolute box error (in patches), "group" the confusion matrix
    of the group size (row: true 1, 2, 3, 4+; column: read) and "group_recall" its diagonal over its row
    sums (None for an empty row). "slots": the number of covered slots."""
    out = out.float()
    columns = slot_columns()
    covered = targets.cover.bool()
    report: dict[str, Any] = {
        "slots": int(covered.sum()),
        "objectness": float(((out[..., 0] > 0) == covered).float().mean()),
    }
    picked = out[covered]  # [N, K]

    def read(name: str) -> torch.Tensor:
        return picked[:, columns[name]].argmax(-1)

    for name in ("colour", "shape", "size"):
        report[name] = float((read(name) == getattr(targets, name)[covered]).float().mean())
    report["box_l1"] = float((picked[:, columns["box"]] - targets.box[covered]).abs().mean())
    confusion = [[0] * GROUP_CLASSES for _ in range(GROUP_CLASSES)]
    for t, r in zip(targets.group[covered].tolist(), read("group").tolist(), strict=True):
        confusion[t][r] += 1
    report["group"] = confusion
    report["group_recall"] = [row[i] / sum(row) if sum(row) else None for i, row in enumerate(confusion)]
    report["place"] = float((read("place") == targets.place[covered]).float().mean())
    return report


def probe_slots(run: str | os.PathLike[str], scenes: int = 400, split: str = "test") -> dict[str, Any]:
    """`slot_report` of a training run's slot read-out (its checkpoint's last-step weights, not the moving
    average: the read-out was trained with those) on `scenes` fresh scenes of a held-out split, seen as in
    training (rendered, resized by `kosmos2.image.preprocess`, bf16 autocast if the recipe uses it)."""
    from kosmos2.image import preprocess
    from kosmos2.tokenizer import Kosmos2Tokenizer
    from kosmos2.train.loop import CHECKPOINT_FILE, load_checkpoint
    from kosmos2.train.recipes.synthetic import TOKENIZER_DIR, Recipe, build_model

    run = Path(run)
    if split not in ("test", "compositional"):
        raise ValueError(f"split {split!r}: probe a held-out split, 'test' or 'compositional'")
    if isinstance(scenes, bool) or not isinstance(scenes, int) or scenes < 1:
        raise ValueError(f"scenes {scenes!r}: probe at least one scene")
    if not (run / CHECKPOINT_FILE).is_file():
        raise ValueError(f"{run}: no {CHECKPOINT_FILE}; give the --out folder of a `kosmos2 train` run")
    state = load_checkpoint(run / CHECKPOINT_FILE)
    recipe = Recipe.from_dict(state["config"])
    if state.get("heads") is None:
        raise ValueError(f"{run}: the run has no slot read-out (recipe slot_loss_weight 0)")
    model = build_model(recipe, Kosmos2Tokenizer.from_pretrained(run / TOKENIZER_DIR))
    model.load_state_dict(state["model"])
    model.eval()
    head = build_slot_head(model.config.text.width)
    head.load_state_dict(state["heads"])
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
            outs.append(head(slots.float()))  # in float32, as the loss reads it
    return slot_report(torch.cat(outs), slot_targets(world, grid, num_slots))
