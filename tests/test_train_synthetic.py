"""Tests for the synthetic world's recipe (kosmos2/train/recipes/) run through the general loop: recipes,
batches and the SPEC §3 loss mask, the schedule, the initialisation, the slot read-out, the shared prefix,
checkpoints, a real kill + resume, prefetching, the exported model, and the world scores.

References are independent of the code under test: the loss mask is checked against SPEC §3 token by token,
the chunked right-padded loss against each row run alone through the model with its own cross-entropy, the
learning rate against values worked out by hand, the scores against hand-built outputs and an oracle that
answers every query with the world's own target.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _model_fixtures import EOS, GROUNDING, PAD, image_prompt, random_model, tiny_config

from kosmos2.data import synthetic
from kosmos2.model import make_positions
from kosmos2.tokenizer import Kosmos2Tokenizer
from kosmos2.train import loop as L
from kosmos2.train import optim as O
from kosmos2.train import prefetch as P
from kosmos2.train.config import parse_overrides
from kosmos2.train.recipes import shared_prefix
from kosmos2.train.recipes import slots as SL
from kosmos2.train.recipes import synthetic as W
from kosmos2.train.recipes import synthetic_batches as B
from kosmos2.train.recipes import synthetic_init as I

ROOT = Path(__file__).resolve().parent.parent
STEPS = 16  # the runs of this file: the "test" recipe (tiny preset) for 16 steps, a checkpoint every 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Runs here use one torch thread, as the killed subprocess does (same arithmetic in both), and two
    threads on two busy cores can be many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def recipe(**overrides) -> W.Recipe:
    return W.get_recipe("test", steps=STEPS, **overrides)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A whole uninterrupted run of the test recipe, in process."""
    out = tmp_path_factory.mktemp("run") / "uninterrupted"
    W.train(recipe(), out, progress=False)
    return out


@pytest.fixture(scope="module")
def tokenizer(finished_run) -> Kosmos2Tokenizer:
    return Kosmos2Tokenizer.from_pretrained(finished_run / W.TOKENIZER_DIR)


def model_state(run: Path) -> dict[str, torch.Tensor]:
    return L.load_checkpoint(run / L.CHECKPOINT_FILE)["model"]


# ------------------------------------------------------------------------------------------------------------
# Recipes


def test_recipes_validate_and_reject_bad_fields():
    for name in W.RECIPES:
        W.get_recipe(name)
    assert W.get_recipe("default").preset == "small-128"
    with pytest.raises(ValueError, match="unknown recipe 'nope'.*default"):
        W.get_recipe("nope")
    with pytest.raises(ValueError, match=r"recipe unknown fields \['stepz'\]"):
        W.get_recipe("test", stepz=3)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        W.get_recipe("test", steps=0)
    with pytest.raises(ValueError, match="mixture"):
        W.get_recipe("test", mixture={"juggling": 1.0})
    with pytest.raises(ValueError, match="recipe slot_loss_weight must be >= 0"):
        W.get_recipe("test", slot_loss_weight=-1.0)
    with pytest.raises(ValueError, match="recipe vision_layers must be an int >= 0"):
        W.get_recipe("test", vision_layers=-1)
    with pytest.raises(ValueError, match="recipe vqa_kinds names 'counting'"):
        W.get_recipe("test", vqa_kinds={"counting": 2})
    with pytest.raises(ValueError, match="recipe p_copy -0.1 must be a chance"):
        W.get_recipe("test", p_copy=-0.1)
    r = W.get_recipe("test", lr=5e-4)
    assert W.Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r


@pytest.mark.parametrize(
    ("field", "part", "other"),
    [("vision_layers", "vision", "text"), ("text_layers", "text", "vision")],
    ids=["vit", "decoder"],
)
def test_a_depth_field_sets_that_depth_and_nothing_else(tokenizer, field, part, other):
    preset = W.model_config(W.get_recipe("default"), tokenizer)
    deeper = W.model_config(W.get_recipe("default", **{field: 6}), tokenizer)
    assert getattr(preset, part).layers == 4 and getattr(deeper, part).layers == 6
    assert dataclasses.replace(getattr(deeper, part), layers=4) == getattr(preset, part)
    assert getattr(deeper, other) == getattr(preset, other)
    model = W.build_model(W.get_recipe("test", **{field: 3}), tokenizer)
    blocks = model.vision_model.model.encoder.layers if part == "vision" else model.text_model.model.layers
    assert len(blocks) == 3
    with pytest.raises(ValueError, match=f"recipe {field} must be an int >= 0"):
        W.get_recipe("test", **{field: -1})


def test_lr_schedule_warms_up_then_decays_by_cosine():
    r = W.get_recipe("test", steps=110, warmup_steps=10, final_lr_fraction=0.1)
    assert [O.lr_factor(s, r) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert O.lr_factor(10, r) == pytest.approx(1.0)  # the peak: cos(0)
    assert O.lr_factor(60, r) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi/2) = 0
    assert O.lr_factor(110, r) == pytest.approx(0.1)  # the end: cos(pi) = -1
    assert O.lr_factor(35, r) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


# ------------------------------------------------------------------------------------------------------------
# Batches and the loss


def test_batch_is_a_pure_function_of_seed_and_step(tokenizer):
    r = recipe()
    a, b = (B.make_batch(r, 3, tokenizer, 28, 64) for _ in range(2))
    assert torch.equal(a.pixel_values, b.pixel_values) and a.tasks == b.tasks
    for x, y in zip(a.chunks, b.chunks, strict=True):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.targets, y.targets)
    c = B.make_batch(r, 4, tokenizer, 28, 64)
    assert not torch.equal(a.pixel_values, c.pixel_values)
    d = B.make_batch(W.get_recipe("test", steps=STEPS, seed=1), 3, tokenizer, 28, 64)
    assert not torch.equal(a.pixel_values, d.pixel_values)


def _same_batch(a: B.Batch, b: B.Batch) -> None:
    assert torch.equal(a.pixel_values, b.pixel_values) and a.tasks == b.tasks
    assert a.location_start == b.location_start and (a.prefix is None) == (b.prefix is None)
    for x, y in zip(a.chunks, b.chunks, strict=True):
        for f in dataclasses.fields(x):
            u, v = getattr(x, f.name), getattr(y, f.name)
            assert (u is None and v is None) or torch.equal(u, v), f.name
    for part in ("slots", "prefix"):
        u, v = getattr(a, part), getattr(b, part)
        if u is not None:
            for f in dataclasses.fields(u):
                p, q = getattr(u, f.name), getattr(v, f.name)
                assert torch.equal(p, q) if isinstance(p, torch.Tensor) else p == q, (part, f.name)


def test_batch_worker_sends_make_batchs_batches_in_step_order(finished_run, tokenizer):
    r = recipe(share_prefix=True)
    source = B.SyntheticBatches(r, finished_run / W.TOKENIZER_DIR, 28, 64, grid=4)
    with P.BatchWorker(source, 3, 6, ahead=2) as worker:
        for step in (3, 4, 5):
            _same_batch(worker.get(step), B.make_batch(r, step, tokenizer, 28, 64, 4))
    with P.BatchWorker(source, 3, 6) as worker:
        with pytest.raises(RuntimeError, match="sent the batch of step 3, expected step 4"):
            worker.get(4)


@pytest.mark.parametrize("prefetch", [True, 3, "thread"], ids=["worker", "three-workers", "thread"])
def test_a_prefetched_run_ends_on_the_same_weights(finished_run, tmp_path, prefetch):
    """Batches made ahead, by a worker process, by three (worker k makes steps k, k + 3, ...: the trainer must
    still take them in step order) or by the trainer's thread (kosmos2 train's CPU default): the same losses
    step by step and the same exported bytes as the run that makes each batch between steps."""
    out = tmp_path / "prefetched"
    W.train(recipe(), out, progress=False, prefetch=prefetch)
    model = L.MODEL_DIR + "/model.safetensors"
    assert (out / model).read_bytes() == (finished_run / model).read_bytes()
    a, b = ((run / L.LOG_FILE).read_text().splitlines() for run in (out, finished_run))
    assert [(r["step"], r["loss"]) for r in map(json.loads, a)] == [
        (r["step"], r["loss"]) for r in map(json.loads, b)
    ]


def test_batch_thread_gives_each_steps_batch_and_raises_the_threads_error(finished_run, tokenizer):
    r = recipe(share_prefix=True)
    with P.BatchThread(lambda step: B.make_batch(r, step, tokenizer, 28, 64, 4), 6) as thread:
        for step in (3, 4, 5):  # 3 made at once, 4 and 5 in the thread while the caller has the one before
            _same_batch(thread.get(step), B.make_batch(r, step, tokenizer, 28, 64, 4))
        _same_batch(thread.get(1), B.make_batch(r, 1, tokenizer, 28, 64, 4))  # out of order: made at once
    with P.BatchThread(lambda step: B.make_batch(r, step, tokenizer, 28, 64, 4), 6) as thread:
        thread.get(0)
        thread._make = lambda step: B.make_batch(r, step, tokenizer, 28, 0, 4)  # from here on, a bad batch
        thread.get(1)  # made before the change; step 2 starts, and fails, in the thread
        with pytest.raises(ValueError):
            thread.get(2)


def test_batch_worker_refuses_no_workers(tmp_path):
    with pytest.raises(ValueError, match="workers=0: use a positive number"):
        P.BatchWorker(B.SyntheticBatches(recipe(), tmp_path, 64, 64, None), 0, 2, workers=0)


def test_train_cli_names_a_bad_device_and_prefetch_choice(tmp_path, capsys):
    from kosmos2.cli import main

    assert main(["train", "--recipe", "test", "--out", str(tmp_path / "r"), "--device", "bogus"]) == 2
    assert "kosmos2 train: error: --device 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit):
        main(["train", "--recipe", "test", "--out", str(tmp_path / "r"), "--prefetch", "maybe"])
    assert "--prefetch: invalid choice: 'maybe'" in capsys.readouterr().err
    command = ["train", "--recipe", "test", "--out", str(tmp_path / "r"), "--prefetch-workers", "0"]
    assert main(command) == 2
    assert "kosmos2 train: error: --prefetch-workers 0: use 1 or more" in capsys.readouterr().err


def test_batch_worker_failure_is_raised_with_its_traceback(tmp_path):
    source = B.SyntheticBatches(recipe(), tmp_path / "no-tokenizer", 28, 64, None)
    with P.BatchWorker(source, 0, 2) as worker:
        with pytest.raises(RuntimeError, match=r"(?s)failed making the batch of step 0:.*step 0: Traceback"):
            worker.get(0)
    with pytest.raises(ValueError, match="ahead=0"):
        P.BatchWorker(source, 0, 2, ahead=0)


def test_vqa_kinds_reach_the_batch_and_empty_keeps_the_old_stream():
    r = W.get_recipe("test", scenes_per_step=24, samples_per_scene=4, mixture={"vqa": 1, "rec": 1})
    old = B.batch_samples(r, 0)
    assert B.batch_samples(dataclasses.replace(r, vqa_kinds={}), 0) == old  # the shipped run's batches
    counts = B.batch_samples(dataclasses.replace(r, vqa_kinds={"count": 1, **dict.fromkeys(NOT_COUNT, 0)}), 0)
    vqa = [s for _, group in counts for s in group if s["task"] == "vqa"]
    assert len(vqa) > 20 and {s["kind"] for s in vqa} == {"count"}
    assert sum(s["kind"] != "count" for _, group in old for s in group if s["task"] == "vqa") > 0


def test_p_copy_reaches_the_batch_and_none_keeps_the_old_stream():
    r = W.get_recipe("test", scenes_per_step=16)
    old = B.batch_samples(r, 0)
    assert B.batch_samples(dataclasses.replace(r, p_copy=0.25), 0) == old  # the world's P_COPY
    more = B.batch_samples(dataclasses.replace(r, p_copy=0.65), 0)
    seeds = [synthetic.scene_seed("train", r.seed, "scene", 0, k) for k in range(16)]
    assert [scene for scene, _ in more] == [synthetic.make_scene(s, "train", 0.65) for s in seeds]
    assert [scene for scene, _ in more] != [scene for scene, _ in old]
    saved = W.get_recipe("test", p_copy=0.5).to_dict()
    assert W.Recipe.from_dict(json.loads(json.dumps(saved))).p_copy == 0.5


NOT_COUNT = ("color", "shape", "size", "where", "exists")


def test_batch_rows_follow_the_prompt_layout_and_the_loss_mask_of_spec_3(tokenizer):
    r = W.get_recipe("test", scenes_per_step=6, samples_per_scene=3)
    batch = B.make_batch(r, 0, tokenizer, 28, 64)
    samples = [s for _, group in B.batch_samples(r, 0) for s in group]
    prompts = {"".join(s["prompt"].split()) for s in samples}
    assert sorted(batch.tasks) == sorted(s["task"] for s in samples) and len(samples) == 18
    assert batch.pixel_values.shape == (6, 3, 28, 28)
    texts = {"".join((s["prompt"] + s["target"]).split()) for s in samples}  # compared without spaces
    for chunk in batch.chunks:
        for ids, targets, image_mask in zip(chunk.input_ids, chunk.targets, chunk.image_mask, strict=True):
            n = int((ids != tokenizer.pad_id).sum())
            assert (ids[n:] == tokenizer.pad_id).all() and (targets[n:] == -100).all()  # right padding
            ids, targets, image_mask = ids[:n].tolist(), targets[:n].tolist(), image_mask[:n].tolist()
            # <s> <image> [64 slots 4..67] </image> text </s>
            assert ids[:2] == [tokenizer.bos_id, tokenizer.image_start_id]
            assert ids[2:66] == list(range(4, 68)) and image_mask == [False] * 2 + [True] * 64 + [False] * (
                n - 66
            )
            assert ids[66] == tokenizer.image_end_id and ids[-1] == tokenizer.eos_id
            assert "".join(tokenizer.decode(ids[67:-1]).split()) in texts
            # SPEC §3 with the prompt unlearned: the loss covers the sample's target and </s>, the tokens
            # after the prompt, none before: position t predicts token t + 1
            first = next(t for t in range(n) if targets[t] != -100)
            assert first > 65 and "".join(tokenizer.decode(ids[67 : first + 1]).split()) in prompts
            assert targets[:first] == [-100] * first
            assert targets[first:-1] == ids[first + 1 :]
            assert targets[-1] == -100


def _rows_alone(model, batch: B.Batch, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each row of `batch` (one row per sample, no shared prefix) run alone through the model without its
    padding: (input ids, targets, per-token cross-entropy, 0 where the target is -100)."""
    embeds = model.encode_image(batch.pixel_values)
    out = []
    for chunk in batch.chunks:
        for ids, targets, mask, scene in zip(
            chunk.input_ids, chunk.targets, chunk.image_mask, chunk.image_index, strict=True
        ):
            n = int((ids != pad_id).sum())
            logits, _ = model(ids[None, :n], image_embeds=embeds[scene][None], image_mask=mask[None, :n])
            ce = F.cross_entropy(logits[0], targets[:n], reduction="none", ignore_index=-100)
            out.append((ids[:n], targets[:n], ce))
    return out


def _padded_cost(lengths, bounds, cost):
    return sum((end - start) * lengths[end - 1] + cost for start, end in bounds)


def test_chunk_bounds_finds_the_cheapest_cut():
    """Worked by hand: [1, 1, 2, 5] at 32 a chunk is one chunk (20 tokens + 32 < 6 + 5 + 64); at 0 the runs
    of equal lengths; and against every way of cutting small lists (brute force), the least cost."""
    assert B.chunk_bounds([1, 1, 2, 5], 32) == [(0, 4)]
    assert B.chunk_bounds([1, 1, 2, 5], 0) == [(0, 2), (2, 3), (3, 4)]
    assert B.chunk_bounds([10] * 5 + [60] * 3, 32) == [(0, 5), (5, 8)]  # 50 + 180 + 64 < 480 + 32
    assert B.chunk_bounds([], 32) == []
    rng = random.Random(0)
    for _ in range(200):
        lengths = sorted(rng.randint(1, 30) for _ in range(rng.randint(1, 9)))
        cost = rng.choice([0, 3, 10, 40])
        bounds = B.chunk_bounds(lengths, cost)
        assert [b[0] for b in bounds] == [0] + [b[1] for b in bounds[:-1]] and bounds[-1][1] == len(lengths)
        n = len(lengths)
        cheapest = min(
            _padded_cost(lengths, list(itertools.pairwise([0, *cuts, n])), cost)
            for k in range(n)
            for cuts in itertools.combinations(range(1, n), k)
        )
        assert _padded_cost(lengths, bounds, cost) == cheapest
    with pytest.raises(ValueError, match="ascending"):
        B.chunk_bounds([3, 2])


def test_chunked_right_padded_loss_equals_each_row_alone(tokenizer):
    """The batch loss is the mean over all target tokens of every row computed alone (no padding)."""
    r = W.get_recipe("test", scenes_per_step=5, samples_per_scene=4)
    model = W.build_model(r, tokenizer).eval()
    batch = B.make_batch(r, 7, tokenizer, 28, 64)
    assert len(batch.chunks) >= 2 and len({c.input_ids.shape[1] for c in batch.chunks}) >= 2
    with torch.no_grad():
        loss = W.compute_losses(model, batch)["lm"]
        total, count = 0.0, 0
        for _, targets, ce in _rows_alone(model, batch, tokenizer.pad_id):
            keep = targets != -100
            total += float(ce[keep].sum())
            count += int(keep.sum())
    assert count == batch.loss_tokens
    assert float(loss) == pytest.approx(total / count, rel=1e-5)


def test_init_centres_the_image_slots_and_sets_unit_gain_layers(tokenizer):
    from kosmos2.image import preprocess

    r = W.get_recipe("test")
    model = W.build_model(r, tokenizer)
    # the same 64 images center_connector uses: the slots' mean over them is zero, per channel
    scenes = [synthetic.make_scene(synthetic.scene_seed("train", r.seed, "init", i)) for i in range(64)]
    pixels = preprocess([synthetic.render(s) for s in scenes], size=model.config.vision.image_size)
    with torch.no_grad():
        slots = model.eval().encode_image(pixels)
        assert slots.mean((0, 1)).abs().max() < 1e-4 * max(float(slots.pow(2).mean().sqrt()), 1.0)
        # linear layers at unit gain: std 1/sqrt(fan_in) (the model's own init is 0.02)
        q = model.text_model.model.layers[0].self_attn.q_proj.weight
        assert float(q.std()) == pytest.approx(q.shape[1] ** -0.5, rel=0.1)


def test_location_tokens_start_from_a_row_and_column_code(tokenizer):
    model = W.build_model(recipe(), tokenizer)
    E = model.text_model.model.embed_tokens.weight.detach()
    start = tokenizer.patch_index_offset
    loc = E[start : start + 1024]
    half = loc.shape[1] // 2
    # cells of one row share the row half of the code; cells of one column share the column half
    assert torch.allclose(loc[0, :half], loc[31, :half]) and not torch.allclose(loc[0, half:], loc[31, half:])
    assert torch.allclose(loc[0, half:], loc[32 * 31, half:]) and not torch.allclose(
        loc[0, :half], loc[992, :half]
    )
    # neighbours are closer than far cells
    assert (loc[0] - loc[1]).norm() < (loc[0] - loc[16]).norm()
    assert loc.std() == pytest.approx(0.02, rel=0.2)


def test_slots_spread_evenly_over_the_patches():
    assert SL.slot_patches(4, 4) == [0, 1, 2, 3]
    assert SL.slot_patches(8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert SL.slot_patches(64, 64) == list(range(64))


@pytest.mark.parametrize("preset", ["small", "small-128", "small-192"])
def test_patch_init_makes_slot_i_look_at_patch_i(preset):
    """On the small presets, from real rendered scenes: each latent's attention peaks on its own patch."""
    from kosmos2.config import Kosmos2Config
    from kosmos2.image import preprocess
    from kosmos2.model import Kosmos2

    torch.manual_seed(0)
    config = Kosmos2Config.from_preset(preset)
    assert SL.patch_grid(config) == 8  # all three: 8 x 8 patches, one image slot each
    model = Kosmos2(config).eval()
    I.init_scaled(model)
    I.init_patches(model)
    scenes = [synthetic.make_scene(synthetic.scene_seed("train", 5, "patches", i)) for i in range(4)]
    pixels = preprocess([synthetic.render(s) for s in scenes], size=config.vision.image_size)
    connector = model.image_to_text_projection
    attn = connector.x_attn
    with torch.no_grad():
        x = connector.dense(F.normalize(model.vision_model(pixels), dim=-1))  # [4, 65, C]
        keys = attn.k_proj(x).view(4, 65, attn.heads, -1)  # image tokens only (class token first)
        queries = attn.q_proj(connector.latent_query).view(64, attn.heads, -1)
        scores = torch.einsum("qhd,bkhd->bhqk", queries, keys)
    peak = scores.argmax(-1)  # [4, heads, 64]: the token each latent attends to most, per head
    assert (peak == torch.arange(1, 65)).float().mean() > 0.9


def _scene_of(*objects):
    """A stand-in scene holding world objects: slot_targets reads only `.objects`."""
    made = []
    for shape, colour, size, box in objects:
        made.append(synthetic.SceneObject(shape, colour, size, (0, 0, 0), box, box))
    return synthetic.Scene(0, "train", 1, 1, None, tuple(made))


def test_slot_targets_by_hand():
    # a 4 x 4 patch grid (quarters); the object spans x 0.3-0.6, y 0-0.2: patches (row 0, columns 1 and 2)
    star = _scene_of(("star", "green", "small", (0.3, 0.0, 0.6, 0.2)))
    targets = SL.slot_targets([star], grid=4, num_slots=16)
    assert targets.cover[0].nonzero().flatten().tolist() == [1, 2]
    assert targets.colour[0, 1] == list(synthetic.COLOURS).index("green")
    assert targets.shape[0, 2] == synthetic.SHAPES.index("star")
    assert targets.size[0, 1] == synthetic.SIZES.index("small")
    assert (targets.colour[0, [0, 3, 4, 15]] == -100).all()
    # the box relative to patch 1's centre (0.375, 0.125), in patches of 0.25
    assert targets.box[0, 1].tolist() == pytest.approx([-0.3, -0.5, 0.9, 0.3])
    assert targets.box[0, 2].tolist() == pytest.approx([-1.3, -0.5, -0.1, 0.3])
    # two objects on one patch: the one covering more of it is the patch's object
    both = SL.slot_targets(
        [
            _scene_of(
                ("circle", "red", "large", (0.0, 0.0, 0.4, 0.4)),
                ("cross", "blue", "small", (0.2, 0.2, 0.3, 0.3)),
            )
        ],
        grid=2,
        num_slots=4,
    )
    assert both.cover[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert both.shape[0, 0] == synthetic.SHAPES.index("circle")


def _twins_scene():
    """Three identical circles along the top row (grid 4: patch columns 0 | 1, 2 | 3) and a large square
    below: the circles are a group of three, the left one "on the left", the right one "on the right",
    the middle one told by no EXTREMES word; the square is alone."""
    return _scene_of(
        ("circle", "red", "small", (0.0, 0.0, 0.2, 0.2)),
        ("circle", "red", "small", (0.4, 0.0, 0.6, 0.2)),
        ("circle", "red", "small", (0.8, 0.0, 1.0, 0.2)),
        ("square", "blue", "large", (0.3, 0.6, 0.7, 0.9)),
    )


def test_slot_targets_count_twins_and_tell_them_apart():
    scene = _twins_scene()
    targets = SL.slot_targets([scene], grid=4, num_slots=16)
    places = SL.PLACE_CLASSES
    assert targets.group[0, [0, 1, 2, 3]].tolist() == [2, 2, 2, 2]
    assert targets.place[0, [0, 1, 2, 3]].tolist() == [
        places.index("on the left"),
        places.index(None),
        places.index(None),
        places.index("on the right"),
    ]
    assert targets.group[0, [9, 10, 13, 14]].tolist() == [0] * 4
    assert targets.place[0, [9, 10, 13, 14]].tolist() == [places.index("")] * 4
    assert (targets.group[0, [4, 5, 6, 7, 8, 11]] == -100).all()
    assert (targets.place[0, [4, 5, 6, 7, 8, 11]] == -100).all()
    # five of a kind: the group class stops at "4 or more"
    five = _scene_of(*[("star", "green", "small", (0.2 * i, 0.0, 0.2 * i + 0.1, 0.1)) for i in range(5)])
    assert set(SL.slot_targets([five], grid=4, num_slots=16).group[0].tolist()) == {-100, 3}


def _slot_targets_one_by_one(scenes, grid, num_slots):
    """The slot targets the plain way, slot by slot and object by object (in Python floats), as the
    reference for the array code of `SL.slot_targets` (the shipped model's run used this one)."""
    colours, shapes = list(synthetic.COLOURS), list(synthetic.SHAPES)
    patches = SL.slot_patches(num_slots, grid * grid)
    S = len(scenes)
    cover = torch.zeros(S, num_slots)
    classes = torch.full((5, S, num_slots), -100, dtype=torch.long)
    box = torch.zeros(S, num_slots, SL.SLOT_BOX_TERMS)
    for s, scene in enumerate(scenes):
        twins = synthetic.twin_facts(scene)
        for q, patch in enumerate(patches):
            r, c = divmod(patch, grid)
            px1, py1, px2, py2 = c / grid, r / grid, (c + 1) / grid, (r + 1) / grid
            which, best_area = None, 0.0
            for i, o in enumerate(scene.objects):
                x1, y1, x2, y2 = o.norm_box
                area = max(0.0, min(x2, px2) - max(x1, px1)) * max(0.0, min(y2, py2) - max(y1, py1))
                if area > 0 and area >= best_area:
                    which, best_area = i, area
            if which is None:
                continue
            best = scene.objects[which]
            cover[s, q] = 1.0
            count, place = twins[which]
            classes[:, s, q] = torch.tensor(
                [
                    colours.index(best.colour),
                    shapes.index(best.shape),
                    synthetic.SIZES.index(best.size),
                    min(count, SL.GROUP_CLASSES) - 1,
                    SL.PLACE_CLASSES.index(place),
                ]
            )
            cx, cy = (c + 0.5) / grid, (r + 0.5) / grid
            x1, y1, x2, y2 = best.norm_box
            box[s, q] = torch.tensor([x1 - cx, y1 - cy, x2 - cx, y2 - cy]) * grid
    return cover, classes, box


@pytest.mark.parametrize("split", ["train", "test", "compositional"])
@pytest.mark.parametrize(("grid", "num_slots"), [(8, 64), (4, 16), (8, 16)])
def test_slot_targets_equal_the_one_by_one_reference_bit_for_bit(split, grid, num_slots):
    # bit for bit, so that `kosmos2 train --recipe default` still repeats the shipped run
    scenes = [synthetic.make_scene(synthetic.scene_seed(split, 0, "slots", k), split) for k in range(60)]
    scenes.append(_scene_of())  # no objects at all
    targets = SL.slot_targets(scenes, grid, num_slots)
    cover, classes, box = _slot_targets_one_by_one(scenes, grid, num_slots)
    assert targets.cover.dtype == cover.dtype and torch.equal(targets.cover, cover)
    assert targets.box.dtype == box.dtype and torch.equal(targets.box, box)
    made = torch.stack([targets.colour, targets.shape, targets.size, targets.group, targets.place])
    assert made.dtype == classes.dtype and torch.equal(made, classes)
    assert int(cover.sum()) > 0


@torch.no_grad()
def test_slot_loss_reads_objectness_then_attributes_box_group_and_place():
    star = _scene_of(("star", "green", "small", (0.3, 0.0, 0.6, 0.2)))
    targets = SL.slot_targets([star], grid=4, num_slots=16)
    head = SL.build_slot_head(8)
    slots = torch.randn(1, 16, 8)
    out = head(slots)
    covered = targets.cover.bool()
    # columns by hand: objectness, colours, 6 shapes, 2 sizes, 4 box terms, 4 group sizes, 6 places
    k = 1 + len(synthetic.COLOURS) + 6 + 2 + 4
    expected = (
        F.binary_cross_entropy_with_logits(out[..., 0], targets.cover)
        + F.cross_entropy(out[..., 1 : 1 + len(synthetic.COLOURS)][covered], targets.colour[covered])
        + F.cross_entropy(out[..., k - 12 : k - 6][covered], targets.shape[covered])
        + F.cross_entropy(out[..., k - 6 : k - 4][covered], targets.size[covered])
        + (out[..., k - 4 : k][covered] - targets.box[covered]).abs().mean()
        + F.cross_entropy(out[..., k : k + 4][covered], targets.group[covered])
        + F.cross_entropy(out[..., k + 4 : k + 10][covered], targets.place[covered])
    )
    assert out.shape[-1] == k + 10
    assert float(SL.slot_loss(head, slots, targets)) == pytest.approx(float(expected), rel=1e-6)
    nothing = SL.slot_targets([_scene_of()], grid=4, num_slots=16)  # no object: objectness alone
    assert float(SL.slot_loss(head, slots, nothing)) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(out[..., 0], nothing.cover)), rel=1e-6
    )


def test_slot_report_by_hand():
    # the twins scene: three identical circles on slots 0-3 (group class 2), a lone square on slots 9, 10,
    # 13, 14 (class 0); the read-out is set by hand to read some of it wrong
    scene = _twins_scene()
    targets = SL.slot_targets([scene], grid=4, num_slots=16)
    covered = [0, 1, 2, 3, 9, 10, 13, 14]
    nc, ns = len(synthetic.COLOURS), len(synthetic.SHAPES)
    colour, shape, size, box, group, place = 1, 1 + nc, 1 + nc + ns, 3 + nc + ns, 7 + nc + ns, 11 + nc + ns
    out = torch.zeros(1, 16, SL.slot_columns()["place"].stop)
    out[0, :, 0] = -1.0
    out[0, [*covered, 5], 0] = 1.0  # slot 5 holds nothing: 15 of 16 right
    read_group = {0: 2, 1: 1, 2: 2, 3: 3, 9: 0, 10: 0, 13: 0, 14: 1}
    for q in covered:
        out[0, q, colour + (targets.colour[0, q] if q != 0 else (targets.colour[0, q] + 1) % nc)] = 5.0
        out[0, q, shape + targets.shape[0, q]] = 5.0
        out[0, q, size + (targets.size[0, q] if q < 4 else 1 - targets.size[0, q])] = 5.0  # square: wrong
        out[0, q, box : box + 4] = targets.box[0, q] + 0.5
        out[0, q, group + read_group[q]] = 5.0
        out[0, q, place + (targets.place[0, q] if q != 1 else (targets.place[0, q] + 1) % 6)] = 5.0
    report = SL.slot_report(out, targets)
    assert report["slots"] == 8
    assert report["objectness"] == pytest.approx(15 / 16)
    assert report["colour"] == pytest.approx(7 / 8) and report["shape"] == 1.0 and report["size"] == 0.5
    assert report["box_l1"] == pytest.approx(0.5)
    assert report["place"] == pytest.approx(7 / 8)
    # rows: true 1, 2, 3, 4+; columns: read
    assert report["group"] == [[3, 1, 0, 0], [0, 0, 0, 0], [0, 1, 2, 1], [0, 0, 0, 0]]
    assert report["group_recall"] == [0.75, None, 0.5, None]


def test_probe_slots_reads_a_runs_slot_head_on_held_out_scenes(finished_run, tmp_path):
    grouped = W.get_recipe("test", steps=2)
    W.train(grouped, tmp_path / "groups", progress=False)
    report = SL.probe_slots(tmp_path / "groups", scenes=6)
    scenes = [
        synthetic.make_scene(synthetic.scene_seed("test", synthetic.SPLIT_SEEDS["test"], "slots", i), "test")
        for i in range(6)
    ]
    model = W.build_model(grouped, Kosmos2Tokenizer.from_pretrained(tmp_path / "groups" / W.TOKENIZER_DIR))
    targets = SL.slot_targets(scenes, SL.patch_grid(model.config), model.config.latent_query_num)
    assert report["slots"] == int(targets.cover.sum()) > 0
    true_sizes = [int((targets.group == c).sum()) for c in range(SL.GROUP_CLASSES)]
    assert [sum(row) for row in report["group"]] == true_sizes
    assert all(0 <= report[k] <= 1 for k in ("objectness", "colour", "shape", "size", "place"))
    compositional = SL.probe_slots(finished_run, scenes=3, split="compositional")
    assert "colour" in compositional and "group" in compositional
    probe = ROOT / "tools" / "slot_probe.py"
    tool = subprocess.run(
        [sys.executable, str(probe), str(tmp_path / "groups"), "--scenes", "6", "--threads", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert tool.returncode == 0, tool.stderr
    assert f"{report['slots']} covered slots" in tool.stdout and "recall" in tool.stdout
    state = L.load_checkpoint(finished_run / L.CHECKPOINT_FILE)
    (tmp_path / "headless").mkdir()
    torch.save({**state, "heads": None}, tmp_path / "headless" / L.CHECKPOINT_FILE)
    for run, split, message in (
        (tmp_path / "headless", "test", "has no slot read-out"),
        (tmp_path / "nothing", "test", "no checkpoint.pt"),
        (finished_run, "train", "probe a held-out split"),
    ):
        with pytest.raises(ValueError, match=message):
            SL.probe_slots(run, scenes=2, split=split)
    with pytest.raises(ValueError, match="probe at least one scene"):
        SL.probe_slots(finished_run, scenes=0)


def test_the_slot_head_trains_but_is_not_exported(finished_run):
    state = L.load_checkpoint(finished_run / L.CHECKPOINT_FILE)
    assert state["heads"]["weight"].shape == (SL.slot_columns()["place"].stop, 64)
    log = [json.loads(line) for line in (finished_run / L.LOG_FILE).read_text().splitlines()]
    assert {"loss_lm", "loss_location", "loss_slots"} <= set(log[0])
    assert log[0]["loss"] == pytest.approx(log[0]["loss_lm"] + log[0]["loss_slots"], abs=1e-4)
    from safetensors import safe_open

    with safe_open(str(finished_run / L.MODEL_DIR / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    # the exported weights are the model's own (the tied output head is stored once, as the embedding)
    assert names == set(state["model"]) - {"text_model.lm_head.weight"}
    assert not any("slot" in n for n in names)


# ------------------------------------------------------------------------------------------------------------
# Training, checkpoints, resuming


def test_a_few_steps_lower_the_loss(finished_run, tokenizer):
    r = recipe()
    fresh = W.build_model(r, tokenizer).eval()
    trained = W.build_model(r, tokenizer)
    trained.load_state_dict(model_state(finished_run))
    trained.eval()
    held_out = B.make_batch(r, 100_000, tokenizer, 28, 64)  # a step the run never saw
    with torch.no_grad():
        before = float(W.compute_losses(fresh, held_out)["lm"])
        after = float(W.compute_losses(trained, held_out)["lm"])
    assert after < before - 0.5, (before, after)
    log = [json.loads(line) for line in (finished_run / L.LOG_FILE).read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, STEPS + 1))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"} <= set(log[0])
    assert log[-1]["loss"] < log[0]["loss"]


def _children(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux /proc), waiting up to 60 s for the first to appear."""
    deadline = time.monotonic() + 60
    while True:
        found = [
            int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.mark.parametrize("prefetch", ["off", "on", "thread"])
def test_killed_run_resumes_to_the_same_weights(finished_run, tmp_path, prefetch):
    """SIGKILL a `kosmos2 train` process mid-run, resume in this process: the weights equal an uninterrupted
    run's bit for bit. With --prefetch on the killed trainer's batch worker ends by itself; with thread the
    batch made ahead dies with the trainer and the resumed run makes it again."""
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "kosmos2.cli", "train", "--recipe", "test", "--steps", str(STEPS)]
    command += ["--out", str(out), "--eval-per-task", "0", "--no-progress", "--threads", "1"]
    command += ["--prefetch", prefetch]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = out / L.LOG_FILE
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            lines = log.read_text().splitlines() if log.exists() else []
            if len(lines) >= 5:  # step 5 logged: the checkpoint of step 4 exists, step 6 is under way
                break
            time.sleep(0.02)
        assert process.poll() is None, f"the run ended before it was killed: {process.stderr.read()!r}"
        children = _children(process.pid) if prefetch == "on" else []  # the batch worker and its helper
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert children or prefetch != "on", "kosmos2 train --prefetch on ran without its batch worker"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in children):
        time.sleep(0.1)
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()]
    assert not alive, f"the killed trainer left processes behind: {alive}"
    stopped_at = L.load_checkpoint(out / L.CHECKPOINT_FILE)["step"]
    assert 4 <= stopped_at < STEPS
    assert not (out / L.MODEL_DIR).exists()

    W.train(recipe(), out, progress=False)
    resumed, uninterrupted = model_state(out), model_state(finished_run)
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    (a,) = [o["state"] for o in L.load_checkpoint(out / L.CHECKPOINT_FILE)["optimizer"]]
    (b,) = [o["state"] for o in L.load_checkpoint(finished_run / L.CHECKPOINT_FILE)["optimizer"]]
    assert all(torch.equal(a[k]["exp_avg_sq"], b[k]["exp_avg_sq"]) for k in a)
    head_a = L.load_checkpoint(out / L.CHECKPOINT_FILE)["heads"]
    head_b = L.load_checkpoint(finished_run / L.CHECKPOINT_FILE)["heads"]
    assert head_a.keys() == head_b.keys() and all(torch.equal(head_a[k], head_b[k]) for k in head_a)
    assert (out / L.MODEL_DIR / "model.safetensors").read_bytes() == (
        finished_run / L.MODEL_DIR / "model.safetensors"
    ).read_bytes()
    # the log records the steps done before the kill and those redone after it
    steps = [json.loads(line)["step"] for line in (out / L.LOG_FILE).read_text().splitlines()]
    assert steps[-1] == STEPS and set(steps) == set(range(1, STEPS + 1))


def test_stop_after_then_resume_equals_one_run(finished_run, tmp_path):
    out = tmp_path / "stopped"
    W.train(recipe(), out, stop_after=5, progress=False)
    assert L.load_checkpoint(out / L.CHECKPOINT_FILE)["step"] == 5
    W.train(recipe(), out, progress=False)
    resumed, uninterrupted = model_state(out), model_state(finished_run)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_a_folder_of_another_recipe_is_refused(finished_run):
    with pytest.raises(ValueError, match=r"another recipe \(differs in \['lr'\]\).*new --out"):
        W.train(W.get_recipe("test", steps=STEPS, lr=1e-4), finished_run, progress=False)


def test_a_run_folder_from_before_a_recipe_field_existed_still_resumes(finished_run, tmp_path):
    # a recipe.json written before `grad_accum`, `freeze`, `vision_layers` and `text_layers` existed: they
    # read as their defaults, so the finished run is recognised as this recipe's (nothing to do) instead of
    # refused
    import shutil

    old = tmp_path / "old"
    shutil.copytree(finished_run, old)
    saved = json.loads((old / L.CONFIG_FILE).read_text())
    for name in ("grad_accum", "freeze", "vision_layers", "text_layers"):
        del saved[name]
    (old / L.CONFIG_FILE).write_text(json.dumps(saved))
    assert W.train(recipe(), old, progress=False) == old / "model"
    saved["lr"] = 1e-4  # a field that does differ is still named
    (old / L.CONFIG_FILE).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"another recipe \(differs in \['lr'\]\)"):
        W.train(recipe(), old, progress=False)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    L.save_checkpoint(path, {"format": L.CHECKPOINT_FORMAT, "step": 1})

    def dies_half_way(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # e.g. the process is interrupted while writing

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        L.save_checkpoint(path, {"format": L.CHECKPOINT_FORMAT, "step": 2})
    assert L.load_checkpoint(path)["step"] == 1  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable training checkpoint.*delete it"):
        L.load_checkpoint(path)
    monkeypatch.undo()
    L.save_checkpoint(path, {"format": 2, "step": 3})  # the synthetic trainer's, before the general loop
    with pytest.raises(ValueError, match="checkpoint of format 2, this kosmos2 reads format 3.*new --out"):
        L.load_checkpoint(path)
    L.save_checkpoint(path, {"step": 3})
    with pytest.raises(ValueError, match="not a kosmos2 training checkpoint"):
        L.load_checkpoint(path)


def test_progress_bar_shows_loss_speed_and_eta():
    import io

    stream = io.StringIO()
    bar = L.Progress(total=100, start=0, stream=stream, every=50)
    for step in range(50):
        bar.update(step, 1.2345, 2500.0)
    line = stream.getvalue().strip()
    assert line.startswith("step 50/100 [############............] loss 1.2345 2.5k tok/s ETA ")
    assert len(stream.getvalue().splitlines()) == 1  # not a terminal: one line every 50 steps


# ------------------------------------------------------------------------------------------------------------
# The exported model and the command line


def test_exported_model_loads_in_the_predictor(finished_run):
    from kosmos2.predictor import Predictor

    model_dir = finished_run / L.MODEL_DIR
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert {"tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"} <= names
    assert json.loads((model_dir / "generation_config.json").read_text())["no_repeat_ngram_size"] == 0
    predictor = Predictor.from_pretrained(model_dir)
    trained = W.build_model(recipe(), predictor.tokenizer)
    trained.load_state_dict(model_state(finished_run))
    for name, tensor in predictor.model.state_dict().items():
        assert torch.equal(tensor, trained.state_dict()[name]), name
    result = predictor.ground(synthetic.render(synthetic.make_scene(5)), max_new_tokens=4)
    assert isinstance(result.text, str)


def test_cli_train_and_its_errors(tmp_path, capsys):
    from kosmos2.cli import main

    assert (
        main(["train", "--recipe", "test", "--steps", "2", "--out", str(tmp_path), "--eval-per-task", "1"])
        == 0
    )
    out = capsys.readouterr().out
    assert f"model: {tmp_path / 'model'}" in out and "test: rec " in out and "compositional: rec " in out
    assert main(["train", "--recipe", "test", "--steps", "3", "--out", str(tmp_path)]) == 2
    assert "another recipe (differs in ['steps'])" in capsys.readouterr().err
    assert main(["train", "--recipe", "test", "--steps", "0", "--out", str(tmp_path / "x")]) == 2
    assert "steps must be a positive int" in capsys.readouterr().err
    assert main(["train", "--recipe", "test", "--set", "optimiser=muon", "--out", str(tmp_path / "x")]) == 2
    assert "recipe unknown fields ['optimiser']" in capsys.readouterr().err
    assert main(["train", "--recipe", "test", "--set", "muon", "--out", str(tmp_path / "x")]) == 2
    assert "--set 'muon': write FIELD=VALUE" in capsys.readouterr().err
    assert main(["train", "--recipe", "test", "--set", "lr=fast", "--out", str(tmp_path / "x")]) == 2
    assert "recipe lr must be float (like 0.003), got 'fast'" in capsys.readouterr().err
    assert parse_overrides(["lr=2e-3", "optimizer=muon", "betas=[0.9, 0.95]", 'mixture={"rec": 1}']) == {
        "lr": 2e-3,
        "optimizer": "muon",
        "betas": [0.9, 0.95],
        "mixture": {"rec": 1},
    }
    r = W.get_recipe("test", lr=1, betas=[0.9, 0.95], mixture={"rec": 1}, bf16=False)
    assert r.lr == 1.0 and isinstance(r.lr, float) and r.betas == (0.9, 0.95) and r.bf16 is False
    with pytest.raises(ValueError, match="recipe steps must be int"):
        W.get_recipe("test", steps=True)
    # training flushes denormal floats to zero on the CPU (speed) and gives the setting back afterwards
    assert float(torch.tensor([1e-40]) * 1.0) != 0.0
    if not torch.cuda.is_available():
        assert main(["train", "--recipe", "test", "--device", "cuda", "--out", str(tmp_path / "g")]) == 2
        err = capsys.readouterr().err
        assert "device cuda: this torch build sees no CUDA device; use --device cpu" in err


def test_a_batch_moves_to_a_device_whole(tokenizer):
    """`Batch.to` (training on a GPU) carries every tensor: pixels, each chunk, the shared prefix and the
    slot targets, and leaves the batch it was called on where it was."""
    r = recipe(samples_per_scene=3, share_prefix=True)
    batch = B.make_batch(r, 1, tokenizer, 28, 64, grid=4)
    moved = batch.to("meta")
    tensors = [moved.pixel_values, moved.prefix.input_ids, moved.prefix.image_mask]
    for chunk in moved.chunks:
        tensors += [chunk.input_ids, chunk.targets, chunk.image_mask, chunk.image_index, chunk.positions]
    tensors += [getattr(moved.slots, f.name) for f in dataclasses.fields(moved.slots)]
    assert all(t.device.type == "meta" for t in tensors)
    assert [c.input_ids.shape for c in moved.chunks] == [c.input_ids.shape for c in batch.chunks]
    assert moved.tasks == batch.tasks and moved.location_start == batch.location_start
    assert batch.pixel_values.device.type == "cpu" and batch.chunks[0].input_ids.device.type == "cpu"


# ------------------------------------------------------------------------------------------------------------
# Scores


class _Oracle:
    """Answers each query with the world's own target (found by its rendered image and prompt), as a
    Predictor result."""

    def __init__(self, samples):
        self.answers = {(synthetic.render(s["scene"]).tobytes(), s["prompt"]): s["target"] for s in samples}

    def ground(self, images, prompts, **options):
        from _eval_fixtures import predictor_result

        assert len(images) == len(prompts) and options == W.GENERATION
        return [
            predictor_result(prompt, self.answers[(image.tobytes(), prompt)])
            for image, prompt in zip(images, prompts, strict=True)
        ]


def test_world_scores_give_full_marks_to_the_world_itself():
    """The training-time check scores with kosmos2/eval/synthetic.py (one scorer): the world's own targets
    score 1 on every task."""
    tasks = ("rec", "grounded_caption", "reg", "vqa", "grounded_vqa", "phrase_grounding", "caption")
    oracle = _Oracle(synthetic.make_eval_set("test", 6, tasks=tasks))
    results = W.world_scores(oracle, "test", 6, tasks, batch_size=4)
    assert results["grounded_caption"]["precision"] == results["grounded_caption"]["recall"] == 1.0
    for task in ("rec", "vqa", "grounded_vqa"):
        assert results[task]["accuracy"] == 1.0 and results[task]["n"] == 6, task
    for task in ("reg", "caption"):
        assert results[task]["exact_match"] == 1.0, task
    assert results["phrase_grounding"]["R@1"] == 1.0
    text = W.format_quality("test", {t: results[t] for t in ("rec", "grounded_caption", "reg")})
    assert text == "test: rec 1.000, grounded_caption P 1.000 R 1.000, reg 1.000"


def test_shared_prefix_gives_the_same_loss_and_gradients(tokenizer):
    """Packing each scene's samples behind one image prefix (share_prefix) is the same computation as one
    row per sample: loss and gradients agree to float precision."""
    plain, shared = recipe(samples_per_scene=3), recipe(samples_per_scene=3, share_prefix=True)
    a = B.make_batch(plain, 3, tokenizer, 28, 64)
    b = B.make_batch(shared, 3, tokenizer, 28, 64)
    assert b.loss_tokens == a.loss_tokens
    assert b.prefix is not None and b.prefix.input_ids.shape[0] == b.pixel_values.shape[0]  # one per scene
    assert sum(c.input_ids.shape[0] for c in b.chunks) == sum(c.input_ids.shape[0] for c in a.chunks)
    assert b.tokens < a.tokens  # the prefixes are not repeated
    model = W.build_model(plain, tokenizer).eval()
    grads = []
    for batch in (a, b):
        model.zero_grad()
        loss = W.compute_losses(model, batch)["lm"]
        loss.backward()
        grads.append(
            (
                float(loss.detach()),
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            )
        )
    assert grads[1][0] == pytest.approx(grads[0][0], rel=1e-5)
    for name, g in grads[0][1].items():
        assert torch.allclose(grads[1][1][name], g, rtol=1e-3, atol=1e-6), name


def _whole_and_resumed_exports(r: W.Recipe, tmp_path: Path) -> tuple[dict, list[dict]]:
    """Train `r` uninterrupted and stopped after 2 steps then resumed; assert both export the same weights.
    Returns the exported tensors and the uninterrupted run's log records."""
    from safetensors.torch import load_file

    W.train(r, tmp_path / "whole", progress=False)
    W.train(r, tmp_path / "parts", stop_after=2, progress=False)
    W.train(r, tmp_path / "parts", progress=False)
    whole = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    parts = load_file(tmp_path / "parts" / "model" / "model.safetensors")
    assert whole.keys() == parts.keys()
    for name, tensor in whole.items():
        assert torch.equal(tensor, parts[name]), name
    log = [json.loads(line) for line in (tmp_path / "whole" / L.LOG_FILE).read_text().splitlines()]
    return whole, log


def test_update_ema_by_hand():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 3.0]]))
        model.bias.fill_(2.0)
    ema = {"weight": torch.zeros(1, 2), "bias": torch.tensor([4.0])}
    L.update_ema(ema, model, 0.75)  # 0.75 * old + 0.25 * new
    assert ema["weight"].tolist() == [[0.25, 0.75]] and ema["bias"].tolist() == [3.5]
    with pytest.raises(ValueError, match="ema_decay must be in"):
        recipe(ema_decay=1.0)


def test_ema_run_exports_the_average_and_resumes_to_the_same_weights(tmp_path):
    """With ema_decay the export is the moving average, worked out here from the weights after each step
    (runs of 1, 2 and 3 steps are the prefixes of one run); a stopped and resumed run exports the same."""
    from safetensors.torch import load_file

    r = W.get_recipe("test", ema_decay=0.6, steps=3, warmup_steps=4)
    whole, _ = _whole_and_resumed_exports(r, tmp_path)
    # the average by hand: the initial weights, then the weights after steps 1, 2, 3 (plain runs)
    plain = []
    for steps in (1, 2, 3):
        out = tmp_path / f"plain{steps}"
        W.train(W.get_recipe("test", steps=steps, warmup_steps=4), out, progress=False)
        plain.append(load_file(out / "model" / "model.safetensors"))
    # (steps 1-3 are all in the warm-up, so the three runs share their learning rates)
    start = W.build_model(r, Kosmos2Tokenizer.from_pretrained(tmp_path / "whole" / W.TOKENIZER_DIR))
    key = "text_model.model.layers.0.ffn.fc1.weight"
    average = start.state_dict()[key].clone().float()
    for step, weights in enumerate(plain):
        d = min(0.6, (1 + step) / (10 + step))
        average = d * average + (1 - d) * weights[key]
    assert torch.allclose(whole[key], average, atol=1e-6)
    assert not torch.allclose(whole[key], plain[-1][key], atol=1e-4)


def test_muon_takes_the_layers_matrices_and_adamw_the_rest(finished_run):
    """optimizer="muon": Muon gets exactly the attention, feed-forward and connector matrices (the names
    listed here, not the rule in train.py); AdamW keeps embeddings, latent queries, the patch convolution,
    norms and biases. One step by hand: AdamW's first step moves each entry by lr × g / (|g| + eps);
    Muon's moves a matrix along U Vᵀ of its gradient G = U S Vᵀ (orthogonalised), scaled to
    0.2 × sqrt(max side) × lr."""
    r = recipe(optimizer="muon", muon_lr=2e-3, lr=1e-3, weight_decay=0.0)
    model = W.build_model(r, Kosmos2Tokenizer.from_pretrained(finished_run / W.TOKENIZER_DIR))
    optimizer = O.make_optimizer(model, r)
    adamw, muon = optimizer.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    matrices = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight", "fc1.weight")
    matrices += ("fc2.weight", "dense.weight")
    named = dict(model.named_parameters())
    expected = {n for n in named if n.endswith(matrices)}
    by_id = {id(p): n for n, p in named.items()}
    assert {by_id[id(p)] for g in muon.param_groups for p in g["params"]} == expected
    assert {by_id[id(p)] for g in adamw.param_groups for p in g["params"]} == set(named) - expected
    layers = model.config.text.layers + model.config.vision.layers
    assert len(expected) == 6 * layers + 5  # 6 per layer; the connector's dense and q, k, v, out

    gen = torch.Generator().manual_seed(0)
    before = {n: p.detach().clone() for n, p in named.items()}
    for p in named.values():
        p.grad = torch.randn(p.shape, generator=gen)
    optimizer.set_lr(1.0)
    optimizer.step()
    embed = "text_model.model.embed_tokens.weight"
    moved = before[embed] - named[embed].detach()
    grad = named[embed].grad
    assert torch.allclose(moved, 1e-3 * grad / (grad.abs() + r.eps), atol=1e-8)
    fc1 = "text_model.model.layers.0.ffn.fc1.weight"
    moved = before[fc1] - named[fc1].detach()
    u, _, vh = torch.linalg.svd(named[fc1].grad, full_matrices=False)
    scale = 2e-3 * 0.2 * max(moved.shape) ** 0.5
    direction = F.cosine_similarity((u @ vh).flatten(), moved.flatten(), dim=0)
    assert direction > 0.9
    singular = torch.linalg.svdvals(moved / scale)
    assert 0.3 < float(singular.min()) and float(singular.max()) < 1.6
    with pytest.raises(ValueError, match="recipe optimizer 'sgd'"):
        recipe(optimizer="sgd")
    with pytest.raises(ValueError, match="muon_lr must be > 0"):
        recipe(optimizer="muon", muon_lr=0.0)


def test_muon_run_resumes_to_the_same_weights(tmp_path):
    """A Muon run keeps both optimizers' states in its checkpoint: stopped and resumed, it exports the same
    weights as an uninterrupted run, and those differ from the AdamW run's."""
    from safetensors.torch import load_file

    r = W.get_recipe("test", optimizer="muon", steps=3)
    whole, log = _whole_and_resumed_exports(r, tmp_path)
    assert all(math.isfinite(record["loss"]) for record in log)
    states = L.load_checkpoint(tmp_path / "whole" / L.CHECKPOINT_FILE)["optimizer"]
    assert len(states) == 2 and all("momentum_buffer" in s for s in states[1]["state"].values())
    W.train(W.get_recipe("test", steps=3), tmp_path / "adamw", progress=False)
    adamw = load_file(tmp_path / "adamw" / "model" / "model.safetensors")
    key = "text_model.model.layers.0.ffn.fc1.weight"
    assert not torch.allclose(whole[key], adamw[key])


def test_kosmos2_train_asks_torch_for_huge_pages_unless_told_otherwise():
    code = (
        "import os, sys\n"
        "from kosmos2.train import cli as T\n"
        "print(T.use_huge_pages(), os.environ.get('THP_MEM_ALLOC_ENABLE'), 'torch' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}

    def run(env: dict[str, str], first: str = "") -> list[str]:
        done = subprocess.run([sys.executable, "-c", first + code], env=env, capture_output=True, text=True)
        return done.stdout.split()

    assert run(env) == ["True", "1", "False"]
    assert run({**env, "THP_MEM_ALLOC_ENABLE": "0"}) == ["False", "0", "False"]
    assert run(env, first="import torch\n") == ["False", "None", "True"]


def test_forward_shared_equals_each_sample_in_its_own_row():
    """Samples continuing a shared image prefix (right-padded chunks, the prefix run once) get the hidden
    states they get as whole rows of their own through the model's one forward path, prefix included; in
    training with gradient checkpointing too."""
    config = tiny_config()
    config.text.dropout = config.text.attention_dropout = 0.0  # deterministic in train mode
    model = random_model(config, seed=9)
    decoder = model.text_model.model
    row, mask = image_prompt([GROUNDING, 10, 20, 30])
    P = max(i for i, m in enumerate(mask) if m) + 2  # through </image>
    prefix = torch.tensor([row[:P], row[:P]])
    prefix_mask = torch.tensor([mask[:P], mask[:P]])
    tails = [[GROUNDING, 10, 20], [11, 12, 13, 14, 15, EOS], [GROUNDING, 30], [40, 41, 42, EOS]]
    scenes = [0, 1, 1, 0]
    chunks = [[0, 2], [1, 3]]  # each chunk right-padded to its longest tail
    samples = []
    for chunk in chunks:
        n = max(len(tails[i]) for i in chunk)
        ids = torch.full((len(chunk), n), PAD)
        positions = torch.ones((len(chunk), n), dtype=torch.long)
        for r, i in enumerate(chunk):
            ids[r, : len(tails[i])] = torch.tensor(tails[i])
            positions[r, : len(tails[i])] = torch.arange(P + 2, P + 2 + len(tails[i]))
        samples.append((ids, positions, torch.tensor([scenes[i] for i in chunk])))
    size = config.vision.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds = model.encode_image(pixels)
        shared, hidden = shared_prefix.forward_shared(decoder, prefix, embeds, prefix_mask, samples)
        for chunk, h in zip(chunks, hidden, strict=True):
            for r, i in enumerate(chunk):
                ids = torch.tensor([row[:P] + tails[i]])
                image_mask = torch.tensor([mask[:P] + [False] * len(tails[i])])
                alone = decoder(ids, make_positions(ids), None, embeds[scenes[i]][None], image_mask)
                assert (h[r, : len(tails[i])] - alone[0, P:]).abs().max() <= 1e-5
                assert (shared[scenes[i]] - alone[0, :P]).abs().max() <= 1e-5
        # without the prefix's states the last block skips its queries and MLP: the samples' states are the
        # same
        none, alone = shared_prefix.forward_shared(
            decoder, prefix, embeds, prefix_mask, samples, prefix_out=False
        )
        assert none is None
        for a, b in zip(hidden, alone, strict=True):
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-6
    decoder.gradient_checkpointing = True
    model.train()
    again = shared_prefix.forward_shared(decoder, prefix, embeds, prefix_mask, samples)
    for a, b in zip([shared, *hidden], [again[0], *again[1]], strict=True):
        assert (a - b.detach()).abs().max() <= 1e-6


def test_world_metrics_flatten_the_headline_numbers():
    results = {
        "rec": {"accuracy": 0.5, "n": 2},
        "grounded_caption": {"precision": 0.25, "recall": 0.75, "n": 2},
        "reg": {"exact_match": 1.0, "n": 2},
    }
    assert W.world_metrics(results) == {
        "rec": 0.5,
        "grounded_caption_p": 0.25,
        "grounded_caption_r": 0.75,
        "reg": 1.0,
    }


def test_a_run_evaluates_on_the_world_and_keeps_the_best(tmp_path):
    """eval_every: the loop scores the model on held-out test queries (kosmos2/eval/synthetic.py) and logs
    it; best_metric keeps the best model in OUT/best, loadable by the Predictor."""
    from kosmos2.predictor import Predictor

    r = W.get_recipe("test", steps=4, eval_every=2, eval_queries=2, best_metric="grounded_caption_r")
    out = tmp_path / "eval"
    W.train(r, out, progress=False)
    evals = [json.loads(line) for line in (out / L.LOG_FILE).read_text().splitlines() if '"eval"' in line]
    assert [e["step"] for e in evals] == [2, 4]
    assert set(evals[0]["eval"]) == {"rec", "grounded_caption_p", "grounded_caption_r", "reg", "vqa"}
    best = L.load_checkpoint(out / L.CHECKPOINT_FILE)["best"]
    assert best["metric"] == "grounded_caption_r" and best["step"] in (2, 4)
    assert Predictor.from_pretrained(out / L.BEST_DIR).num_image_tokens == 64


def test_the_default_recipe_exports_the_shipped_generation_config_byte_for_byte():
    # the shipped folder (kosmos2/assets/default) is the reference: its generation_config.json states the
    # decoding and the tasks the default model knows; an export of the default recipe must write those bytes
    from kosmos2.train.export import generation_json
    from kosmos2.train.recipes.synthetic import generation_settings

    asset = Path(__file__).parents[1] / "kosmos2" / "assets" / "default"
    shipped = (asset / "generation_config.json").read_bytes()
    written = generation_json(generation_settings(W.get_recipe("default"))).encode()
    assert written == shipped


def test_a_mixture_can_hold_absent_and_ambiguous_queries_and_the_export_says_so():
    r = W.get_recipe("test", mixture={"rec": 1, "rec_absent": 1, "rec_ambiguous": 1}, scenes_per_step=8)
    tasks = [s["task"] for _, samples in B.batch_samples(r, 0) for s in samples]
    assert {"rec_absent", "rec_ambiguous"} <= set(tasks)
    # the query tasks follow the world's seven in kosmos2_tasks; the default recipe lists only the seven
    assert W.generation_settings(r)["kosmos2_tasks"] == ["rec", "rec_absent", "rec_ambiguous"]
    assert "rec_absent" not in W.generation_settings(W.get_recipe("default"))["kosmos2_tasks"]
    trust = W.get_recipe("trust")
    assert trust.mixture["rec_absent"] > 0 and trust.mixture["rec_ambiguous"] > 0 and trust.init_from
    with pytest.raises(ValueError, match="mixture"):
        W.get_recipe("test", mixture={"rec_unknown": 1})


def test_init_from_continues_a_model_folder_with_its_tokenizer_and_weights(finished_run, tmp_path):
    start = finished_run / "model"
    # learning rates too small to move a float32 weight: the continued run exports the weights it loaded
    r = W.get_recipe("test", init_from=str(start), steps=1, lr=1e-20, warmup_steps=0, seed=5)
    out = W.train(r, tmp_path / "continued", progress=False)
    assert (out / "tokenizer.json").read_bytes() == (start / "tokenizer.json").read_bytes()
    assert (out / "config.json").read_bytes() == (start / "config.json").read_bytes()
    from safetensors.torch import load_file

    before, after = load_file(start / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-6, msg=name)
    # a fresh model of the same recipe is far from it: the weights did come from the folder
    fresh = W.train(
        W.get_recipe("test", steps=1, lr=1e-20, warmup_steps=0), tmp_path / "fresh", progress=False
    )
    fresh_state = load_file(fresh / "model.safetensors")
    assert any(not torch.allclose(fresh_state[n], before[n]) for n in before)


def test_init_from_must_name_a_model_folder(tmp_path):
    with pytest.raises(
        ValueError, match=r"init_from .*not a model folder \(no config.json, tokenizer.json\)"
    ):
        W.get_recipe("test", init_from=str(tmp_path))
