"""Does crop-and-ask help on small objects? `Predictor.zoom` against asking about the whole image.

On held-out test scenes of the synthetic world, a small object that its full description singles out is
located by that description; grounded VQA ("What color / shape is this object?") about the located box is
asked once on the whole image and once on the zoom crop, with the box mapped into the crop. Prints the
accuracies (all, by question kind, on pictures under 200 px) as JSON. docs/TRUST.md records what it measured.

    python tools/zoom_gain.py --queries 300 --margin 1.0
    python tools/zoom_gain.py --model runs/default/model --margin 0.5
"""

from __future__ import annotations

import argparse
import json
import random

from kosmos2 import grounding
from kosmos2.data import synthetic as world
from kosmos2.predictor import Predictor

QUESTION = "What {} is this object?"
PHRASE = " this object"


def ask(predictor: Predictor, image, box, kind: str) -> str:
    """Grounded VQA about a pixel box of `image` (the world's training prompt for it)."""
    question = QUESTION.format(kind)
    start = question.index(PHRASE)
    normalised = tuple(min(max(v, 0.0), 1.0) for v in grounding.box_to_normalized(box, *image.size))
    marked = grounding.markup(question, [(start, start + len(PHRASE), [normalised])])
    return predictor.vqa(image, marked, grounded=True, no_repeat_ngram_size=0).answer.strip()


def measure(predictor: Predictor, queries: int, margin: float, seed: int = 1) -> dict:
    rows, index = [], 0
    while len(rows) < queries:
        scene = world.make_scene(world.scene_seed("test", seed, "zoom-gain", index), "test")
        index += 1
        twins = world.twin_facts(scene)
        small = [i for i, o in enumerate(scene.objects) if o.size == "small" and twins[i][0] == 1]
        if not small:
            continue
        rng = random.Random(index)
        target = scene.objects[rng.choice(small)]
        kind = rng.choice(["color", "shape"])
        truth = target.colour if kind == "color" else target.shape
        image = world.render(scene)
        z = predictor.zoom(image, "the " + target.words, then=lambda crop: crop, margin=margin, force=True)
        box = z.located.pixel_box
        row = {"kind": kind, "side": (scene.width * scene.height) ** 0.5, "whole": False, "zoom": False}
        if box is not None:
            left, top = z.crop_box[:2]
            inside = (box[0] - left, box[1] - top, box[2] - left, box[3] - top)
            row["whole"] = ask(predictor, image, box, kind) == truth
            row["zoom"] = ask(predictor, z.crop, inside, kind) == truth
        rows.append(row)

    def accuracy(subset: list[dict]) -> dict:
        n = len(subset)
        return {
            "n": n,
            "whole": sum(r["whole"] for r in subset) / n if n else None,
            "zoom": sum(r["zoom"] for r in subset) / n if n else None,
        }

    return {
        "margin": margin,
        "all": accuracy(rows),
        "color": accuracy([r for r in rows if r["kind"] == "color"]),
        "shape": accuracy([r for r in rows if r["kind"] == "shape"]),
        "images_under_200px": accuracy([r for r in rows if r["side"] < 200]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: the built-in model)")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--margin", type=float, default=1.0)
    args = parser.parse_args(argv)
    print(json.dumps(measure(Predictor.from_pretrained(args.model), args.queries, args.margin), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
