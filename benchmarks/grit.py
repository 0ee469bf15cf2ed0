"""Throughput of GRIT construction: captions/s of the text stage and images/s of the detector stage.

    python benchmarks/grit.py                       # tiny random OWLv2 built on the fly, 1 and 2 workers
    python benchmarks/grit.py --detector grounding-dino --model-dir /models/grounding-dino-tiny --device cuda

Text stage: spaCy parse + noun chunks + abstract filter + referring-expression expansion
(`grit_text.process_captions`) on synthetic captions of about 14 words, in one process and in `--workers`
processes (each with its own pipeline; loading is not timed). Detector stage: `grit.detector_stage` (JPEG
decoding, the detector, the 0.65 rule and NMS, record building) on 640x480 JPEGs with the captions' chunks,
in one process and in `--workers` processes. Without --model-dir a tiny random model is built from a config
(no download): its numbers measure the pipeline around the model, not a real detector's cost.

Prints one JSON line per measurement and a summary table.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SUBJECTS = [
    "a young man in a red shirt",
    "two small dogs with fluffy tails",
    "an old woman holding an umbrella",
    "a black cat on a wooden chair",
    "a group of children in school uniforms",
    "a white truck with a blue logo",
    "a brown horse and its rider",
    "a little girl with a pink balloon",
]
VERBS = ["is walking along", "are playing near", "is sitting beside", "waits next to", "stands in front of"]
PLACES = [
    "the sandy beach at sunset",
    "a busy city street",
    "a tall tree in the park",
    "the old stone bridge",
    "a field of yellow flowers",
    "the kitchen table",
]


def make_captions(n: int, seed: int = 0) -> list[str]:
    """n captions of 11-16 words (about 14 on average) from fixed templates (deterministic)."""
    rng = random.Random(seed)
    return [
        f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(PLACES)}." for _ in range(n)
    ]


# ------------------------------------------------------------------------------------------------------------
# Text stage


_nlp = None


def _text_init(pipeline: str | None) -> None:
    global _nlp
    from kosmos2.data import grit_text

    _nlp = grit_text.load_pipeline(pipeline)


def _text_work(captions: list[str]) -> int:
    from kosmos2.data import grit_text

    return len(grit_text.process_captions(captions, nlp=_nlp))


def bench_text(captions: list[str], workers: int, pipeline: str | None) -> float:
    """Captions per second of the text stage with `workers` processes (pipeline loading excluded)."""
    if workers == 1:
        _text_init(pipeline)
        _text_work(captions[:64])  # warm-up
        began = time.perf_counter()
        _text_work(captions)
        return len(captions) / (time.perf_counter() - began)
    chunk = max(1, len(captions) // (8 * workers))
    pieces = [captions[i : i + chunk] for i in range(0, len(captions), chunk)]
    with multiprocessing.get_context("spawn").Pool(workers, _text_init, (pipeline,)) as pool:
        pool.map(_text_work, [captions[:64]] * workers)  # load and warm every worker
        began = time.perf_counter()
        done = sum(pool.map(_text_work, pieces))
        return done / (time.perf_counter() - began)


# ------------------------------------------------------------------------------------------------------------
# Detector stage


def make_pairs(captions: list[str]) -> list:
    """Pairs with 640x480 JPEG images of random blocks (their content does not matter to the timing)."""
    from PIL import Image, ImageDraw

    from kosmos2.data.grit import Pair

    rng = random.Random(1)
    pairs = []
    for i, caption in enumerate(captions):
        image = Image.new("RGB", (640, 480), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.randrange(600), rng.randrange(440)
            draw.rectangle((x, y, x + 40, y + 40), fill=tuple(rng.randrange(256) for _ in range(3)))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        pairs.append(Pair(key=f"{i:09d}", id=i, caption=caption, image=buffer.getvalue(), source="bench"))
    return pairs


_detector = None


def _detector_init(settings, threads: int) -> None:
    global _detector
    import torch

    from kosmos2.data.grit import build_detector

    if threads:
        torch.set_num_threads(threads)
    _detector = build_detector(settings)


def _detector_work(args) -> int:
    from kosmos2.data.grit import detector_stage

    settings, pairs, parses = args
    detector_stage(0, pairs, parses, _detector, settings)
    return len(pairs)


def bench_detector(settings, pairs: list, parses: list, workers: int) -> float:
    """Images per second of the detector stage with `workers` processes (model loading excluded)."""
    if workers == 1:
        _detector_init(settings, threads=0)
        _detector_work((settings, pairs[: settings.batch_size], parses[: settings.batch_size]))  # warm-up
        began = time.perf_counter()
        _detector_work((settings, pairs, parses))
        return len(pairs) / (time.perf_counter() - began)
    threads = max(1, (os.cpu_count() or 1) // workers)
    step = settings.batch_size
    jobs = [(settings, pairs[i : i + step], parses[i : i + step]) for i in range(0, len(pairs), step)]
    with multiprocessing.get_context("spawn").Pool(workers, _detector_init, (settings, threads)) as pool:
        pool.map(_detector_work, jobs[:workers])  # load and warm every worker
        began = time.perf_counter()
        done = sum(pool.map(_detector_work, jobs))
        return done / (time.perf_counter() - began)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--captions", type=int, default=3000, help="captions for the text stage")
    parser.add_argument("--images", type=int, default=64, help="images for the detector stage")
    parser.add_argument("--workers", type=int, default=2, help="processes for the multi-process runs")
    parser.add_argument("--detector", choices=("owlv2", "grounding-dino"), default="owlv2")
    parser.add_argument("--model-dir", help="a real local model (default: a tiny random one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--spacy-pipeline", help="spaCy pipeline name or directory")
    parser.add_argument("--skip-detector", action="store_true")
    args = parser.parse_args(argv)

    from kosmos2.data import grit_text
    from kosmos2.data.grit import BuildSettings

    rows = []
    captions = make_captions(args.captions)
    words = sum(len(c.split()) for c in captions) / len(captions)
    for workers in sorted({1, args.workers}):
        rate = bench_text(captions, workers, args.spacy_pipeline)
        rows.append({"stage": "text", "workers": workers, "per_s": rate, "unit": "captions", "words": words})
        print(json.dumps(rows[-1]), flush=True)

    if not args.skip_detector:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = args.model_dir
            if model_dir is None:
                sys.path.insert(0, str(REPO / "tests"))
                from _detector_fixtures import build_grounding_dino, build_owlv2

                build = build_owlv2 if args.detector == "owlv2" else build_grounding_dino
                model_dir = str(build(Path(tmp) / "model"))
            settings = BuildSettings(
                input=tmp,
                output=tmp,
                detector=args.detector,
                detector_path=model_dir,
                device=args.device,
                batch_size=args.batch_size,
            )
            pairs = make_pairs(captions[: args.images])
            parses = grit_text.process_captions([p.caption for p in pairs])
            for workers in sorted({1, args.workers}):
                rate = bench_detector(settings, pairs, parses, workers)
                model = "tiny random" if args.model_dir is None else model_dir
                rows.append(
                    {"stage": "detector", "workers": workers, "per_s": rate, "unit": "images", "model": model}
                )
                print(json.dumps(rows[-1]), flush=True)

    print(f"\n{'stage':<10}{'workers':>8}{'per second':>14}  unit   (cpu cores: {os.cpu_count()})")
    for row in rows:
        print(f"{row['stage']:<10}{row['workers']:>8}{row['per_s']:>14.1f}  {row['unit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
