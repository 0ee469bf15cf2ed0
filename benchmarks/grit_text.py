"""Speed of the GRIT text stage (kosmos2/data/grit_text.py): captions per second, one process.

    python benchmarks/grit_text.py [--captions 4000] [--batch-size 256]

Prints captions/s for the whole stage (parse + noun chunks + abstract filter + expansion), for the spaCy
parse alone, for chunking and expansion on parsed docs, and for the full pipeline with NER and the
lemmatiser left in (what excluding them saves). The captions are 14 words, the length the goal of
1,000 captions/s per core was set for. benchmarks/grit.py can call `measure`.
"""

from __future__ import annotations

import argparse
import random
import time

from kosmos2.data import grit_text

PEOPLE = ["man", "woman", "boy", "girl", "chef", "farmer", "tourist", "surfer", "student", "officer"]
ANIMALS = ["dogs", "cats", "horses", "ducks", "cows", "sheep", "zebras", "birds", "goats", "puppies"]
ADJECTIVES = ["young", "tall", "smiling", "small", "old", "happy", "busy", "quiet", "large", "tired"]
COLORS = ["red", "blue", "green", "black", "white", "yellow", "pink", "gray", "brown", "orange"]
CLOTHES = ["shirt", "jacket", "dress", "hat", "coat", "sweater", "scarf", "uniform", "raincoat", "hoodie"]
VERBS = ["holding", "carrying", "pushing", "riding", "pulling", "feeding", "watching", "painting"]
OBJECTS = ["bicycle", "umbrella", "cart", "kite", "guitar", "basket", "ladder", "suitcase", "stroller"]
PREPOSITIONS = ["across", "along", "near", "behind", "through", "around", "beside", "past"]
PLACES = ["street", "park", "beach", "bridge", "market", "station", "garden", "river", "square", "harbor"]
BUILDINGS = ["house", "church", "barn", "school", "shop", "tower", "library", "museum", "cafe", "hotel"]
THINGS = ["windows", "doors", "flowers", "flags", "shutters", "balconies", "awnings", "lanterns"]


def make_captions(n: int, seed: int = 0) -> list[str]:
    """n varied 14-word captions from two templates (people and animals in scenes)."""
    rng = random.Random(seed)
    captions = []
    for i in range(n):
        if i % 2 == 0:  # "A young man in a red shirt is holding the umbrella across the street"
            caption = (
                f"A {rng.choice(ADJECTIVES)} {rng.choice(PEOPLE)} in a {rng.choice(COLORS)} "
                f"{rng.choice(CLOTHES)} is {rng.choice(VERBS)} the {rng.choice(OBJECTS)} "
                f"{rng.choice(PREPOSITIONS)} the {rng.choice(PLACES)}"
            )
        else:  # "Two dogs resting near a quiet park next to the barn with red flags"
            caption = (
                f"Two {rng.choice(ANIMALS)} resting {rng.choice(PREPOSITIONS)} a {rng.choice(ADJECTIVES)} "
                f"{rng.choice(PLACES)} next to the {rng.choice(BUILDINGS)} with {rng.choice(COLORS)} "
                f"{rng.choice(THINGS)}"
            )
        assert len(caption.split()) == 14, caption
        captions.append(caption)
    return captions


def _rates(n: int, run) -> tuple[float, float]:
    """(wall-clock, CPU-time) items per second of run(). CPU time is the per-core figure that a machine
    shared with other work still measures fairly (the process's CPU time over all its threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def measure(captions: list[str], nlp=None, batch_size: int = 256) -> dict[str, tuple[float, float]]:
    """{part: (wall-clock, CPU-time) captions/s} of the text stage and of its parts, one process."""
    nlp = nlp if nlp is not None else grit_text.load_pipeline()
    grit_text.process_captions(captions[:200], batch_size=batch_size, nlp=nlp)  # warm up
    n, docs = len(captions), []
    return {
        "text stage": _rates(n, lambda: grit_text.process_captions(captions, batch_size=batch_size, nlp=nlp)),
        "parse only": _rates(n, lambda: docs.extend(nlp.pipe(captions, batch_size=batch_size))),
        "chunks + expansion": _rates(n, lambda: [grit_text.parse_doc(doc) for doc in docs]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    import spacy
    import thinc

    captions = make_captions(args.captions)
    nlp = grit_text.load_pipeline()
    print(f"spaCy {spacy.__version__}, thinc {thinc.__version__}, {nlp.meta['name']} {nlp.meta['version']}")
    print(f"{len(captions)} captions of {len(captions[0].split())} words, batch size {args.batch_size}")
    print(f"  {'':>20}  {'wall':>9}  {'per CPU-s':>9}  (captions/s)")
    for name, (wall, cpu) in measure(captions, nlp, args.batch_size).items():
        print(f"  {name:>20}: {wall:9.0f}  {cpu:9.0f}")
    full = spacy.load(grit_text.default_pipeline_name())  # NER and lemmatiser included
    wall, cpu = _rates(len(captions), lambda: list(full.pipe(captions, batch_size=args.batch_size)))
    print(f"  {'parse, ner + lemma':>20}: {wall:9.0f}  {cpu:9.0f}")


if __name__ == "__main__":
    main()
