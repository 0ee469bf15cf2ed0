"""Write a COCO-format dataset of app screens for `kosmos2 finetune`'s worked example.

    python examples/ui_screens.py OUT [--train 1500] [--val 200] [--size 256] [--seed 0]
    -> OUT/images/*.png, OUT/instances_train.json, OUT/instances_val.json

Each screen (light background, a title bar, grey lines of "text" that are not annotated) holds 3-5 UI
elements of five kinds in six colours. A COCO category is a colour and a kind ("blue button"), so
`kosmos2.data.sources` makes captions ("An image of blue button, red slider and green toggle."), REC
("the blue button"; "the blue button on the left" when a screen has two) and REG from it. About one screen
in four repeats an element side by side or one above the other, so positions are needed to tell them apart.

The words fit the built-in default model's vocabulary, which has no "k" or "x": a "checkbox" is drawn as a
"toggle" switch and a text field is an input "field". Elements are at least 28 px on their short side at the
256 px default, so about 3.5 cells of the 32x32 location grid and 14 px at the default model's 128 px input.
Deterministic in --seed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

KINDS = ("button", "toggle", "slider", "field", "icon")
COLOURS = {
    "blue": (40, 90, 220),
    "red": (215, 45, 45),
    "green": (40, 160, 70),
    "yellow": (235, 195, 30),
    "purple": (135, 60, 190),
    "orange": (245, 130, 30),
}
# (min width, max width, min height, max height) at size 256; scaled with --size
SIZES = {
    "button": (80, 120, 34, 46),
    "toggle": (56, 72, 30, 36),
    "slider": (100, 150, 28, 32),
    "field": (110, 160, 34, 42),
    "icon": (40, 52, 40, 52),
}
TITLE_BAR = 22  # px at 256: not annotated


def _overlaps(a: list[float], b: list[float], gap: float) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _draw(
    draw: ImageDraw.ImageDraw, kind: str, box: list[float], rgb: tuple[int, int, int], rng: random.Random
):
    x1, y1, x2, y2 = box
    h = y2 - y1
    if kind == "button":
        draw.rounded_rectangle(box, radius=h * 0.3, fill=rgb)
        for i in range(rng.randint(1, 2)):  # a "label": white bars
            w = (x2 - x1) * rng.uniform(0.25, 0.4)
            cx = (x1 + x2) / 2 + (i - 0.5) * w * 0.6 if i else (x1 + x2) / 2
            draw.rectangle([cx - w / 2, y1 + h * 0.42, cx + w / 2, y1 + h * 0.58], fill=(255, 255, 255))
    elif kind == "toggle":
        draw.rounded_rectangle(box, radius=h / 2, fill=rgb)
        on = rng.random() < 0.5
        r = h * 0.38
        cx = x2 - h / 2 if on else x1 + h / 2
        draw.ellipse([cx - r, (y1 + y2) / 2 - r, cx + r, (y1 + y2) / 2 + r], fill=(255, 255, 255))
    elif kind == "slider":
        cy = (y1 + y2) / 2
        draw.rounded_rectangle([x1, cy - 3, x2, cy + 3], radius=3, fill=(200, 200, 205))
        knob = rng.uniform(x1 + h / 2, x2 - h / 2)
        draw.rounded_rectangle([x1, cy - 3, knob, cy + 3], radius=3, fill=rgb)
        draw.ellipse([knob - h / 2, y1, knob + h / 2, y2], fill=rgb)
    elif kind == "field":
        draw.rectangle(box, fill=(255, 255, 255), outline=rgb, width=3)
        w = (x2 - x1) * rng.uniform(0.3, 0.6)
        draw.rectangle([x1 + 8, y1 + h * 0.4, x1 + 8 + w, y1 + h * 0.6], fill=(170, 170, 175))
    else:  # icon: a rounded square with a white glyph
        draw.rounded_rectangle(box, radius=h * 0.25, fill=rgb)
        m = h * 0.28
        glyph = rng.choice(("circle", "square", "bar"))
        inner = [x1 + m, y1 + m, x2 - m, y2 - m]
        if glyph == "circle":
            draw.ellipse(inner, fill=(255, 255, 255))
        elif glyph == "square":
            draw.rectangle(inner, outline=(255, 255, 255), width=3)
        else:
            draw.rectangle([x1 + m, (y1 + y2) / 2 - 3, x2 - m, (y1 + y2) / 2 + 3], fill=(255, 255, 255))


def make_screen(rng: random.Random, size: int) -> tuple[Image.Image, list[tuple[str, list[float]]]]:
    """One screen and its elements (category name, [x, y, w, h] pixels)."""
    s = size / 256
    bg = tuple(rng.randint(236, 252) for _ in range(3))
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, size, TITLE_BAR * s], fill=tuple(rng.randint(50, 90) for _ in range(3)))
    placed: list[list[float]] = []
    elements: list[tuple[str, list[float]]] = []

    def place(kind: str, colour: str, region: tuple[float, float, float, float] | None = None) -> bool:
        lo_w, hi_w, lo_h, hi_h = (v * s for v in SIZES[kind])
        for _ in range(200):
            w, h = rng.uniform(lo_w, hi_w), rng.uniform(lo_h, hi_h)
            rx1, ry1, rx2, ry2 = region or (4 * s, (TITLE_BAR + 6) * s, size - 4 * s, size - 4 * s)
            if rx2 - rx1 < w or ry2 - ry1 < h:
                return False
            x, y = rng.uniform(rx1, rx2 - w), rng.uniform(ry1, ry2 - h)
            box = [x, y, x + w, y + h]
            if all(not _overlaps(box, p, 6 * s) for p in placed):
                placed.append(box)
                elements.append((f"{colour} {kind}", box))
                return True
        return False

    if rng.random() < 0.25:  # a repeated element: two of one kind and colour, apart left/right or top/bottom
        kind, colour = rng.choice(KINDS), rng.choice(list(COLOURS))
        top = (TITLE_BAR + 6) * s
        if rng.random() < 0.5:
            halves = [
                (4 * s, top, size / 2 - 8 * s, size - 4 * s),
                (size / 2 + 8 * s, top, size - 4 * s, size - 4 * s),
            ]
        else:
            mid = (top + size) / 2
            halves = [
                (4 * s, top, size - 4 * s, mid - 8 * s),
                (4 * s, mid + 8 * s, size - 4 * s, size - 4 * s),
            ]
        for region in halves:
            place(kind, colour, region)
    for _ in range(rng.randint(3, 5) - len(elements)):
        used = {name for name, _ in elements}
        for _ in range(20):
            kind, colour = rng.choice(KINDS), rng.choice(list(COLOURS))
            if f"{colour} {kind}" not in used:
                break
        place(kind, colour)
    for _ in range(rng.randint(2, 5)):  # unannotated grey "text" lines in the gaps
        w, y = rng.uniform(30, 90) * s, rng.uniform((TITLE_BAR + 4) * s, size - 10 * s)
        x = rng.uniform(4 * s, size - w - 4 * s)
        line = [x, y, x + w, y + 5 * s]
        if all(not _overlaps(line, p, 3 * s) for p in placed):
            draw.rectangle(line, fill=(150, 150, 155))
    for name, box in elements:
        colour, kind = name.split(" ")
        _draw(draw, kind, box, COLOURS[colour], rng)
    return image, [(n, [b[0], b[1], b[2] - b[0], b[3] - b[1]]) for n, b in elements]


def write_split(out: Path, split: str, count: int, size: int, seed: int, categories: dict[str, int]) -> Path:
    rng = random.Random(f"{seed}:{split}")
    images, annotations = [], []
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, elements = make_screen(rng, size)
        name = f"{split}_{i:05d}.png"
        image.save(out / "images" / name)
        image_id = len(images) + 1 + (0 if split == "train" else 1_000_000)
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
        for cat, bbox in elements:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": categories[cat],
                    "bbox": [round(v, 2) for v in bbox],
                    "area": round(bbox[2] * bbox[3], 2),
                    "iscrowd": 0,
                }
            )
    cats = [{"id": i, "name": n, "supercategory": n.split(" ")[1]} for n, i in categories.items()]
    path = out / f"instances_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=1500)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    categories = {f"{c} {k}": i + 1 for i, (k, c) in enumerate((k, c) for k in KINDS for c in COLOURS)}
    for split, count in (("train", args.train), ("val", args.val)):
        path = write_split(args.out, split, count, args.size, args.seed, categories)
        print(f"wrote {path} ({count} screens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
