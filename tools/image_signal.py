"""Does the model learn to read its image? A short training probe for the default-model recipe.

Trains a fresh model built by `kosmos2.train` (its model, optimizer and schedule) on batches of one sample
per scene for a few hundred steps and prints, every `--every` steps:

    loss      the mean training loss of the last steps
    answer    the loss on the sample's target tokens (after the prompt: caption, answer, location tokens);
              for 1-object captions ("a small red circle.") it stays near 0.9 until the image is read
    first     the loss on the first location token of each box (chance: ln 1024 = 6.93)
    ratio     image signal of the image slots: std across images / rms, on 64 fixed scenes (1 = all image,
              0 = the same slots for every image)
    rms       rms of the image slots (before the decoder's sqrt(width) embedding scale)

    python tools/image_signal.py --steps 200 --mixture caption=1 --max-objects 1
    python tools/image_signal.py --steps 400 --mixture rec=1 --max-objects 1 --answer-only

`--answer-only` keeps only the target tokens after the prompt in the loss (not SPEC §3's "everything after
the image"), to test whether the image-independent prompt text is what teaches the decoder to flatten the
image slots. docs/DEFAULT_MODEL.md records what these probes measured.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch
import torch.nn.functional as F

from kosmos2.data import synthetic as S
from kosmos2.image import preprocess
from kosmos2.train import optim as O
from kosmos2.train.recipes import synthetic as T


def make_rows(step, args, tasks, weights, tokenizer, Q, size):
    """`args.scenes` train scenes of <= args.max_objects objects, one sample each: pixels [S,3,H,W],
    input_ids, targets (SPEC §3: every token after the image), answer [R,T] (True on the sample's target
    tokens), image mask; right padded."""
    rng = random.Random(step)
    scenes, rows = [], []
    k = 0
    while len(rows) < args.scenes:
        scene = S.make_scene(S.scene_seed("train", 0, "probe", step, k), "train")
        k += 1
        if len(scene.objects) > args.max_objects:
            continue
        sample = S.build_sample(scene, rng.choices(tasks, weights)[0], rng)
        if sample is None:
            continue
        # answer_mask: the target and </s>; the SPEC §3 mask is every token after the last image slot
        ids, image_mask, answer_mask = tokenizer.encode_for_training(
            sample["prompt"], sample["target"], num_image_tokens=Q, learn_prompt=False
        )
        last_slot = max(i for i, m in enumerate(image_mask) if m)
        scenes.append(scene)
        rows.append((ids, image_mask, [t > last_slot for t in range(len(ids))], answer_mask))
    T_ = max(len(r[0]) for r in rows)
    input_ids = torch.full((len(rows), T_), 1, dtype=torch.long)
    targets = torch.full((len(rows), T_), -100, dtype=torch.long)
    answer = torch.zeros((len(rows), T_), dtype=torch.bool)
    image = torch.zeros((len(rows), T_), dtype=torch.bool)
    for r, (ids, image_mask, loss_mask, answer_mask) in enumerate(rows):
        n = len(ids)
        input_ids[r, :n] = torch.tensor(ids)
        image[r, :n] = torch.tensor(image_mask)
        # position t predicts token t + 1
        learned = [t if m else -100 for t, m in zip(ids[1:], loss_mask[1:], strict=True)]
        targets[r, : n - 1] = torch.tensor(learned)
        answer[r, : n - 1] = torch.tensor(answer_mask[1:])
    pixels = preprocess([S.render(s) for s in scenes], size=size)
    return pixels, input_ids, targets, answer, image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--mixture", default="caption=1", help="task=weight,... (kosmos2.data.synthetic.TASKS)")
    ap.add_argument("--max-objects", type=int, default=1, help="only scenes with at most this many objects")
    ap.add_argument("--scenes", type=int, default=32, help="scenes per step (one sample each)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--optimizer", default="adamw", choices=("adamw", "muon"),
        help="(default: adamw, the optimizer of the probes docs/DEFAULT_MODEL.md records)",
    )  # fmt: skip
    ap.add_argument(
        "--preset", default="small",
        help="model preset (default: small, the 64 px preset of the probes docs/DEFAULT_MODEL.md records)",
    )  # fmt: skip
    ap.add_argument("--answer-only", action="store_true", help="loss on the sample's target tokens only")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all)")
    ap.add_argument("--tokenizer", default=None, help="a trained tokenizer directory (default: train one)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mixture = {k: float(v) for k, v in (p.split("=") for p in args.mixture.split(","))}
    tasks, weights = list(mixture), list(mixture.values())
    recipe = T.get_recipe(
        "default",
        preset=args.preset,
        mixture=mixture,
        lr=args.lr,
        optimizer=args.optimizer,
        steps=max(args.steps, 2),
        bf16=False,
    )
    if args.tokenizer:
        from kosmos2.tokenizer import Kosmos2Tokenizer

        tokenizer = Kosmos2Tokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = T.build_tokenizer(recipe, tempfile.mkdtemp(prefix="kosmos2-probe-"))
    model = T.build_model(recipe, tokenizer)
    optimizer = O.make_optimizer(model, recipe)
    Q, size = model.config.latent_query_num, model.config.vision.image_size
    fixed = [S.make_scene(S.scene_seed("train", 99, "fixed", i), "train") for i in range(64)]
    fixed_pixels = preprocess([S.render(s) for s in fixed], size=size)
    loc = tokenizer.patch_index_offset

    def slot_signal() -> list[str]:
        with torch.no_grad():
            e = model.encode_image(fixed_pixels)
        rms = float(e.pow(2).mean().sqrt())
        return [f"{float(e.std(0).mean()) / max(rms, 1e-12):.3f}", f"{rms:.3f}"]

    sums = {"loss": [0.0, 0], "answer": [0.0, 0], "first": [0.0, 0]}
    start = time.time()
    print("step loss answer first ratio rms seconds", flush=True)
    print(0, "-", "-", "-", *slot_signal(), 0, flush=True)
    for step in range(args.steps):
        pixels, input_ids, targets, answer, image = make_rows(step, args, tasks, weights, tokenizer, Q, size)
        if args.answer_only:
            targets[~answer] = -100
        embeds = model.encode_image(pixels)
        logits, _ = model(input_ids, image_embeds=embeds, image_mask=image)
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
        loss = ce[targets != -100].mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.set_lr(O.lr_factor(step, recipe))
        optimizer.step()
        with torch.no_grad():
            after_loc = torch.zeros_like(answer)
            after_loc[:, 1:] = input_ids[:, 1:] >= loc
            learned = targets != -100
            for name, mask in (("answer", answer & learned), ("first", (targets >= loc) & ~after_loc)):
                sums[name][0] += float(ce[mask].sum())
                sums[name][1] += int(mask.sum())
            sums["loss"][0] += float(loss)
            sums["loss"][1] += 1
        if (step + 1) % args.every == 0:
            means = [f"{s / n:.3f}" if n else "-" for s, n in sums.values()]
            print(step + 1, *means, *slot_signal(), f"{time.time() - start:.0f}", flush=True)
            sums = {k: [0.0, 0] for k in sums}


if __name__ == "__main__":
    main()
