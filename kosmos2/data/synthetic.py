"""The synthetic grounded world: scenes of coloured shapes, their pictures, and Kosmos-2 supervision for them.

The built-in default model is trained on this world, so it is designed to be learnable by a small model on a
CPU in under an hour while still varying what grounding needs: several objects differing in shape, colour,
size, position, overlap and count, look-alike distractors, textured and noisy backgrounds, and images of many
sizes and aspect ratios. Everything is deterministic from integer seeds and uses only numpy and Pillow.

    scene_id ─make_scene─► Scene (pixel size, Background, SceneObjects with pixel boxes)
                             ├─render─► PIL image (native size, or the model's input size directly)
                             └─build_sample(task)─► dict(task, prompt, target, boxes, expression, answer, …)
    iter_samples(split, seed)  endless training stream     make_eval_set(split, n)  fixed evaluation set
    grit_record(scene)         GRIT-20M style record        corpus(n)                text for the tokenizer

The world
    shapes   circle, square, triangle, diamond, star, cross (upright, each filling its box)
    colours  red, orange, yellow, green, blue, purple (saturated; each object's RGB jittered by up to ±12)
    sizes    small / large: the box side is s·sqrt(W·H) pixels, s in [0.14, 0.20] or [0.28, 0.36]; in the
             normalised frame the model sees, the box area is then s² whatever the aspect ratio
    images   sqrt(W·H) in [128, 448] pixels, aspect W/H in [0.625, 1.6]; 1–6 objects; in a third of the
             scenes boxes may overlap (up to 30% of the smaller box), in the others they keep a gap; large
             objects are drawn first
    backgrounds  flat, gradient, stripes, checker, blotches, noise: low-saturation greys (never an object
             colour), most with added per-pixel grey noise

Words and their meaning, all on normalised boxes (the square image the model sees); cx, cy is a box's centre
and w, h its size:

    description    "[size] [colour] shape|object" fits the objects having every attribute it names
    A left of B    true when g = B.cx − A.cx ≥ REL_TRUE·(A.w + B.w)/2 and g > |A.cy − B.cy|; false when
                   g ≤ REL_FALSE·(A.w + B.w)/2; undecided otherwise. "right of", "above" and "below" likewise
                   (above/below on the y axis with the heights; y grows downwards)
    X on the left  among the (at least two) objects fitting description X, the one whose cx is smaller than
                   every other's by at least EXTREME_MARGIN; "on the right", "at the top", "at the bottom"
                   likewise
    where          the 3×3 region of the box centre ("top left", "top", "top right", "left", "center", …);
                   only asked when the centre is at least REGION_MARGIN away from the thirds

A referring expression is only emitted when exactly one object fits it and every other candidate is decidedly
not it: "the small red circle", "the red circle on the left", "the circle above the blue square".

Tasks (prompts per SPEC §1; every piece of markup is written by `kosmos2.grounding`), prompt → target:

    grounded_caption  <grounding>An image of
                      → <phrase> a small red circle</phrase><object>…</object>,<phrase> two large blue
                        squares</phrase><object>…</delimiter_of_multi_objects/>…</object> and … .
    caption           An image of → a small red circle, two large blue squares and a green triangle.
    rec               <grounding><phrase> the red circle left of the blue square</phrase> → <object>…</object>
    phrase_grounding  <grounding>An image of a small red circle,<phrase> two large blue squares</phrase>
                      → <object>…</delimiter_of_multi_objects/>…</object>
    reg               <phrase> It</phrase><object>…</object> is → the small red circle (one canonical answer)
    grounded_vqa      <grounding> Question: What color is<phrase> this object</phrase><object>…</object>?
                      Answer: → red
    vqa               Question: How many red circles are there? Answer: → 2
                      (kinds: count, color, shape, size, where, exists)
    rec_absent        <grounding><phrase> the green triangle</phrase> → (nothing: `</s>`) where no object
                      fits: an object's description with one attribute changed ("near"), else a random one
    rec_ambiguous     <grounding><phrase> the red circle</phrase> → <object>…</delimiter_of_multi_objects/>…
                      </object> where exactly two objects fit (forms "identical" / "similar")
                      The last two (QUERY_TASKS) are asked for by name only: they measure Predictor.locate's
                      found / ambiguous decisions; the default mixture and evaluation sets leave them out.

Captions list groups left to right by each group's leftmost centre; a group is all objects sharing size,
colour and shape, named once with a count word and one box per member ("two large blue squares"). The REG
answer is the full description, followed by "on the left" (or right, top, bottom: the first that decides)
only when the full description fits several objects; an object that nothing decides is never a REG target.

Splits
    train          endless; its scenes never contain a held-out shape×colour pair (HELD_OUT_PAIRS)
    test           the train distribution on other scenes (the split name seeds them apart), fixed seed
    calibration    the same distribution as test on yet other scenes: for fitting decision thresholds
                   (found / ambiguous) apart from the test split they are measured on
    compositional  every scene contains a held-out pair, and the queried object (REC, REG, phrase, VQA) is
                   one; REC and count/exists questions name the pair itself (colour and shape).
                   HELD_OUT_PAIRS: blue circle, yellow square, purple triangle, red diamond, green star,
                   orange cross. Each shape and each colour is held out once, so every word is seen in
                   training, only these combinations are not.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from kosmos2 import grounding
from kosmos2.grounding import Box

__all__ = [
    "BACKGROUND_KINDS",
    "COLOURS",
    "DEFAULT_MIXTURE",
    "HELD_OUT_PAIRS",
    "QUERY_TASKS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TASKS",
    "Background",
    "Scene",
    "SceneObject",
    "build_sample",
    "check_p_copy",
    "corpus",
    "grit_record",
    "iter_samples",
    "make_eval_set",
    "make_scene",
    "render",
    "scene_seed",
    "twin_facts",
]

# ------------------------------------------------------------------------------------------------------------
# The vocabulary of the world

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
PLURALS = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}
COLOURS = {
    "red": (220, 35, 35),
    "orange": (245, 135, 15),
    "yellow": (240, 215, 25),
    "green": (35, 165, 55),
    "blue": (35, 80, 230),
    "purple": (145, 50, 200),
}
SIZES = ("small", "large")
SIZE_RANGES = {"small": (0.14, 0.20), "large": (0.28, 0.36)}  # box side / sqrt(W·H)
HELD_OUT_PAIRS = frozenset(
    {
        ("circle", "blue"),
        ("square", "yellow"),
        ("triangle", "purple"),
        ("diamond", "red"),
        ("star", "green"),
        ("cross", "orange"),
    }
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
BACKGROUND_KINDS = ("flat", "gradient", "stripes", "checker", "blotches", "noise")

SPLITS = ("train", "test", "compositional", "calibration")
# the fixed seeds of the evaluation splits; "calibration" is the test distribution on other scenes, held out
# for fitting decision thresholds (kosmos2.eval.synthetic's found / ambiguous thresholds) apart from the test
SPLIT_SEEDS = {"test": 1, "compositional": 2, "calibration": 3}
TASKS = ("grounded_caption", "caption", "rec", "phrase_grounding", "reg", "grounded_vqa", "vqa")
# REC queries that single nothing out: an expression matching no object, and one matching exactly two. Not in
# TASKS (the default mixture and the default evaluation sets stay as they were); asked for by name.
QUERY_TASKS = ("rec_absent", "rec_ambiguous")
ALL_TASKS = TASKS + QUERY_TASKS
VQA_KINDS = ("count", "color", "shape", "size", "where", "exists")  # the plain VQA questions
DEFAULT_MIXTURE = {
    "grounded_caption": 0.2,
    "caption": 0.05,
    "rec": 0.3,
    "phrase_grounding": 0.1,
    "reg": 0.15,
    "grounded_vqa": 0.05,
    "vqa": 0.15,
}

CAPTION_PROMPT = "An image of"
REG_PHRASE = " It"  # SPEC §1: <phrase> It</phrase><object>…</object> is

# Scene sampling
SIDE_RANGE = (128, 448)  # sqrt(W·H) in pixels
ASPECT_RANGE = (0.625, 1.6)  # W / H
OBJECT_COUNTS = (1, 2, 3, 4, 5, 6)
OBJECT_COUNT_WEIGHTS = (1, 2, 3, 3, 3, 2)
P_COPY = 0.25  # a new object copies an earlier one's attributes (counts)
P_DISTRACTOR = 0.35  # ... or changes exactly one of them (look-alike distractors)
P_OVERLAP = 1 / 3  # scenes whose boxes may overlap
MAX_OVERLAP = 0.3  # intersection / smaller box area, in overlapping scenes
GAP = 0.03  # min gap between boxes in other scenes, in units of sqrt(W·H)
MARGIN = 0.02  # min distance of a box from the image border, in units of min(W, H)
PLACEMENT_TRIES = 40  # random positions tried per object before it is left out
COLOUR_JITTER = 12
NOISE_TILE = 1024  # side of the precomputed noise tile

# Meaning of the spatial words (normalised coordinates)
REL_TRUE = 0.6
REL_FALSE = 0.1
EXTREME_MARGIN = 0.15
REGION_MARGIN = 0.04

RELATIONS = ("left of", "right of", "above", "below")
EXTREMES = ("on the left", "on the right", "at the top", "at the bottom")
# attribute patterns of a description: which of (size, colour, shape) it names
PATTERNS = (
    (False, False, True),
    (False, True, True),
    (True, False, True),
    (True, True, True),
    (False, True, False),
    (True, True, False),
    (True, False, False),
)
FULL = (True, True, True)
REC_FORM_WEIGHTS = {"attributes": 0.45, "extreme": 0.2, "relation": 0.35}

Desc = tuple[str | None, str | None, str | None]  # (size, colour, shape); None = not named
_QA = tuple[str, str, list[Box]] | None  # (question, answer, boxes of the objects it is about)

# ------------------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class SceneObject:
    """One shape: its attributes, its RGB fill, and its box in pixels (x1, y1, x2, y2) and normalised."""

    shape: str
    colour: str
    size: str
    rgb: tuple[int, int, int]
    box: Box  # pixels of the scene's native width × height
    norm_box: Box  # box / (W, H, W, H)

    @property
    def words(self) -> str:
        """The full description: "small red circle"."""
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Background:
    """How the background is painted: colour1 blended towards colour2 by a pattern, plus grey noise.

    period and angle set the pattern (in native pixels and radians); noise is the standard deviation of the
    per-pixel grey noise in 8-bit levels; seed drives the noise and the blotches.
    """

    kind: str
    colour1: tuple[int, int, int]
    colour2: tuple[int, int, int]
    period: float
    angle: float
    noise: float
    seed: int


@dataclass(frozen=True)
class Scene:
    """A picture to be: native pixel size, background, and objects (in the order they were placed)."""

    scene_id: int
    split: str
    width: int
    height: int
    background: Background
    objects: tuple[SceneObject, ...]

    @property
    def boxes(self) -> list[Box]:
        """The normalised boxes of the objects, in object order."""
        return [o.norm_box for o in self.objects]


def scene_seed(split: str, seed: int, *index: object) -> int:
    """A 63-bit seed for (split, seed, index…), stable across runs and Python versions (BLAKE2b of repr)."""
    digest = hashlib.blake2b(repr((split, seed, *index)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def make_scene(scene_id: int, split: str = "train", p_copy: float | None = None) -> Scene:
    """The scene with this id: train/test scenes never hold a HELD_OUT_PAIRS object, compositional ones do.

    The id alone decides the scene (train and test give one scene for one id; the splits differ by the ids
    their streams draw). p_copy: the chance that a new object copies an earlier one's attributes (groups of
    identical objects, what counting is about); None is the world's P_COPY, which every held-out set uses.
    Training may ask for more groups (`Recipe.p_copy`); the random draws are the same, so only the
    attributes that copying decides change.
    """
    _check_split(split)
    if isinstance(scene_id, bool) or not isinstance(scene_id, int):
        raise ValueError(f"scene_id {scene_id!r} must be an int (a seed, e.g. from scene_seed)")
    p_copy = check_p_copy(p_copy)
    rng = random.Random(scene_id)
    log_aspect = rng.uniform(math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1]))
    side = rng.uniform(*SIDE_RANGE)
    width = round(side * math.exp(log_aspect / 2))
    height = round(side * math.exp(-log_aspect / 2))
    background = _sample_background(rng, width, height)
    n = rng.choices(OBJECT_COUNTS, weights=OBJECT_COUNT_WEIGHTS)[0]
    attributes = _sample_attributes(rng, n, compositional=split == "compositional", p_copy=p_copy)
    objects = _place(rng, attributes, width, height, overlap=rng.random() < P_OVERLAP)
    return Scene(scene_id, split, width, height, background, objects)


def _sample_background(rng: random.Random, width: int, height: int) -> Background:
    kind = rng.choice(BACKGROUND_KINDS)
    level = rng.uniform(70, 200)
    colour1 = tuple(_clip8(level + rng.uniform(-12, 12)) for _ in range(3))
    contrast = rng.uniform(15, 45) * rng.choice((-1, 1))
    colour2 = tuple(_clip8(level + contrast + rng.uniform(-12, 12)) for _ in range(3))
    side = math.sqrt(width * height)
    period = side * (rng.uniform(0.2, 0.5) if kind == "blotches" else rng.uniform(0.04, 0.2))
    if kind == "noise":
        noise = rng.uniform(6, 16)
    else:
        noise = rng.uniform(2, 8) if rng.random() < 0.6 else 0.0
    return Background(kind, colour1, colour2, period, rng.uniform(0, math.pi), noise, rng.getrandbits(32))


def check_p_copy(p_copy: float | None) -> float:
    """p_copy as a float (None: P_COPY), or a ValueError naming it: a chance in [0, 1 - P_DISTRACTOR]."""
    if p_copy is None:
        return P_COPY
    if (
        isinstance(p_copy, bool)
        or not isinstance(p_copy, (int, float))
        or not 0 <= p_copy <= 1 - P_DISTRACTOR
    ):
        raise ValueError(
            f"p_copy {p_copy!r} must be a chance between 0 and {1 - P_DISTRACTOR:g} (1 - P_DISTRACTOR, "
            f"the distractors' share); None keeps the world's {P_COPY}"
        )
    return float(p_copy)


def _sample_attributes(
    rng: random.Random, n: int, compositional: bool, p_copy: float = P_COPY
) -> list[tuple[str, str, str]]:
    """n (size, colour, shape) triples; copies make counts, one-attribute changes make distractors."""
    out: list[tuple[str, str, str]] = []
    for i in range(n):
        if compositional and i == 0:
            shape, colour = rng.choice(sorted(HELD_OUT_PAIRS))
            out.append((rng.choice(SIZES), colour, shape))
            continue
        while True:
            r = rng.random()
            if out and r < p_copy:
                triple = rng.choice(out)
            elif out and r < p_copy + P_DISTRACTOR:
                values = list(rng.choice(out))
                k = rng.randrange(3)
                values[k] = rng.choice([v for v in (SIZES, tuple(COLOURS), SHAPES)[k] if v != values[k]])
                triple = tuple(values)
            else:
                triple = (rng.choice(SIZES), rng.choice(tuple(COLOURS)), rng.choice(SHAPES))
            if compositional or (triple[2], triple[1]) not in HELD_OUT_PAIRS:
                break
        out.append(triple)
    return out


def _place(
    rng: random.Random, attributes: list[tuple[str, str, str]], width: int, height: int, overlap: bool
) -> tuple[SceneObject, ...]:
    """Random positions, rejecting ones that overlap too much (or touch, in gap scenes); misfits left out."""
    side = math.sqrt(width * height)
    margin = MARGIN * min(width, height)
    gap = 0.0 if overlap else GAP * side
    placed: list[SceneObject] = []
    for size, colour, shape in attributes:
        for _ in range(PLACEMENT_TRIES):
            s = rng.uniform(*SIZE_RANGES[size]) * side
            if s > min(width, height) - 2 * margin:
                continue
            x1 = rng.uniform(margin, width - margin - s)
            y1 = rng.uniform(margin, height - margin - s)
            box = (x1, y1, x1 + s, y1 + s)
            if all(_compatible(box, other.box, overlap, gap) for other in placed):
                break
        else:
            continue
        rgb = tuple(_clip8(c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER)) for c in COLOURS[colour])
        norm = (box[0] / width, box[1] / height, box[2] / width, box[3] / height)
        placed.append(SceneObject(shape, colour, size, rgb, box, norm))
    return tuple(placed)


def _compatible(a: Box, b: Box, overlap: bool, gap: float) -> bool:
    if not overlap:  # boxes grown by gap/2 on each side must not touch
        return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return inter <= MAX_OVERLAP * smaller


def _clip8(value: float) -> int:
    return min(255, max(0, round(value)))


# ------------------------------------------------------------------------------------------------------------
# Rendering


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    vertices = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + k * math.pi / points  # first point straight up
        vertices.append((r * math.cos(a), r * math.sin(a)))
    xs, ys = [v[0] for v in vertices], [v[1] for v in vertices]
    # stretch to fill the unit box exactly, so the object's box is its tight box (a ~5% vertical stretch)
    return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in vertices]


_ARM = (1 - 0.36) / 2  # the cross's arms are 36% of the box thick
# Outlines in the unit box (0..1 on both axes, y down), each touching all four sides; circles are ellipses.
POLYGONS = {
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
    "star": _star(),
    "cross": [
        (_ARM, 0),
        (1 - _ARM, 0),
        (1 - _ARM, _ARM),
        (1, _ARM),
        (1, 1 - _ARM),
        (1 - _ARM, 1 - _ARM),
        (1 - _ARM, 1),
        (_ARM, 1),
        (_ARM, 1 - _ARM),
        (0, 1 - _ARM),
        (0, _ARM),
        (_ARM, _ARM),
    ],
}


def render(scene: Scene, size: int | tuple[int, int] | None = None, supersample: int = 2) -> Image.Image:
    """The scene as an RGB image: at its native size, or at `size` (an int for a square, or (width, height)).

    Rendering at the model's input size directly gives what resizing the native image would (shapes and
    patterns are defined in native pixels and squeezed with the frame), without the cost of the large picture.
    Shapes are drawn on a `supersample`× canvas and box-filtered down (anti-aliased edges).
    """
    if not isinstance(scene, Scene):
        raise ValueError(f"render needs a Scene (from make_scene), got {type(scene).__name__}")
    if size is None:
        width, height = scene.width, scene.height
    elif isinstance(size, int) and not isinstance(size, bool):
        width = height = size
    elif isinstance(size, Sequence) and len(size) == 2 and all(isinstance(v, int) for v in size):
        width, height = size
    else:
        raise ValueError(f"size {size!r} must be None (native), an int (square) or (width, height) in pixels")
    if width < 1 or height < 1:
        raise ValueError(f"size {size!r} must be positive")
    if isinstance(supersample, bool) or not isinstance(supersample, int) or not 1 <= supersample <= 8:
        raise ValueError(f"supersample {supersample!r} must be an int from 1 to 8 (1 = no anti-aliasing)")

    image = _paint_background(scene, width, height)
    ss = supersample
    if ss > 1:  # nearest up then box-filter down leaves the background unchanged
        image = image.resize((width * ss, height * ss), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    sx, sy = width * ss / scene.width, height * ss / scene.height
    # large first, so small objects stay on top where boxes overlap
    for o in sorted(scene.objects, key=lambda o: -(o.box[2] - o.box[0])):
        x1, y1, x2, y2 = o.box[0] * sx, o.box[1] * sy, o.box[2] * sx, o.box[3] * sy
        if o.shape == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=o.rgb)  # Pillow's ellipse box includes its last pixel
        else:
            w, h = x2 - x1 - 1, y2 - y1 - 1
            draw.polygon([(x1 + u * w, y1 + v * h) for u, v in POLYGONS[o.shape]], fill=o.rgb)
    if ss > 1:
        image = image.reduce(ss)
    return image


def _paint_background(scene: Scene, width: int, height: int) -> Image.Image:
    """The background pattern sampled at the output pixel centres, as an RGB image of width × height."""
    bg = scene.background
    # native-pixel coordinates of the output pixel centres: x[1, width], y[height, 1]
    x = ((np.arange(width, dtype=np.float32) + 0.5) * (scene.width / width))[None, :]
    y = ((np.arange(height, dtype=np.float32) + 0.5) * (scene.height / height))[:, None]
    c, s = math.cos(bg.angle), math.sin(bg.angle)
    if bg.kind in ("flat", "noise"):
        t = np.zeros((height, width), np.float32)
    elif bg.kind == "gradient":
        along = c * x + s * y
        corners = [c * u + s * v for u in (0, scene.width) for v in (0, scene.height)]
        t = (along - min(corners)) / (max(corners) - min(corners))
    elif bg.kind == "stripes":
        t = 0.5 + 0.5 * np.sin((c * x + s * y) * (2 * math.pi / bg.period))
    elif bg.kind == "checker":
        u = np.floor((c * x + s * y) / bg.period)
        v = np.floor((c * y - s * x) / bg.period)
        t = ((u + v) % 2).astype(np.float32)
    elif bg.kind == "blotches":  # a coarse random grid, smoothly upsampled
        gw = max(2, round(scene.width / bg.period) + 1)
        gh = max(2, round(scene.height / bg.period) + 1)
        grid = np.random.default_rng([bg.seed, 1]).random((gh, gw), dtype=np.float32)
        t = np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC))
        t = np.clip(t, 0.0, 1.0)
    else:
        raise ValueError(f"background kind {bg.kind!r} is not one of {BACKGROUND_KINDS}")
    # channels first [3, H, W]: numpy broadcasts over long rows much faster than over a trailing axis of 3
    c1 = np.asarray(bg.colour1, np.float32)[:, None, None]
    c2 = np.asarray(bg.colour2, np.float32)[:, None, None]
    pixels = c1 + np.broadcast_to(t, (height, width))[None] * (c2 - c1) + 0.5  # +0.5: round when truncating
    if bg.noise > 0:  # grey noise: the same offset on all three channels keeps the background unsaturated
        pixels += _noise(bg.seed, height, width) * bg.noise
    np.clip(pixels, 0, 255, out=pixels)
    channels = pixels.astype(np.uint8)
    return Image.merge("RGB", [Image.fromarray(ch) for ch in channels])


_NOISE_TILE: list[np.ndarray] = []  # one fixed tile of standard normal values, made on first use


def _noise(seed: int, height: int, width: int) -> np.ndarray:
    """float32[1, H, W] standard normal noise: a window of a fixed tile at an offset chosen by `seed` (much
    cheaper than drawing fresh values per image; tiled with wrap-around for images larger than the tile)."""
    if not _NOISE_TILE:
        _NOISE_TILE.append(
            np.random.default_rng(20230626).standard_normal((NOISE_TILE, NOISE_TILE), np.float32)
        )
    tile = _NOISE_TILE[0]
    oy, ox = (seed >> 16) % NOISE_TILE, seed % NOISE_TILE
    if oy + height <= NOISE_TILE and ox + width <= NOISE_TILE:
        return tile[None, oy : oy + height, ox : ox + width]
    rows = (oy + np.arange(height)) % NOISE_TILE
    cols = (ox + np.arange(width)) % NOISE_TILE
    return tile[rows[:, None], cols[None, :]][None]


# ------------------------------------------------------------------------------------------------------------
# Meaning: descriptions, relations, regions


def _desc(o: SceneObject, pattern: tuple[bool, bool, bool]) -> Desc:
    return (o.size if pattern[0] else None, o.colour if pattern[1] else None, o.shape if pattern[2] else None)


def _desc_words(d: Desc, plural: bool = False) -> str:
    noun = d[2] or "object"
    if plural:
        noun = PLURALS.get(noun, "objects")
    return " ".join([w for w in d[:2] if w] + [noun])


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _matches(o: SceneObject, d: Desc) -> bool:
    return (
        (d[0] is None or o.size == d[0])
        and (d[1] is None or o.colour == d[1])
        and (d[2] is None or o.shape == d[2])
    )


class _Facts:
    """What the sample builders ask of one scene, worked out once: geometry, matches, relations."""

    def __init__(self, scene: Scene) -> None:
        self.scene = scene
        self.objects = scene.objects
        n = len(self.objects)
        # centres and sizes of the normalised boxes
        self.cx = [(o.norm_box[0] + o.norm_box[2]) / 2 for o in self.objects]
        self.cy = [(o.norm_box[1] + o.norm_box[3]) / 2 for o in self.objects]
        self.w = [o.norm_box[2] - o.norm_box[0] for o in self.objects]
        self.h = [o.norm_box[3] - o.norm_box[1] for o in self.objects]
        # relation[rel][a][b]: True / False / None (undecided) for "a rel b"
        self.relation = {
            rel: [[self._relation(a, b, rel) for b in range(n)] for a in range(n)] for rel in RELATIONS
        }

    def matching(self, d: Desc) -> list[int]:
        return [i for i, o in enumerate(self.objects) if _matches(o, d)]

    def _relation(self, a: int, b: int, rel: str) -> bool | None:
        if a == b:
            return False
        if rel in ("left of", "right of"):
            g = self.cx[b] - self.cx[a] if rel == "left of" else self.cx[a] - self.cx[b]
            other = abs(self.cy[a] - self.cy[b])
            half = (self.w[a] + self.w[b]) / 2
        else:
            g = self.cy[b] - self.cy[a] if rel == "above" else self.cy[a] - self.cy[b]
            other = abs(self.cx[a] - self.cx[b])
            half = (self.h[a] + self.h[b]) / 2
        if g >= REL_TRUE * half and g > other:
            return True
        if g <= REL_FALSE * half:
            return False
        return None

    def extreme(self, candidates: list[int], target: int, where: str) -> bool:
        """Whether `target` is decidedly the one `where` ("on the left", …) among at least two candidates."""
        if len(candidates) < 2 or target not in candidates:
            return False
        key = {
            "on the left": lambda i: self.cx[i],
            "on the right": lambda i: -self.cx[i],
            "at the top": lambda i: self.cy[i],
            "at the bottom": lambda i: -self.cy[i],
        }[where]
        return all(key(i) >= key(target) + EXTREME_MARGIN for i in candidates if i != target)

    def region(self, i: int) -> str | None:
        """The 3×3 region of object i's centre, or None when the centre is near a third."""
        col = _third(self.cx[i], ("left", "", "right"))
        row = _third(self.cy[i], ("top", "", "bottom"))
        if col is None or row is None:
            return None
        return f"{row} {col}".strip() or "center"

    def unique_patterns(self, i: int, patterns: Sequence[tuple[bool, bool, bool]] = PATTERNS) -> list[Desc]:
        """The descriptions of object i (from `patterns`) that fit it and no other object."""
        out = []
        for p in patterns:
            d = _desc(self.objects[i], p)
            if self.matching(d) == [i]:
                out.append(d)
        return out

    def place(self, i: int) -> str | None:
        """What tells object i from the objects identical to it: "" when it has none, else the first of
        EXTREMES that decides ("on the left", …); None when none does."""
        candidates = self.matching(_desc(self.objects[i], FULL))
        if candidates == [i]:
            return ""
        for where in EXTREMES:
            if self.extreme(candidates, i, where):
                return where
        return None

    def canonical(self, i: int) -> str | None:
        """The REG answer for object i, "the small red circle" [+ " on the left" …]; None if none decides."""
        where = self.place(i)
        if where is None:
            return None
        words = "the " + _desc_words(_desc(self.objects[i], FULL))
        return f"{words} {where}" if where else words

    def rec_expressions(
        self, i: int, patterns: Sequence[tuple[bool, bool, bool]] = PATTERNS
    ) -> dict[str, list[str]]:
        """Every referring expression (by form) that picks object i alone, with all other candidates decided;
        the head description of object i uses one of `patterns`."""
        forms: dict[str, list[str]] = {"attributes": [], "extreme": [], "relation": []}
        landmarks = {j: self.unique_patterns(j) for j in range(len(self.objects)) if j != i}
        for p in patterns:
            d = _desc(self.objects[i], p)
            candidates = self.matching(d)
            head = "the " + _desc_words(d)
            if candidates == [i]:
                forms["attributes"].append(head)
            else:
                forms["extreme"] += [
                    f"{head} {where}" for where in EXTREMES if self.extreme(candidates, i, where)
                ]
            for j, descs in landmarks.items():
                if not descs or j in candidates:
                    continue
                for rel in RELATIONS:
                    row = self.relation[rel]
                    if row[i][j] and all(row[k][j] is False for k in candidates if k != i):
                        forms["relation"] += [f"{head} {rel} the {_desc_words(ld)}" for ld in descs]
        return forms


def twin_facts(scene: Scene) -> list[tuple[int, str | None]]:
    """Per object of `scene`: how many objects share its size, colour and shape (itself included), and its
    `_Facts.place` ("" when unique, else the EXTREMES word that tells it from its twins, None if none does).
    What a caption's count word and a REG answer's suffix are made of (training's "groups" slot read-out)."""
    facts = _Facts(scene)
    return [(len(facts.matching(_desc(o, FULL))), facts.place(i)) for i, o in enumerate(scene.objects)]


def sharing_counts(scene: Scene, patterns: Sequence[tuple[bool, bool, bool]]) -> list[list[int]]:
    """Per object of `scene`, per attribute pattern: how many objects match its description under that
    pattern (itself included), the answer to "How many <its description> are there?" (training's "counts"
    slot read-out)."""
    return [[sum(_matches(b, _desc(a, p)) for b in scene.objects) for p in patterns] for a in scene.objects]


def _third(v: float, names: tuple[str, str, str]) -> str | None:
    if v < 1 / 3 - REGION_MARGIN:
        return names[0]
    if 1 / 3 + REGION_MARGIN < v < 2 / 3 - REGION_MARGIN:
        return names[1]
    if v > 2 / 3 + REGION_MARGIN:
        return names[2]
    return None


# ------------------------------------------------------------------------------------------------------------
# Captions and GRIT records


def _groups(facts: _Facts) -> list[tuple[tuple[str, str, str], list[int]]]:
    """Objects grouped by (size, colour, shape), members left to right, groups by their leftmost member."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for i, o in enumerate(facts.objects):
        groups.setdefault((o.size, o.colour, o.shape), []).append(i)
    out = [(key, sorted(members, key=lambda i: facts.cx[i])) for key, members in groups.items()]
    return sorted(out, key=lambda item: facts.cx[item[1][0]])


def _caption(facts: _Facts) -> tuple[str, list[tuple[int, int, list[int]]]]:
    """The caption "a small red circle, two large blue squares and a green triangle." and its phrase spans
    (start, end exclusive, member indices) without surrounding spaces."""
    phrases = []
    for (size, colour, shape), members in _groups(facts):
        n = len(members)
        words = (
            f"a {size} {colour} {shape}" if n == 1 else f"{NUMBER_WORDS[n]} {size} {colour} {PLURALS[shape]}"
        )
        phrases.append((words, members))
    text, spans = "", []
    for k, (words, members) in enumerate(phrases):
        if k:
            text += " and " if k == len(phrases) - 1 else ", "
        spans.append((len(text), len(text) + len(words), members))
        text += words
    return text + ".", spans


def grit_record(scene: Scene) -> dict[str, Any]:
    """The scene's caption as a GRIT-20M record (SPEC §9): noun_chunks and ref_exps are lists of
    [char_start, char_end, x1, y1, x2, y2, score], one row per box (a group's phrase repeats with each box).

    The expressions equal the chunks (a list of conjuncts is not expanded, SPEC §9 step 5); the score is 1.0
    (boxes are exact). The CLIP similarities are None: there is no CLIP score for a synthetic picture.
    """
    facts = _Facts(scene)
    caption, spans = _caption(facts)
    rows = [[s, e, *scene.objects[i].norm_box, 1.0] for s, e, members in spans for i in members]
    return {
        "key": f"synthetic-{scene.split}-{scene.scene_id:016x}",
        "id": scene.scene_id,
        "url": f"synthetic://{scene.split}/{scene.scene_id}",
        "caption": caption,
        "width": scene.width,
        "height": scene.height,
        "clip_similarity_vitb32": None,
        "clip_similarity_vitl14": None,
        "noun_chunks": rows,
        "ref_exps": [list(r) for r in rows],
    }


# ------------------------------------------------------------------------------------------------------------
# Samples


def _split_object(text: str, start: int, end: int, boxes: list[Box]) -> tuple[str, str]:
    """markup() of one phrase that ends the text, cut before its object: (tagged text, "<object>…")."""
    full = grounding.markup(text, [(start, end, boxes)])
    obj = grounding.object_markup(boxes)
    assert end == len(text) and full.endswith(obj), (text, full)
    return full[: -len(obj)], obj


def _sample(
    task: str, scene: Scene, prompt: str, target: str, boxes: list[Box], **fields: Any
) -> dict[str, Any]:
    sample = {
        "task": task,
        "prompt": prompt,
        "target": target,
        "scene": scene,
        "scene_id": scene.scene_id,
        "split": scene.split,
        "boxes": boxes,
        "expression": None,
        "answer": None,
        "entities": None,
    }
    sample.update(fields)
    return sample


def build_sample(
    scene: Scene,
    task: str,
    rng: random.Random | int = 0,
    vqa_kinds: Mapping[str, float] | None = None,
) -> dict[str, Any] | None:
    """One `task` sample on `scene`, or None when the scene cannot pose it (no object can be singled out).

    The sample is a dict:
        task, prompt, target   the training pair; the model reads prompt (after the image) and learns target
        scene, scene_id, split the picture: render(sample["scene"]) or make_scene(scene_id, split)
        boxes                  ground-truth normalised boxes: the object referred to (rec, reg, grounded_vqa,
                               vqa about one object), the phrase's group (phrase_grounding), all objects
                               (captions), the objects counted (vqa count, exists)
        expression             the referring expression (rec), the canonical one (reg), the phrase
                               (phrase_grounding)
        answer                 text to compare with the output: the expression (reg), the answer (vqa,
                               grounded_vqa), "An image of " + the caption (captions)
        entities               captions only: [(phrase, [box, ...]), ...] in caption order
        form                   rec only: "attributes", "extreme" or "relation" (how the object is singled out)
        question, kind         vqa and grounded_vqa only: the question without markup, and its kind ("count",
                               "color", "shape", "size", "where", "exists")

    On a compositional scene the queried object is always one with a held-out shape×colour pair.
    vqa_kinds (task "vqa" only): weights of the question kinds (VQA_KINDS; a kind not named weighs 1), the
    kind asked drawn by them; None asks each kind alike (the evaluation sets' questions).
    """
    if task not in ALL_TASKS:
        raise ValueError(f"task {task!r} is not one of {ALL_TASKS}")
    weights = None if vqa_kinds is None else check_vqa_kinds(vqa_kinds)
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    facts = _Facts(scene)
    if scene.split == "compositional":
        focus = [i for i, o in enumerate(scene.objects) if (o.shape, o.colour) in HELD_OUT_PAIRS]
    else:
        focus = list(range(len(scene.objects)))
    if task == "vqa":
        return _build_vqa(facts, focus, rng, weights)
    return _BUILDERS[task](facts, focus, rng)


def check_vqa_kinds(vqa_kinds: Mapping[str, float]) -> list[float]:
    """The weight of each of VQA_KINDS (1 for a kind not named); a clear error for a bad mapping."""
    if not isinstance(vqa_kinds, Mapping):
        raise ValueError(f"vqa_kinds {vqa_kinds!r} must map question kinds {VQA_KINDS} to weights")
    for kind, w in vqa_kinds.items():
        if kind not in VQA_KINDS:
            raise ValueError(f"vqa_kinds names {kind!r}, not a question kind of {VQA_KINDS}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"vqa_kinds weight {w!r} for {kind!r} must be a finite number >= 0")
    weights = [float(vqa_kinds.get(kind, 1.0)) for kind in VQA_KINDS]
    if sum(weights) <= 0:
        raise ValueError(f"vqa_kinds {dict(vqa_kinds)} gives no question kind a positive weight")
    return weights


def _build_caption(facts: _Facts, focus: list[int], rng: random.Random, grounded: bool) -> dict[str, Any]:
    scene = facts.scene
    caption, spans = _caption(facts)
    lead = len(CAPTION_PROMPT) + 1  # "An image of " before the caption
    full = f"{CAPTION_PROMPT} {caption}"
    entities = [(caption[s:e], [scene.objects[i].norm_box for i in members]) for s, e, members in spans]
    boxes = [b for _, group in entities for b in group]
    if grounded:
        # each phrase takes the space before it, as the released model writes: "of<phrase> a snowman</phrase>"
        text = grounding.markup(
            full,
            [(lead + s - 1, lead + e, group) for (s, e, _), (_, group) in zip(spans, entities, strict=True)],
        )
        return _sample(
            "grounded_caption",
            scene,
            grounding.GROUNDING + CAPTION_PROMPT,
            text[len(CAPTION_PROMPT) :],
            boxes,
            answer=full,
            entities=entities,
        )
    return _sample("caption", scene, CAPTION_PROMPT, " " + caption, boxes, answer=full, entities=entities)


# On the compositional split a query names the held-out pair itself (colour and shape), not just one half.
NAMING_PAIR = tuple(p for p in PATTERNS if p[1] and p[2])


def _build_rec(facts: _Facts, focus: list[int], rng: random.Random) -> dict[str, Any] | None:
    patterns = NAMING_PAIR if facts.scene.split == "compositional" else PATTERNS
    expressions = {i: facts.rec_expressions(i, patterns) for i in focus}
    # the form first (by REC_FORM_WEIGHTS, among those the scene offers), then an object allowing it; picking
    # the object first would over-represent "extreme", the only form an object with an identical twin has
    available = [f for f in REC_FORM_WEIGHTS if any(forms[f] for forms in expressions.values())]
    if not available:
        return None
    form = rng.choices(available, weights=[REC_FORM_WEIGHTS[f] for f in available])[0]
    i = rng.choice([i for i, forms in expressions.items() if forms[form]])
    expression = rng.choice(expressions[i][form])
    box = facts.objects[i].norm_box
    text = " " + expression
    prompt, target = _split_object(text, 0, len(text), [box])
    return _sample(
        "rec", facts.scene, grounding.GROUNDING + prompt, target, [box], expression=expression, form=form
    )


# Absent and ambiguous REC queries: the head descriptions they use name the shape or the colour
QUERY_PATTERNS = tuple(p for p in PATTERNS if p[1] or p[2])


def _rec_query(facts: _Facts, task: str, expression: str, boxes: list[Box], form: str) -> dict[str, Any]:
    """A REC-shaped sample whose target is the boxes of every object the expression fits: none (the model
    should stop, `</s>`, without an object) or several (one `<object>` with a box per object)."""
    prompt = grounding.GROUNDING + grounding.PHRASE_START + " " + expression + grounding.PHRASE_END
    target = grounding.object_markup(boxes) if boxes else ""
    return _sample(task, facts.scene, prompt, target, boxes, expression=expression, form=form)


def _build_rec_absent(facts: _Facts, focus: list[int], rng: random.Random) -> dict[str, Any] | None:
    """An expression no object fits, "the green triangle": an object's description with one named attribute
    changed (a near miss, form "near"), or, when no change gives one, a random description (form "random").
    On the test split the description never names a held-out shape×colour pair."""
    held_out_ok = facts.scene.split == "compositional"
    options = []
    for i in focus:
        o = facts.objects[i]
        for p in QUERY_PATTERNS:
            d = _desc(o, p)
            for slot, values in ((0, SIZES), (1, tuple(COLOURS)), (2, SHAPES)):
                if d[slot] is None:
                    continue
                for v in values:
                    if v == d[slot]:
                        continue
                    changed = tuple(v if k == slot else d[k] for k in range(3))
                    if facts.matching(changed) or (
                        not held_out_ok and (changed[2], changed[1]) in HELD_OUT_PAIRS
                    ):
                        continue
                    options.append(changed)
    if options:
        d, form = rng.choice(options), "near"
    else:
        for _ in range(20):
            p = rng.choice(QUERY_PATTERNS)
            d = (
                rng.choice(SIZES) if p[0] else None,
                rng.choice(tuple(COLOURS)) if p[1] else None,
                rng.choice(SHAPES) if p[2] else None,
            )
            if not facts.matching(d) and (held_out_ok or (d[2], d[1]) not in HELD_OUT_PAIRS):
                break
        else:
            return None
        form = "random"
    return _rec_query(facts, "rec_absent", "the " + _desc_words(d), [], form)


def _build_rec_ambiguous(facts: _Facts, focus: list[int], rng: random.Random) -> dict[str, Any] | None:
    """An expression exactly two objects fit, "the red circle" (form: "identical" when the two share size,
    colour and shape, else "similar"); the true boxes are both, left to right."""
    options: dict[Desc, list[int]] = {}
    for i in focus:
        for p in QUERY_PATTERNS:
            d = _desc(facts.objects[i], p)
            members = facts.matching(d)
            if len(members) == 2:
                options[d] = sorted(members, key=lambda j: facts.cx[j])
    if not options:
        return None
    d = rng.choice(sorted(options, key=lambda k: tuple(w or "" for w in k)))
    a, b = (facts.objects[j] for j in options[d])
    form = "identical" if a.words == b.words else "similar"
    boxes = [facts.objects[j].norm_box for j in options[d]]
    return _rec_query(facts, "rec_ambiguous", "the " + _desc_words(d), boxes, form)


def _build_phrase(facts: _Facts, focus: list[int], rng: random.Random) -> dict[str, Any] | None:
    caption, spans = _caption(facts)
    allowed = [span for span in spans if any(i in focus for i in span[2])]
    if not allowed:
        return None
    s, e, members = rng.choice(allowed)
    boxes = [facts.objects[i].norm_box for i in members]
    text = f"{CAPTION_PROMPT} {caption[:e]}"
    start = len(CAPTION_PROMPT) + s  # the space before the phrase goes inside it
    prompt, target = _split_object(text, start, len(text), boxes)
    return _sample(
        "phrase_grounding", facts.scene, grounding.GROUNDING + prompt, target, boxes, expression=caption[s:e]
    )


def _build_reg(facts: _Facts, focus: list[int], rng: random.Random) -> dict[str, Any] | None:
    options = [(i, words) for i in focus if (words := facts.canonical(i)) is not None]
    if not options:
        return None
    i, expression = rng.choice(options)
    box = facts.objects[i].norm_box
    prompt = grounding.markup(REG_PHRASE + " is", [(0, len(REG_PHRASE), [box])])
    return _sample(
        "reg", facts.scene, prompt, " " + expression, [box], expression=expression, answer=expression
    )


GROUNDED_QUESTIONS = {
    "color": "What color is this object?",
    "shape": "What shape is this object?",
    "size": "What size is this object?",
    "where": "Where is this object?",
}


def _build_grounded_vqa(facts: _Facts, focus: list[int], rng: random.Random) -> dict[str, Any] | None:
    if not focus:
        return None
    i = rng.choice(focus)
    o = facts.objects[i]
    answers = {"color": o.colour, "shape": o.shape, "size": o.size, "where": facts.region(i)}
    kind = rng.choice([k for k, v in answers.items() if v is not None])
    question = f"Question: {GROUNDED_QUESTIONS[kind]} Answer:"
    start = question.index(" this object")  # the phrase takes its leading space, as in SPEC §1
    prompt = grounding.markup(question, [(start, start + len(" this object"), [o.norm_box])])
    return _sample(
        "grounded_vqa",
        facts.scene,
        f"{grounding.GROUNDING} {prompt}",
        " " + answers[kind],
        [o.norm_box],
        answer=answers[kind],
        question=GROUNDED_QUESTIONS[kind],
        kind=kind,
    )


def _build_vqa(
    facts: _Facts, focus: list[int], rng: random.Random, weights: list[float] | None = None
) -> dict[str, Any] | None:
    kinds = _kind_order(rng, weights)
    compositional = facts.scene.split == "compositional"
    for kind in kinds:
        qa = _VQA[kind](facts, focus, rng, compositional)
        if qa is not None:
            question, answer, boxes = qa
            return _sample(
                "vqa",
                facts.scene,
                f"Question: {question} Answer:",
                " " + answer,
                boxes,
                answer=answer,
                question=question,
                kind=kind,
            )
    return None


def _kind_order(rng: random.Random, weights: list[float] | None) -> list[str]:
    """The order in which _build_vqa tries the question kinds (the first the scene can pose is asked)."""
    if weights is None:  # every kind alike
        kinds = list(VQA_KINDS)
        rng.shuffle(kinds)
        return kinds
    # drawn by weight without replacement; a kind of weight 0 is never asked
    kinds, left = [], [(k, w) for k, w in zip(VQA_KINDS, weights, strict=True) if w > 0]
    while left:
        i = rng.choices(range(len(left)), weights=[w for _, w in left])[0]
        kinds.append(left.pop(i)[0])
    return kinds


def _vqa_count(facts: _Facts, focus: list[int], rng: random.Random, compositional: bool) -> _QA:
    if compositional:  # count a held-out pair
        if not focus:
            return None
        o = facts.objects[rng.choice(focus)]
        d = (rng.choice((None, o.size)), o.colour, o.shape)
    elif rng.random() < 0.85 and focus:  # a description of an object in the picture
        d = _desc(facts.objects[rng.choice(focus)], rng.choice(PATTERNS))
    else:  # any description, possibly of nothing here
        p = rng.choice(PATTERNS)
        d = (
            rng.choice(SIZES) if p[0] else None,
            rng.choice(tuple(COLOURS)) if p[1] else None,
            rng.choice(SHAPES) if p[2] else None,
        )
        if (d[2], d[1]) in HELD_OUT_PAIRS:
            return None
    members = facts.matching(d)
    boxes = [facts.objects[i].norm_box for i in members]
    return f"How many {_desc_words(d, plural=True)} are there?", str(len(members)), boxes


def _vqa_about_one(kind: str) -> Callable[[_Facts, list[int], random.Random, bool], _QA]:
    """color / shape / size / where questions: name the object by a description that leaves the answer out."""
    hidden = {"color": 1, "shape": 2, "size": 0, "where": None}[kind]
    patterns = [p for p in PATTERNS if hidden is None or not p[hidden]]

    def build(facts: _Facts, focus: list[int], rng: random.Random, compositional: bool) -> _QA:
        usable = (
            [p for p in patterns if p[1] and p[2]]
            if compositional and kind in ("size", "where")
            else patterns
        )
        options = []
        for i in focus:
            o = facts.objects[i]
            answer = {"color": o.colour, "shape": o.shape, "size": o.size, "where": None}[kind]
            if kind == "where":
                answer = facts.region(i)
                if answer is None:
                    continue
            options += [(i, d, answer) for d in facts.unique_patterns(i, usable)]
        if not options:
            return None
        i, d, answer = rng.choice(options)
        question = {
            "color": "What color is the {}?",
            "shape": "What shape is the {}?",
            "size": "What size is the {}?",
            "where": "Where is the {}?",
        }[kind].format(_desc_words(d))
        return question, answer, [facts.objects[i].norm_box]

    return build


def _vqa_exists(facts: _Facts, focus: list[int], rng: random.Random, compositional: bool) -> _QA:
    if compositional or rng.random() < 0.5:  # yes: describe an object in the picture
        if not focus:
            return None
        o = facts.objects[rng.choice(focus)]
        d = (rng.choice((None, o.size)), o.colour, o.shape)
    else:  # a description matching nothing here (a few tries)
        for _ in range(10):
            d = (rng.choice((None,) + SIZES), rng.choice(tuple(COLOURS)), rng.choice(SHAPES))
            if not facts.matching(d) and (d[2], d[1]) not in HELD_OUT_PAIRS:
                break
        else:
            return None
    members = facts.matching(d)
    return (
        f"Is there {_with_article(_desc_words(d))}?",
        "yes" if members else "no",
        [facts.objects[i].norm_box for i in members],
    )


_VQA = {
    "count": _vqa_count,
    "color": _vqa_about_one("color"),
    "shape": _vqa_about_one("shape"),
    "size": _vqa_about_one("size"),
    "where": _vqa_about_one("where"),
    "exists": _vqa_exists,
}

_BUILDERS = {
    "grounded_caption": lambda facts, focus, rng: _build_caption(facts, focus, rng, grounded=True),
    "caption": lambda facts, focus, rng: _build_caption(facts, focus, rng, grounded=False),
    "rec": _build_rec,
    "phrase_grounding": _build_phrase,
    "reg": _build_reg,
    "grounded_vqa": _build_grounded_vqa,
    "rec_absent": lambda facts, focus, rng: _build_rec_absent(facts, focus, rng),
    "rec_ambiguous": lambda facts, focus, rng: _build_rec_ambiguous(facts, focus, rng),
}  # "vqa" is built by _build_vqa with the kinds' weights (build_sample)


# ------------------------------------------------------------------------------------------------------------
# Streams and evaluation sets


def iter_samples(
    split: str = "train",
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    mixture: Mapping[str, float] | None = None,
    per_scene: int = 1,
) -> Iterator[dict[str, Any]]:
    """An endless stream of samples (see build_sample), tasks drawn by `mixture` weights.

    tasks: which tasks to draw (default: all in the mixture); mixture: task -> weight (DEFAULT_MIXTURE).
    per_scene: samples drawn from each scene (each with its own task), yielded one after the other and sharing
    one Scene object, so a training loop can render and encode that picture once for all of them.
    The stream is a pure function of its arguments. A draw the scene cannot pose is skipped. For evaluation
    use make_eval_set, which gives a fixed number per task.
    """
    _check_split(split)
    names, weights = _mixture(tasks, mixture)
    seed = _check_seed(seed)
    if isinstance(per_scene, bool) or not isinstance(per_scene, int) or per_scene < 1:
        raise ValueError(f"per_scene {per_scene!r} must be a positive int (samples per scene)")
    index = 0
    while True:
        scene = make_scene(scene_seed(split, seed, "scene", index), split)
        for k in range(per_scene):
            # k = 0 keeps the one-per-scene stream's draws, so per_scene only adds samples
            rng = random.Random(scene_seed(split, seed, "sample", index, *([k] if k else [])))
            task = rng.choices(names, weights=weights)[0]
            sample = build_sample(scene, task, rng)
            if sample is not None:
                yield sample
        index += 1


def make_eval_set(
    split: str = "test", n_per_task: int = 1000, tasks: Sequence[str] | None = None, seed: int | None = None
) -> list[dict[str, Any]]:
    """A fixed evaluation set: n_per_task samples for each task, each on its own scene.

    seed defaults to the split's fixed seed (SPLIT_SEEDS; 0 for train). The same arguments give the same set.
    """
    _check_split(split)
    if isinstance(n_per_task, bool) or not isinstance(n_per_task, int) or n_per_task < 1:
        raise ValueError(f"n_per_task {n_per_task!r} must be a positive int")
    names = list(TASKS) if tasks is None else _check_tasks(tasks)
    seed = SPLIT_SEEDS.get(split, 0) if seed is None else _check_seed(seed)
    out = []
    for task in names:
        index, found = 0, 0
        while found < n_per_task:
            scene = make_scene(scene_seed(split, seed, "eval", task, index), split)
            sample = build_sample(
                scene, task, random.Random(scene_seed(split, seed, "eval-sample", task, index))
            )
            index += 1
            if sample is not None:
                out.append(sample)
                found += 1
    return out


def corpus(n: int, seed: int = 0) -> list[str]:
    """n lines of the world's plain text (captions, expressions, questions and answers, prompts) for training
    a tokenizer; no markup tags (the tokenizer adds those as special tokens)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n {n!r} must be a non-negative int (number of lines)")
    seed = _check_seed(seed)
    lines = [
        "An image of",
        "Describe this image in detail:",
        "Question: Answer:",
        "It is",
        "It is the",
        "this object",
    ][:n]
    index = 0
    while len(lines) < n:
        scene = make_scene(scene_seed("train", seed, "corpus", index), "train")
        rng = random.Random(scene_seed("train", seed, "corpus-sample", index))
        index += 1
        task = ("caption", "rec", "reg", "vqa", "grounded_vqa")[index % 5]
        sample = build_sample(scene, task, rng)
        if sample is None:
            continue
        if task == "caption":
            line = sample["answer"]
        elif task == "rec":
            line = sample["expression"]
        elif task == "reg":
            line = f"It is {sample['expression']}"
        else:
            line = grounding.parse(f"{sample['prompt']}{sample['target']}").caption
        lines.append(line)
    return lines


# ------------------------------------------------------------------------------------------------------------
# Argument checks


def _check_split(split: object) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed {seed!r} must be an int")
    return seed


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    if isinstance(tasks, str):
        raise ValueError(f"tasks {tasks!r} must be a list of task names, e.g. [{tasks!r}]")
    names = list(tasks)
    if not names:
        raise ValueError(f"tasks is empty; choose from {ALL_TASKS}")
    for t in names:
        if t not in ALL_TASKS:
            raise ValueError(f"task {t!r} is not one of {ALL_TASKS}")
    return names


def _mixture(
    tasks: Sequence[str] | None, mixture: Mapping[str, float] | None
) -> tuple[list[str], list[float]]:
    weights = dict(DEFAULT_MIXTURE if mixture is None else mixture)
    for t, w in weights.items():
        if t not in ALL_TASKS:
            raise ValueError(f"mixture task {t!r} is not one of {ALL_TASKS}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"mixture weight {w!r} for {t!r} must be a finite number >= 0")
    names = [t for t in weights if weights[t] > 0] if tasks is None else _check_tasks(tasks)
    missing = [t for t in names if t not in weights]
    if missing:
        raise ValueError(
            f"tasks {missing} have no weight in the mixture {weights}; add them or leave them out"
        )
    if not names or sum(weights[t] for t in names) <= 0:
        raise ValueError(f"the mixture {weights} gives no task a positive weight")
    return names, [float(weights[t]) for t in names]
