"""Evaluation on in-memory or custom data: REC and phrase-grounding queries, the benchmarks' metrics.

The hook for the synthetic world of the default model (kosmos2/data/synthetic.py) and for any custom set:

    RecSample(id, image, expression, boxes)              → REC: first / any / mean box accuracy (metrics.py)
    PhraseSample(id, image, phrase, boxes, prompt)       → phrase grounding: R@1/5/10, ANY-box

Boxes are ground truth in pixels (x1, y1, x2, y2) of the image as given; a query may have several (the best
match counts, as for Flickr30k Entities). Images may be PIL images or paths. The prompts default to the
official ones (`refcoco.rec_prompt`, `flickr30k.grounding_prompt`); a sample may carry its own (the synthetic
world writes its prompts with a space before the phrase, as its model was trained).

`kosmos2 eval synthetic` evaluates the world's fixed evaluation set (`make_eval_set`), or a JSON Lines file of
samples (`load_samples`, the format is in docs/EVAL.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from kosmos2.eval import flickr30k, metrics, refcoco
from kosmos2.eval.runner import GroundingPredictor, PredictionCache, Query, run_queries

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class RecSample:
    """A referring expression and the pixel box(es) of what it refers to."""

    id: str
    image: Any  # PIL image or path
    expression: str
    boxes: Sequence[Box]
    prompt: str | None = None  # default: <grounding><phrase>{expression}</phrase>


@dataclass(frozen=True)
class PhraseSample:
    """A phrase of a caption (written into `prompt`) and its pixel box(es)."""

    id: str
    image: Any
    phrase: str
    boxes: Sequence[Box]
    prompt: str
    types: tuple[str, ...] = ()

    @classmethod
    def from_caption(
        cls,
        id: str,
        image: Any,
        caption: str,
        span: tuple[int, int],
        boxes: Sequence[Box],
        types: Sequence[str] = (),
    ) -> PhraseSample:
        """The official phrase-grounding prompt for caption[span] (flickr30k.grounding_prompt)."""
        start, end = span
        if not 0 <= start < end <= len(caption):
            raise ValueError(
                f"sample {id!r}: span {span} is not a non-empty range in a caption of {len(caption)} "
                "characters"
            )
        return cls(
            id, image, caption[start:end], boxes, flickr30k.grounding_prompt(caption, span), tuple(types)
        )


def _size(image: Any, where: str) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:  # reads the header only
                return im.size
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}: cannot read image {os.fspath(image)!r} ({e})") from e
    raise ValueError(f"{where}: image must be a PIL image or a file path, got {type(image).__name__}")


def _truth(boxes: Sequence[Box], where: str) -> list[Box]:
    if not boxes:
        raise ValueError(f"{where}: no ground-truth box; every query needs at least one")
    return [metrics.check_box(b, f"{where} box {i}") for i, b in enumerate(boxes)]


def evaluate(
    predictor: GroundingPredictor,
    out_dir: str | os.PathLike,
    *,
    rec: Sequence[RecSample] = (),
    phrases: Sequence[PhraseSample] = (),
    model_id: str,
    name: str = "synthetic",
    cache: PredictionCache | str | os.PathLike | None = None,
    batch_size: int = 8,
    generation: Mapping[str, Any] | None = None,
    progress: bool = True,
    samples: int = 16,
) -> dict[str, Any]:
    """Score REC samples and phrase samples; reports in out_dir/rec and out_dir/phrases; returns the metrics.

    Results: {"rec": {name: {"rec": rec_summary}}, "phrases": {name: {"recall": ..., "undecodable": n}}}
    (the same structure and numbers as `kosmos2 eval refcoco` / `kosmos2 eval flickr30k`).
    """
    if not rec and not phrases:
        raise ValueError("nothing to evaluate: give REC samples, phrase samples, or both")
    out_dir = Path(out_dir)
    cache = cache if cache is not None else out_dir / "predictions.jsonl"
    if not isinstance(cache, PredictionCache):
        cache = PredictionCache(cache)
    ids = [s.id for s in (*rec, *phrases)]
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids must be unique across REC and phrase samples (they key the cache)")
    images = {s.id: s.image for s in (*rec, *phrases)}

    def load(key: Any) -> Any:
        image = images[key] if key in images else key
        if isinstance(image, (str, os.PathLike)):
            from kosmos2.image import load_image

            return load_image(image)
        return image

    common = dict(
        model_id=model_id, cache=cache, batch_size=batch_size, generation=generation, progress=progress
    )
    result: dict[str, Any] = {"task": "synthetic", "model": model_id, "generation": dict(generation or {})}
    if rec:
        sizes = {s.id: _size(s.image, f"REC sample {s.id!r}") for s in rec}
        truths = {s.id: _truth(s.boxes, f"REC sample {s.id!r}") for s in rec}
        queries = [
            Query(s.id, s.image, s.prompt or refcoco.rec_prompt(s.expression), sizes[s.id]) for s in rec
        ]
        predictions, stats = run_queries(predictor, queries, **common)
        records = [
            refcoco.rec_record(
                id=s.id,
                dataset=name,
                split="rec",
                size=sizes[s.id],
                expression=s.expression,
                truth=truths[s.id],
                query=q,
                prediction=predictions[q.id],
            )
            for s, q in zip(rec, queries, strict=True)
        ]
        part = {
            "task": "rec",
            "model": model_id,
            "generation": dict(generation or {}),
            "protocol": "REC prompt; first generated box; IoU >= 0.5 with the best of the true boxes",
            "results": refcoco.summarize(records),
            "run": {"queries": stats.total, "from_cache": stats.cached, "computed": stats.computed},
        }
        refcoco.write_rec_report(out_dir / "rec", part, records, samples, load=load)
        result["rec"] = part
    if phrases:
        sizes = {s.id: _size(s.image, f"phrase sample {s.id!r}") for s in phrases}
        truths = {s.id: _truth(s.boxes, f"phrase sample {s.id!r}") for s in phrases}
        queries = [Query(s.id, s.image, s.prompt, sizes[s.id]) for s in phrases]
        predictions, stats = run_queries(predictor, queries, **common)
        records = []
        for s, q in zip(phrases, queries, strict=True):
            r = flickr30k.phrase_record(
                id=s.id,
                split=name,
                size=sizes[s.id],
                caption=s.phrase,
                span=(0, len(s.phrase)),
                types=s.types,
                truth=truths[s.id],
                query=q,
                prediction=predictions[q.id],
            )
            r["caption"] = q.prompt
            records.append(r)
        part = {
            "task": "phrase-grounding",
            "model": model_id,
            "generation": dict(generation or {}),
            "protocol": "phrase prompt; ANY-box; R@k over the first k generated boxes; IoU >= 0.5",
            "results": flickr30k.summarize(records),
            "run": {"queries": stats.total, "from_cache": stats.cached, "computed": stats.computed},
        }
        flickr30k.write_grounding_report(out_dir / "phrases", part, records, samples, load=load)
        result["phrases"] = part
    return result


# ------------------------------------------------------------------------------------------------------------
# Sources of samples


def world_samples(split: str = "test", n_per_task: int = 200) -> tuple[list[RecSample], list[PhraseSample]]:
    """The synthetic world's fixed evaluation set (`make_eval_set`): its REC and phrase-grounding samples.

    Images are rendered at their native size; boxes are the world's normalised boxes scaled to it; prompts are
    the ones the world trains with.
    """
    from kosmos2.data import synthetic as world

    rec, phrases = [], []
    for i, sample in enumerate(world.make_eval_set(split, n_per_task, tasks=("rec", "phrase_grounding"))):
        scene = sample["scene"]
        image = world.render(scene)
        w, h = image.size
        boxes = [(x1 * w, y1 * h, x2 * w, y2 * h) for x1, y1, x2, y2 in sample["boxes"]]
        key = f"{split}/{sample['task']}/{i}/{sample['scene_id']}"
        if sample["task"] == "rec":
            rec.append(RecSample(key, image, sample["expression"], boxes, sample["prompt"]))
        else:
            phrases.append(PhraseSample(key, image, sample["expression"], boxes, sample["prompt"]))
    return rec, phrases


def load_samples(path: str | os.PathLike) -> tuple[list[RecSample], list[PhraseSample]]:
    """Samples from a JSON Lines file; image paths are relative to the file's folder.

    REC line:    {"id": "q1", "image": "a.png", "expression": "the red ball", "boxes": [[x1, y1, x2, y2]]}
    Phrase line: {"id": "q2", "image": "a.png", "caption": "A dog chases a ball", "span": [14, 19],
                  "boxes": [[...], ...], "types": ["toys"]}       (boxes in pixels; "prompt" optional in both)
    """
    path = Path(path)
    rec: list[RecSample] = []
    phrases: list[PhraseSample] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
            key, image, boxes = str(row["id"]), path.parent / row["image"], row["boxes"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{where}: need a JSON object with id, image, boxes ({e})") from e
        if "expression" in row:
            rec.append(RecSample(key, image, row["expression"], boxes, row.get("prompt")))
        elif "caption" in row and "span" in row:
            sample = PhraseSample.from_caption(
                key, image, row["caption"], tuple(row["span"]), boxes, row.get("types", ())
            )
            if row.get("prompt"):
                sample = PhraseSample(key, image, sample.phrase, boxes, row["prompt"], sample.types)
            phrases.append(sample)
        else:
            raise ValueError(f"{where}: a sample needs 'expression' (REC) or 'caption' and 'span' (phrase)")
    if not rec and not phrases:
        raise ValueError(f"{path}: no samples")
    return rec, phrases
