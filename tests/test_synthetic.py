"""Tests for kosmos2.data.synthetic, the synthetic grounded world.

The checks do not reuse the module's own logic: referring expressions and questions are parsed back from their
words and evaluated on the scene with the meaning written in the module docstring; markup is read back with
kosmos2.grounding.parse and its location tokens are compared with the SPEC §4 formula worked out here; pixels
are compared with boxes by looking at the rendered picture.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections import Counter
from itertools import islice

import numpy as np
import pytest
from PIL import Image

from kosmos2 import grounding
from kosmos2.data import synthetic as S

SHAPE_WORDS = ("circle", "square", "triangle", "diamond", "star", "cross")
PLURAL_WORDS = {"circles": "circle", "squares": "square", "triangles": "triangle", "diamonds": "diamond"}
PLURAL_WORDS |= {"stars": "star", "crosses": "cross", "objects": "object"}
COLOUR_WORDS = ("red", "orange", "yellow", "green", "blue", "purple")
HELD_OUT = {("circle", "blue"), ("square", "yellow"), ("triangle", "purple")}
HELD_OUT |= {("diamond", "red"), ("star", "green"), ("cross", "orange")}
COUNTS = {"a": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}

DESC = (
    r"(?:(small|large) )?(?:(red|orange|yellow|green|blue|purple) )?"
    r"(circle|square|triangle|diamond|star|cross|object)"
)
EXPRESSION = re.compile(
    rf"^the {DESC}(?: (on the left|on the right|at the top|at the bottom)"
    rf"| (left of|right of|above|below) the {DESC})?$"
)


# ------------------------------------------------------------------------------------------------------------
# An independent reading of the world's words


def cells(box):
    """SPEC §4: (upper-left, lower-right) cell indices of a normalised box on the 32×32 grid."""
    col1, row1 = math.floor(box[0] * 32), math.floor(box[1] * 32)
    col2, row2 = math.ceil(box[2] * 32 - 1), math.ceil(box[3] * 32 - 1)
    col1, row1, col2, row2 = (min(max(v, 0), 31) for v in (col1, row1, col2, row2))
    return row1 * 32 + col1, row2 * 32 + col2


def object_cells(text):
    """The (ul, lr) pairs of every <object>…</object> in text, read with a regex (one list per object)."""
    out = []
    for body in re.findall(r"<object>(.*?)</object>", text):
        pairs = body.split("</delimiter_of_multi_objects/>")
        out.append(
            [
                tuple(int(v) for v in re.fullmatch(r"<patch_index_(\d+)><patch_index_(\d+)>", p).groups())
                for p in pairs
            ]
        )
    return out


def geometry(o):
    x1, y1, x2, y2 = o.norm_box
    return (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1


def fits(o, size, colour, shape):
    return (
        (size is None or o.size == size)
        and (colour is None or o.colour == colour)
        and shape in (None, "object", o.shape)
    )


def relation(a, b, rel):
    """'true' / 'false' / 'undecided' for "a rel b", as the module docstring defines it."""
    ax, ay, aw, ah = geometry(a)
    bx, by, bw, bh = geometry(b)
    if rel in ("left of", "right of"):
        gap = bx - ax if rel == "left of" else ax - bx
        across, scale = abs(ay - by), (aw + bw) / 2
    else:
        gap = by - ay if rel == "above" else ay - by
        across, scale = abs(ax - bx), (ah + bh) / 2
    if gap >= S.REL_TRUE * scale and gap > across:
        return "true"
    if gap <= S.REL_FALSE * scale:
        return "false"
    return "undecided"


def region(o):
    cx, cy, _, _ = geometry(o)

    def third(v, names):
        for k, name in enumerate(names):
            low, high = k / 3, (k + 1) / 3
            if (k == 0 or v > low + S.REGION_MARGIN) and (k == 2 or v < high - S.REGION_MARGIN):
                return name
        return None

    col, row = third(cx, ("left", "", "right")), third(cy, ("top", "", "bottom"))
    if col is None or row is None:
        return None
    return f"{row} {col}".strip() or "center"


def resolve(scene, expression):
    """Indices of the objects the expression picks out; asserts no candidate is left undecided."""
    m = EXPRESSION.match(expression)
    assert m, f"expression outside the grammar: {expression!r}"
    size, colour, shape, where, rel, lsize, lcolour, lshape = m.groups()
    objects = scene.objects
    candidates = [i for i, o in enumerate(objects) if fits(o, size, colour, shape)]
    if where:
        assert len(candidates) >= 2, expression
        axis, sign = {
            "on the left": (0, 1),
            "on the right": (0, -1),
            "at the top": (1, 1),
            "at the bottom": (1, -1),
        }[where]
        key = [sign * geometry(o)[axis] for o in objects]
        return [
            i for i in candidates if all(key[j] - key[i] >= S.EXTREME_MARGIN for j in candidates if j != i)
        ]
    if rel:
        landmarks = [j for j, o in enumerate(objects) if fits(o, lsize, lcolour, lshape)]
        assert len(landmarks) == 1, f"landmark of {expression!r} is not unique"
        (j,) = landmarks
        values = {i: relation(objects[i], objects[j], rel) for i in candidates if i != j}
        assert "undecided" not in values.values(), expression
        return [i for i, v in values.items() if v == "true"]
    return candidates


def index_of_box(scene, box):
    found = [i for i, o in enumerate(scene.objects) if o.norm_box == tuple(box)]
    assert len(found) == 1
    return found[0]


# ------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def test_set():
    return S.make_eval_set("test", 150)


@pytest.fixture(scope="module")
def compositional_set():
    return S.make_eval_set("compositional", 150)


def by_task(samples, task):
    out = [s for s in samples if s["task"] == task]
    assert out
    return out


# ------------------------------------------------------------------------------------------------------------
# Determinism and splits


def test_scenes_samples_and_pictures_are_determined_by_the_seed():
    assert S.make_scene(1234) == S.make_scene(1234)
    assert S.make_scene(1234) != S.make_scene(1235)
    first = [(s["task"], s["prompt"], s["target"], s["scene"]) for s in islice(S.iter_samples(seed=7), 100)]
    again = [(s["task"], s["prompt"], s["target"], s["scene"]) for s in islice(S.iter_samples(seed=7), 100)]
    other = [(s["task"], s["prompt"], s["target"], s["scene"]) for s in islice(S.iter_samples(seed=8), 100)]
    assert first == again
    assert first != other
    scene = first[0][3]
    assert np.array_equal(np.asarray(S.render(scene, 112)), np.asarray(S.render(scene, 112)))
    a = S.make_eval_set("compositional", 20)
    b = S.make_eval_set("compositional", 20)
    assert [(s["prompt"], s["target"]) for s in a] == [(s["prompt"], s["target"]) for s in b]
    assert S.corpus(50) == S.corpus(50)


def test_eval_sets_have_the_requested_size_on_distinct_scenes_apart_from_train():
    samples = S.make_eval_set("test", 1000, tasks=["rec", "vqa"])
    assert Counter(s["task"] for s in samples) == {"rec": 1000, "vqa": 1000}
    assert len({s["scene_id"] for s in samples}) == 2000
    train_ids = {s["scene_id"] for s in islice(S.iter_samples("train", seed=0), 3000)}
    assert not train_ids & {s["scene_id"] for s in samples}
    # the splits' fixed seeds: the default equals the explicit one, another seed gives another set
    assert S.make_eval_set("test", 5, tasks=["rec"]) == S.make_eval_set("test", 5, tasks=["rec"], seed=1)
    assert S.make_eval_set("test", 5, tasks=["rec"], seed=99) != S.make_eval_set("test", 5, tasks=["rec"])


def test_train_and_test_never_show_a_held_out_pair():
    assert set(S.HELD_OUT_PAIRS) == HELD_OUT
    # each shape and each colour is held out exactly once
    assert sorted(p[0] for p in HELD_OUT) == sorted(SHAPE_WORDS)
    assert sorted(p[1] for p in HELD_OUT) == sorted(COLOUR_WORDS)
    seen = set()
    for sample in islice(S.iter_samples("train", seed=3), 3000):
        pairs = {(o.shape, o.colour) for o in sample["scene"].objects}
        assert not pairs & HELD_OUT, sample["scene"]
        seen |= pairs
    for sample in S.make_eval_set("test", 100):
        assert not {(o.shape, o.colour) for o in sample["scene"].objects} & HELD_OUT
    # and every other pair does occur in training
    assert seen == {(s, c) for s in SHAPE_WORDS for c in COLOUR_WORDS} - HELD_OUT


def test_compositional_queries_target_held_out_pairs(compositional_set):
    for sample in compositional_set:
        scene = sample["scene"]
        assert scene.split == "compositional"
        assert {(o.shape, o.colour) for o in scene.objects} & HELD_OUT
        if sample["task"] in ("rec", "reg", "grounded_vqa"):
            o = scene.objects[index_of_box(scene, sample["boxes"][0])]
            assert (o.shape, o.colour) in HELD_OUT
        if sample["task"] == "rec":  # the expression names the held-out pair itself
            size, colour, shape = EXPRESSION.match(sample["expression"]).groups()[:3]
            assert (shape, colour) in HELD_OUT, sample["expression"]
        if sample["task"] == "phrase_grounding":
            words = sample["expression"].split()
            assert (PLURAL_WORDS.get(words[-1], words[-1]), words[-2]) in HELD_OUT
    rec = by_task(compositional_set, "rec")
    assert (
        len(
            {
                (o.shape, o.colour)
                for s in rec
                for o in [s["scene"].objects[index_of_box(s["scene"], s["boxes"][0])]]
            }
        )
        == 6
    )


# ------------------------------------------------------------------------------------------------------------
# Every target reads back, through kosmos2.grounding.parse, to the boxes the scene says


@pytest.mark.parametrize("split", ["test", "compositional"])
def test_rec_targets_parse_to_the_one_object_the_expression_picks(split, test_set, compositional_set):
    samples = by_task(test_set if split == "test" else compositional_set, "rec")
    for sample in samples:
        scene, expression = sample["scene"], sample["expression"]
        assert sample["prompt"] == f"<grounding><phrase> {expression}</phrase>"
        parsed = grounding.parse(sample["prompt"] + sample["target"])
        assert [e.phrase for e in parsed.entities] == [expression]
        assert object_cells(sample["target"]) == [[cells(sample["boxes"][0])]]
        assert resolve(scene, expression) == [index_of_box(scene, sample["boxes"][0])], expression
        # the decoded box is the object's box up to the grid
        (box,) = parsed.entities[0].boxes
        assert grounding.iou(box, sample["boxes"][0]) > 0.5
    forms = Counter(s["form"] for s in samples)
    if split == "test":
        assert set(forms) == {"attributes", "extreme", "relation"}


def test_rec_expressions_are_unique_over_many_training_samples():
    count = 0
    for sample in islice(S.iter_samples("train", seed=11, tasks=["rec"]), 1500):
        assert resolve(sample["scene"], sample["expression"]) == [
            index_of_box(sample["scene"], sample["boxes"][0])
        ]
        count += 1
    assert count == 1500


@pytest.mark.parametrize("grounded", [True, False])
def test_captions_list_every_object_once_with_its_boxes(grounded, test_set):
    for sample in by_task(test_set, "grounded_caption" if grounded else "caption"):
        scene = sample["scene"]
        if grounded:
            assert sample["prompt"] == "<grounding>An image of"
            parsed = grounding.parse(sample["prompt"] + sample["target"])
            assert sample["target"].startswith("<phrase> ")
            entities = [(e.phrase, e.boxes) for e in parsed.entities]
            tokens = object_cells(sample["target"])
        else:
            assert sample["prompt"] == "An image of" and "<" not in sample["target"]
            parsed = grounding.parse(sample["prompt"] + sample["target"])
            assert parsed.entities == []
            entities = [(phrase, boxes) for phrase, boxes in sample["entities"]]
            tokens = [[cells(b) for b in boxes] for _, boxes in entities]
        assert parsed.caption == sample["answer"]
        caption = parsed.caption
        assert caption.startswith("An image of ") and caption.endswith(".")
        assert [p for p, _ in entities] == [p for p, _ in sample["entities"]]
        covered = []
        lefts = []
        for (phrase, _), pairs in zip(entities, tokens, strict=True):
            article, size, colour, noun = phrase.split()
            n = COUNTS[article]
            shape = noun if n == 1 else PLURAL_WORDS[noun]
            members = [
                i for i, o in enumerate(scene.objects) if (o.size, o.colour, o.shape) == (size, colour, shape)
            ]
            assert len(members) == n, phrase
            assert sorted(pairs) == sorted(cells(scene.objects[i].norm_box) for i in members)
            covered += members
            lefts.append(min(geometry(scene.objects[i])[0] for i in members))
        assert sorted(covered) == list(range(len(scene.objects)))
        assert lefts == sorted(lefts)  # groups left to right
        assert sorted(sample["boxes"]) == sorted(scene.boxes)


def test_grit_records_index_their_caption():
    for scene_id in range(200):
        scene = S.make_scene(scene_id)
        record = S.grit_record(scene)
        assert record["width"] == scene.width and record["height"] == scene.height
        assert record["ref_exps"] == record["noun_chunks"]
        boxes = []
        for start, end, *box, score in record["noun_chunks"]:
            phrase = record["caption"][start:end]
            assert phrase == phrase.strip() and phrase.split()[0] in COUNTS
            assert score == 1.0
            boxes.append(tuple(box))
        assert sorted(boxes) == sorted(scene.boxes)


def test_phrase_grounding_targets_give_the_phrase_group(test_set):
    for sample in by_task(test_set, "phrase_grounding"):
        scene = sample["scene"]
        parsed = grounding.parse(sample["prompt"] + sample["target"])
        assert parsed.entities[-1].phrase == sample["expression"]
        caption = S.build_sample(scene, "caption")["answer"]
        assert caption.startswith(parsed.caption)  # the prompt is the caption up to the phrase
        article, size, colour, noun = sample["expression"].split()
        shape = noun if COUNTS[article] == 1 else PLURAL_WORDS[noun]
        members = [o for o in scene.objects if (o.size, o.colour, o.shape) == (size, colour, shape)]
        assert len(members) == COUNTS[article]
        assert sorted(object_cells(sample["target"])[0]) == sorted(cells(o.norm_box) for o in members)


def test_reg_prompts_carry_the_box_and_targets_name_it(test_set):
    for sample in by_task(test_set, "reg"):
        scene = sample["scene"]
        box = sample["boxes"][0]
        assert re.fullmatch(
            r"<phrase> It</phrase><object><patch_index_\d{4}><patch_index_\d{4}></object> is",
            sample["prompt"],
        )
        assert object_cells(sample["prompt"]) == [[cells(box)]]
        assert sample["target"] == " " + sample["expression"]
        i = index_of_box(scene, box)
        o = scene.objects[i]
        assert sample["expression"].startswith(f"the {o.size} {o.colour} {o.shape}")
        assert resolve(scene, sample["expression"]) == [i]


def test_twin_facts_count_look_alikes_and_give_the_reg_suffix(test_set):
    for sample in by_task(test_set, "reg"):
        scene = sample["scene"]
        i = index_of_box(scene, sample["boxes"][0])
        o = scene.objects[i]
        count, place = S.twin_facts(scene)[i]
        assert count == sum((p.size, p.colour, p.shape) == (o.size, o.colour, o.shape) for p in scene.objects)
        suffix = sample["expression"][len(f"the {o.size} {o.colour} {o.shape}") :].strip()
        assert place == suffix and (count == 1) == (suffix == "")


def test_vqa_answers_follow_from_the_scene(test_set, compositional_set):
    kinds = Counter()
    for sample in by_task(test_set, "vqa") + by_task(compositional_set, "vqa"):
        scene = sample["scene"]
        assert "<" not in sample["prompt"] + sample["target"]
        question = re.fullmatch(r"Question: (.*) Answer:", sample["prompt"]).group(1)
        assert sample["target"] == " " + sample["answer"]
        answer = sample["answer"]
        if m := re.fullmatch(
            rf"How many (?:(small|large) )?(?:({'|'.join(COLOUR_WORDS)}) )?(\w+) are there\?", question
        ):
            kinds["count"] += 1
            expected = sum(fits(o, m[1], m[2], PLURAL_WORDS[m[3]]) for o in scene.objects)
            assert answer == str(expected)
        elif m := re.fullmatch(rf"Is there an? {DESC}\?", question):
            kinds["exists"] += 1
            assert answer == ("yes" if any(fits(o, *m.groups()) for o in scene.objects) else "no")
        else:
            kind, expression = re.fullmatch(
                r"(What color is|What shape is|What size is|Where is) (.*)\?", question
            ).groups()
            kinds[kind] += 1
            (i,) = resolve(scene, expression)
            o = scene.objects[i]
            expected = {
                "What color is": o.colour,
                "What shape is": o.shape,
                "What size is": o.size,
                "Where is": region(o),
            }
            assert answer == expected[kind]
    assert len(kinds) == 6, kinds


def test_grounded_vqa_asks_about_the_boxed_object(test_set):
    for sample in by_task(test_set, "grounded_vqa"):
        scene = sample["scene"]
        assert sample["prompt"].startswith("<grounding> Question: ") and sample["prompt"].endswith(" Answer:")
        parsed = grounding.parse(sample["prompt"])
        assert [e.phrase for e in parsed.entities] == ["this object"]
        assert object_cells(sample["prompt"]) == [[cells(sample["boxes"][0])]]
        o = scene.objects[index_of_box(scene, sample["boxes"][0])]
        question = parsed.caption
        expected = {
            "Question: What color is this object? Answer:": o.colour,
            "Question: What shape is this object? Answer:": o.shape,
            "Question: What size is this object? Answer:": o.size,
            "Question: Where is this object? Answer:": region(o),
        }[question]
        assert sample["target"] == " " + expected == " " + sample["answer"]


# ------------------------------------------------------------------------------------------------------------
# Scenes and pictures


def test_boxes_lie_inside_the_image_and_respect_the_overlap_rule():
    overlapping = 0
    for scene_id in range(2000):
        scene = S.make_scene(scene_id)
        assert 1 <= len(scene.objects) <= 6
        for o in scene.objects:
            x1, y1, x2, y2 = o.box
            assert 0 <= x1 < x2 <= scene.width and 0 <= y1 < y2 <= scene.height
            assert all(0 <= v <= 1 for v in o.norm_box)
            assert o.norm_box == pytest.approx(
                (x1 / scene.width, y1 / scene.height, x2 / scene.width, y2 / scene.height)
            )
            side = (x2 - x1) / math.sqrt(scene.width * scene.height)
            assert 0.14 <= side <= 0.20 if o.size == "small" else 0.28 <= side <= 0.36
        for a in range(len(scene.objects)):
            for b in range(a):
                p, q = scene.objects[a].box, scene.objects[b].box
                inter = max(0, min(p[2], q[2]) - max(p[0], q[0])) * max(0, min(p[3], q[3]) - max(p[1], q[1]))
                smaller = min((p[2] - p[0]) * (p[3] - p[1]), (q[2] - q[0]) * (q[3] - q[1]))
                assert inter <= 0.3 * smaller + 1e-9
                overlapping += inter > 0
    assert overlapping > 50


def test_scenes_vary_in_every_attribute():
    scenes = [S.make_scene(i) for i in range(1500)]
    objects = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objects} == set(SHAPE_WORDS)
    assert {o.colour for o in objects} == set(COLOUR_WORDS)
    assert {o.size for o in objects} == {"small", "large"}
    assert {s.background.kind for s in scenes} == set(S.BACKGROUND_KINDS)
    assert {len(s.objects) for s in scenes} == {1, 2, 3, 4, 5, 6}
    aspects = [s.width / s.height for s in scenes]
    assert min(aspects) < 0.7 and max(aspects) > 1.4
    assert len({(s.width, s.height) for s in scenes}) > 1000
    # look-alikes: scenes with identical twins (counts) and with objects sharing colour but not shape
    twins = sum(len({(o.size, o.colour, o.shape) for o in s.objects}) < len(s.objects) for s in scenes)
    distractors = sum(
        any(a.colour == b.colour and a.shape != b.shape for a in s.objects for b in s.objects) for s in scenes
    )
    assert twins > 200 and distractors > 300


def test_render_sizes():
    scene = S.make_scene(5)
    assert S.render(scene).size == (scene.width, scene.height)
    assert S.render(scene, 112).size == (112, 112)
    assert S.render(scene, (200, 150), supersample=1).size == (200, 150)
    assert S.render(scene).mode == "RGB"


def single_object_scene(shape, width=120, height=90, box=(10.0, 20.0, 50.0, 60.0)):
    flat = S.Background("flat", (128, 128, 128), (128, 128, 128), 10.0, 0.0, 0.0, 0)
    norm = (box[0] / width, box[1] / height, box[2] / width, box[3] / height)
    o = S.SceneObject(shape, "red", "large", (220, 35, 35), box, norm)
    return S.Scene(0, "train", width, height, flat, (o,))


@pytest.mark.parametrize("shape", SHAPE_WORDS)
@pytest.mark.parametrize("size", [None, (240, 240)])
def test_drawn_pixels_fill_the_box(shape, size):
    scene = single_object_scene(shape)
    image = np.asarray(S.render(scene, size)).astype(int)
    h, w = image.shape[:2]
    red = (image[..., 0] > 150) & (image[..., 1] < 100)  # pixels mostly object colour
    ys, xs = np.nonzero(red)
    sx, sy = w / scene.width, h / scene.height
    x1, y1, x2, y2 = scene.objects[0].box
    # the tight box of the drawn pixels is the object's box, to about a pixel
    assert abs(xs.min() - x1 * sx) <= 1.5 and abs(xs.max() + 1 - x2 * sx) <= 1.5
    assert abs(ys.min() - y1 * sy) <= 1.5 and abs(ys.max() + 1 - y2 * sy) <= 1.5
    assert tuple(image[int((y1 + y2) / 2 * sy), int((x1 + x2) / 2 * sx)]) == (220, 35, 35)  # filled centre
    outside = np.ones_like(red)
    outside[int(y1 * sy) : int(math.ceil(y2 * sy)), int(x1 * sx) : int(math.ceil(x2 * sx))] = False
    assert (image[outside] == 128).all()  # untouched background elsewhere


def test_rendering_small_is_resizing_the_native_picture():
    scene = S.make_scene(21)
    flat = S.Background("flat", (90, 95, 100), (90, 95, 100), 10.0, 0.0, 0.0, 0)
    scene = S.Scene(scene.scene_id, "train", scene.width, scene.height, flat, scene.objects)
    direct = np.asarray(S.render(scene, 112)).astype(float)
    resized = np.asarray(S.render(scene, supersample=1).resize((112, 112), Image.Resampling.BICUBIC)).astype(
        float
    )
    assert np.abs(direct - resized).mean() < 4.0


def test_backgrounds_are_never_object_coloured():
    for scene_id in range(60):
        scene = S.make_scene(scene_id)
        empty = S.Scene(scene.scene_id, "train", scene.width, scene.height, scene.background, ())
        pixels = np.asarray(S.render(empty, 96)).astype(int)
        spread = pixels.max(axis=-1) - pixels.min(axis=-1)
        assert spread.max() <= 60, scene.background  # greys; the object colours spread over 120
    for rgb in S.COLOURS.values():
        assert max(rgb) - min(rgb) >= 120


# ------------------------------------------------------------------------------------------------------------
# Streams, mixture, corpus, errors


def test_mixture_and_task_selection():
    only = [s["task"] for s in islice(S.iter_samples(tasks=["reg"]), 50)]
    assert set(only) == {"reg"}
    tasks = Counter(s["task"] for s in islice(S.iter_samples(mixture={"rec": 3, "vqa": 1}), 600))
    assert set(tasks) == {"rec", "vqa"} and 0.65 < tasks["rec"] / 600 < 0.85
    default = Counter(s["task"] for s in islice(S.iter_samples(seed=4), 1000))
    assert set(default) == set(S.TASKS)
    # several samples per scene: consecutive, sharing one Scene; the first of each is the single-sample draw
    grouped = list(islice(S.iter_samples(seed=4, per_scene=3, tasks=["vqa"]), 30))
    single = list(islice(S.iter_samples(seed=4, tasks=["vqa"]), 10))
    assert all(grouped[3 * k]["scene"] is grouped[3 * k + 2]["scene"] for k in range(10))
    assert [s["prompt"] for s in grouped[::3]] == [s["prompt"] for s in single]


def test_corpus_is_plain_text_of_the_world():
    lines = S.corpus(400)
    assert len(lines) == 400 and S.corpus(0) == []
    text = " ".join(lines)
    assert "<" not in text and ">" not in text
    for word in (
        SHAPE_WORDS + COLOUR_WORDS + ("small", "large", "An image of", "Question:", "Answer:", "It is")
    ):
        assert word in text


def test_vqa_kinds_weights_decide_which_question_is_asked():
    scenes = [S.make_scene(S.scene_seed("train", 3, i)) for i in range(600)]

    def kinds(weights):
        samples = [S.build_sample(sc, "vqa", i, weights) for i, sc in enumerate(scenes)]
        return Counter(s["kind"] if s else None for s in samples)

    # no weights: the stream the evaluation sets and older recipes draw (the same rng, the same samples)
    for i, sc in enumerate(scenes[:50]):
        assert S.build_sample(sc, "vqa", i) == S.build_sample(sc, "vqa", i, None)
    only = kinds({"count": 1, "color": 0, "shape": 0, "size": 0, "where": 0, "exists": 0})
    # a count of a random description with a held-out colour-shape pair is not posed: no question then
    assert set(only) == {"count", None} and only["count"] > 550
    alike, count3 = kinds(None), kinds({"count": 3})
    assert set(count3) == set(S.VQA_KINDS) and None not in alike  # another kind stands in
    assert count3["count"] > 2 * alike["count"]
    # the kind tried first: weight / total (3/8 for count, 1/8 for each other kind), drawn without replacement
    rng = random.Random(0)
    weights = S.check_vqa_kinds({"count": 3})
    orders = [S._kind_order(rng, weights) for _ in range(4000)]
    assert all(sorted(o) == sorted(S.VQA_KINDS) for o in orders)
    first = Counter(o[0] for o in orders)
    for kind in S.VQA_KINDS:
        p = 3 / 8 if kind == "count" else 1 / 8
        assert abs(first[kind] / 4000 - p) < 3.5 * (p * (1 - p) / 4000) ** 0.5


def test_p_copy_none_is_the_world_and_a_higher_one_copies_that_often():
    # None and the world's constant draw the same scenes as before the argument existed
    assert all(
        S.make_scene(i) == S.make_scene(i, "train", None) == S.make_scene(i, "train", S.P_COPY)
        for i in range(50)
    )
    # at p_copy = 1 - P_DISTRACTOR no object is drawn at random: each one after the first copies an earlier
    # one or changes exactly one attribute of an earlier one
    p = 1 - S.P_DISTRACTOR
    rng = random.Random(3)
    for _ in range(300):
        triples = S._sample_attributes(rng, 6, compositional=False, p_copy=p)
        for k in range(1, 6):
            assert min(sum(a != b for a, b in zip(triples[k], t, strict=True)) for t in triples[:k]) <= 1
    # with one earlier object (and no held-out pairs to redraw: the compositional split) the second is a
    # copy with chance p_copy, or a random draw (the rest after distractors) that lands on it by chance; a
    # one-attribute change cannot equal the object it changed
    kinds = len(S.SIZES) * len(S.COLOURS) * len(S.SHAPES)
    for p_copy in (0.1, 0.45):
        copies = sum(a == b for a, b in (S._sample_attributes(rng, 2, True, p_copy) for _ in range(3000)))
        same = p_copy + (1 - p_copy - S.P_DISTRACTOR) / kinds
        assert abs(copies / 3000 - same) < 3.5 * (same * (1 - same) / 3000) ** 0.5

    # more copies make more groups of identical objects in the scenes a recipe trains on
    def grouped(p_copy):
        n = total = 0
        for i in range(400):
            objects = S.make_scene(S.scene_seed("train", 0, "copy", i), "train", p_copy).objects
            members = Counter((o.size, o.colour, o.shape) for o in objects)
            n += sum(v for v in members.values() if v > 1)
            total += len(objects)
        return n / total

    assert grouped(0.45) > grouped(None) + 0.1


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: S.make_scene(1, "val"), "split 'val'"),
        (lambda: S.make_scene(1, "train", 0.9), "p_copy 0.9 must be a chance between 0 and 0.65"),
        (lambda: S.make_scene("7"), "scene_id '7'"),
        (lambda: S.build_sample(S.make_scene(1), "detection"), "task 'detection'"),
        (lambda: next(S.iter_samples(tasks="rec")), "list of task names"),
        (lambda: next(S.iter_samples(mixture={"rec": -1})), "weight -1"),
        (lambda: next(S.iter_samples(tasks=["rec"], mixture={"vqa": 1})), "no weight"),
        (lambda: S.make_eval_set("test", 0), "n_per_task 0"),
        (lambda: S.render(S.make_scene(1), 0), "must be positive"),
        (lambda: S.render(S.make_scene(1), "224"), "size '224'"),
        (lambda: S.render("scene"), "needs a Scene"),
        (lambda: S.corpus(-1), "n -1"),
        (lambda: next(S.iter_samples(per_scene=0)), "per_scene 0"),
        (lambda: S.build_sample(S.make_scene(1), "vqa", 0, {"counting": 2}), "names 'counting'"),
        (lambda: S.build_sample(S.make_scene(1), "vqa", 0, {"count": -1}), "weight -1 for 'count'"),
        (lambda: S.build_sample(S.make_scene(1), "vqa", 0, dict.fromkeys(S.VQA_KINDS, 0)), "no question"),
    ],
)
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_speed_smoke():
    start = time.perf_counter()
    for _ in islice(S.iter_samples(seed=9), 1000):
        pass
    samples_per_s = 1000 / (time.perf_counter() - start)
    scenes = [S.make_scene(i) for i in range(200)]
    start = time.perf_counter()
    for scene in scenes:
        S.render(scene, 224)
    renders_per_s = 200 / (time.perf_counter() - start)
    # measured ~4,500 samples/s and ~1,400 renders/s at 224 on one core; generous floors for a shared machine
    assert samples_per_s > 300, samples_per_s
    assert renders_per_s > 100, renders_per_s
