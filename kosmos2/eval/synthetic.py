"""Evaluation on the synthetic world of the default model, and on in-memory or custom REC / phrase samples.

`kosmos2 eval synthetic` measures a model on the world's fixed held-out sets (`kosmos2.data.synthetic`,
`make_eval_set(split, n_per_task)`: the test split, and the compositional split of unseen shape×colour
pairs) with every task the world trains, and checks the default model's targets (TARGETS):

    make_eval_set ─► one Query per sample: id "<split>/<task>/<index>/<scene id>", the sample's own prompt,
                     the scene (rendered at its native size when its batch runs)
                  ─► runner.run_queries (batched Predictor.ground, resumable cache) ─► score ─► summarize
                  ─► OUT/metrics.json, records.jsonl, report.md (targets beside the measurements),
                     examples/<split>_<task>.png (true boxes green, predicted red), rec_iou_<split>.png

Prompts: each query sends the sample's `prompt` field, exactly what the model read in training, through
`Predictor.ground`. For REC, phrase grounding, REG and VQA these tokenise to the same ids as the prompts of
the Predictor's helpers (`locate`, `ground_phrases`, `describe_region`, `vqa`; the world writes the space
before a phrase inside it, which the tokenizer swallows), so the numbers are what those helpers give.
Decoding (GENERATION): greedy, up to 96 new tokens, no n-gram blocking: the world's captions legitimately
repeat trigrams ("</object>,<phrase> a small"), which the official no-repeat-ngram 3 would forbid.

What is scored (metrics.py has the functions; all values are fractions in [0, 1]):

    rec               Acc@0.5 of the first box attached to the expression (the official REC protocol,
                      refcoco.rec_record), plus the any-box and mean-box variants; by expression form
    phrase_grounding  R@1/5/10 ANY-box (the Flickr30k protocol), and box precision / recall: the phrase's
                      predicted boxes paired one-to-one with its true boxes (a group phrase has several)
    grounded_caption  entity precision / recall over (phrase, box) pairs: a predicted pair is a true
                      positive when its phrase equals a true phrase after normalize_answer (lower case,
                      whitespace collapsed, trailing period dropped) and its box is paired one-to-one with a
                      true box of that phrase at IoU ≥ 0.5 (maximum matching); precision over all predicted
                      pairs, recall over all true pairs, summed over the split first (micro average). Also:
                      the share of captions with every pair right and none extra, caption-text exact match,
                      and P/R apart for captions with and without a group of identical objects
    reg               exact match of the generated description with the world's canonical one (normalised);
                      misses counted by the part that is wrong (size, colour, shape, the position word that
                      tells twins apart, or not of the form "the <size> <colour> <shape>[ <position>]")
    vqa, grounded_vqa accuracy: exact match of the normalised answer; by question kind
    caption           exact match of the plain caption (normalised; not in the default task list)

A query whose output has no decodable box is a miss (counted in "no box"), never skipped. Boxes are compared
in pixels of the rendered image (IoU is the same in the normalised frame).

The older hook for custom sets stays: RecSample / PhraseSample through `evaluate` (REC first/any/mean box and
phrase-grounding R@k, the same reports as the benchmarks), or a JSON Lines file through `load_samples`
(`kosmos2 eval synthetic --samples-file F.jsonl`, format in docs/EVAL.md). Boxes there are ground truth in
pixels (x1, y1, x2, y2) of the image as given; a query may have several (the best match counts).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from kosmos2.eval import flickr30k, metrics, refcoco, report
from kosmos2.eval.runner import (
    GroundingPredictor,
    PredictionCache,
    Query,
    default_cache,
    generation_record,
    load_stored_frame,
    pinned_generation,
    run_queries,
)
from kosmos2.fileio import atomic_write_text

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
    generation: changes to the world's decoding (GENERATION); None: GENERATION. Images are read as stored
    (no EXIF rotation), as their pixel boxes are given.
    """
    if not rec and not phrases:
        raise ValueError("nothing to evaluate: give REC samples, phrase samples, or both")
    out_dir = Path(out_dir)
    cache = default_cache(cache, out_dir)
    if not isinstance(cache, PredictionCache):
        cache = PredictionCache(cache)
    ids = [s.id for s in (*rec, *phrases)]
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids must be unique across REC and phrase samples (they key the cache)")
    images = {s.id: s.image for s in (*rec, *phrases)}

    def load(key: Any) -> Any:
        # as stored (no EXIF rotation): the sizes above and the boxes are of the stored frame
        return load_stored_frame(images[key] if key in images else key)

    generation = pinned_generation(GENERATION, generation)
    common = dict(
        model_id=model_id, cache=cache, batch_size=batch_size, generation=generation, progress=progress
    )
    result: dict[str, Any] = {
        "task": "synthetic",
        "model": model_id,
        **generation_record(GENERATION, generation),
    }
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
        part = refcoco.rec_result(
            records,
            stats,
            model_id=model_id,
            generation=generation,
            protocol="REC prompt; first generated box; IoU >= 0.5 with the best of the true boxes",
            protocol_generation=GENERATION,
        )
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
        part = flickr30k.grounding_result(
            records,
            stats,
            model_id=model_id,
            generation=generation,
            protocol="phrase prompt; ANY-box; R@k over the first k generated boxes; IoU >= 0.5",
            protocol_generation=GENERATION,
        )
        flickr30k.write_grounding_report(out_dir / "phrases", part, records, samples, load=load)
        result["phrases"] = part
    return result


# ------------------------------------------------------------------------------------------------------------
# Custom samples from a file


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


# ------------------------------------------------------------------------------------------------------------
# The synthetic world: queries

WORLD_TASKS = ("rec", "phrase_grounding", "grounded_caption", "caption", "reg", "grounded_vqa", "vqa")
DEFAULT_TASKS = ("rec", "phrase_grounding", "grounded_caption", "reg", "grounded_vqa", "vqa")
HELD_OUT_SPLITS = ("test", "compositional")
# Every decoding option, passed explicitly: a checkpoint's generation_config.json decides nothing.
GENERATION = {
    "max_new_tokens": 96,
    "num_beams": 1,
    "do_sample": False,
    "no_repeat_ngram_size": 0,
    "length_penalty": 1.0,
}
TASK_NAMES = {
    "rec": "REC",
    "phrase_grounding": "phrase grounding",
    "grounded_caption": "grounded caption",
    "caption": "caption (plain)",
    "reg": "REG",
    "grounded_vqa": "VQA (grounded)",
    "vqa": "VQA (plain)",
}
BOX_TASKS = ("rec", "phrase_grounding", "grounded_caption")  # the tasks drawn on the example sheets


@dataclass(frozen=True)
class WorldQuery:
    """A world sample (`make_eval_set`'s dict) and the model call that answers it.

    query.image is the sample's Scene: it is rendered at its native size only when its batch runs (12,000
    pictures of up to 448 px would not fit in memory at once), and its size is known without rendering.
    """

    query: Query
    sample: Mapping[str, Any]


def world_queries(split: str, n_per_task: int, tasks: Sequence[str] = DEFAULT_TASKS) -> list[WorldQuery]:
    """The queries of `make_eval_set(split, n_per_task, tasks)`, grouped by task (batches stay one task).

    A query's id names its split, task, index within the task and scene: the first n of a task are the same
    samples whatever n_per_task is, so a small run's cached predictions are reused by a larger one.
    """
    from kosmos2.data import synthetic as world

    tasks = _check_world_tasks(tasks)
    out, index = [], dict.fromkeys(tasks, 0)
    for sample in world.make_eval_set(split, n_per_task, tasks=tasks):
        scene, task = sample["scene"], sample["task"]
        key = f"{split}/{task}/{index[task]}/{sample['scene_id']:016x}"
        index[task] += 1
        out.append(WorldQuery(Query(key, scene, sample["prompt"], (scene.width, scene.height)), sample))
    return out


def _check_world_tasks(tasks: Sequence[str]) -> list[str]:
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of task names from {WORLD_TASKS}, got {tasks!r}")
    unknown = [t for t in tasks if t not in WORLD_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the world's tasks are {WORLD_TASKS}")
    return list(dict.fromkeys(tasks))


def _render(scene: Any) -> Image.Image:
    from kosmos2.data.synthetic import render

    return render(scene)


# ------------------------------------------------------------------------------------------------------------
# The synthetic world: scoring one query


def _pixels(boxes: Sequence[Sequence[float]], size: tuple[int, int]) -> list[Box]:
    w, h = size
    return [(b[0] * w, b[1] * h, b[2] * w, b[3] * h) for b in boxes]


def score_world(item: WorldQuery, prediction: Any) -> dict[str, Any]:
    """One JSON-ready record: the query, what the model generated, and its task's scores (module docstring).

    prediction: a runner.Prediction (text, caption, entities with normalised boxes).
    """
    q, s = item.query, item.sample
    split, task, size = s["split"], s["task"], q.size
    base = {"id": q.id, "split": split, "task": task, "scene_id": s["scene_id"]}
    truth = _pixels(s["boxes"], size)
    if task == "rec":
        r = refcoco.rec_record(
            id=q.id,
            dataset="synthetic",
            split=split,
            size=size,
            expression=s["expression"],
            truth=truth,
            query=q,
            prediction=prediction,
        )
        return {**base, **r, "form": s.get("form"), "correct": r["correct_first"]}
    if task == "phrase_grounding":
        r = flickr30k.phrase_record(
            id=q.id,
            split=split,
            size=size,
            caption=s["expression"],
            span=(0, len(s["expression"])),
            types=(),
            truth=truth,
            query=q,
            prediction=prediction,
        )
        r["caption"] = q.prompt
        matched = metrics.max_matching(r["predicted"], truth)
        counts = {"pairs_matched": matched, "pairs_predicted": len(r["predicted"]), "pairs_true": len(truth)}
        return {**base, **r, **counts, "correct": r["ious"]["1"] >= metrics.IOU_THRESHOLD}
    common = {**base, "size": list(size), "prompt": q.prompt, "text": prediction.text}
    if task == "grounded_caption":
        predicted = [(p, _pixels(boxes, size)) for p, boxes in prediction.entities]
        true = [(p, _pixels(boxes, size)) for p, boxes in s["entities"]]
        c = metrics.entity_pair_counts(predicted, true)
        return {
            **common,
            "caption": prediction.caption,
            "reference": s["answer"],
            "truth_entities": [[p, [list(b) for b in boxes]] for p, boxes in true],
            "predicted_entities": [[p, [list(b) for b in boxes]] for p, boxes in predicted],
            "pairs_matched": c.matched,
            "pairs_predicted": c.predicted,
            "pairs_true": c.true,
            "caption_exact": metrics.normalize_answer(prediction.caption)
            == metrics.normalize_answer(s["answer"]),
            "correct": c.matched == c.predicted == c.true,
        }
    # text answers: the plain caption is the prompt + continuation, the others the continuation alone
    answer = prediction.caption if task == "caption" else prediction.answer
    record = {
        **common,
        "truth": [list(b) for b in truth],
        "answer": answer,
        "reference": s["answer"],
        "kind": s.get("kind"),
        "correct": metrics.normalize_answer(answer) == metrics.normalize_answer(s["answer"]),
    }
    if task == "reg":
        record["mistakes"] = reg_mistakes(answer, s["answer"])
    return record


REG_PARTS = ("size", "colour", "shape", "position")


def _reg_parts(text: str) -> tuple[str, str, str, str] | None:
    """(size, colour, shape, position) of a REG answer "the small red circle[ on the left]"; None when the
    text is not of that form."""
    from kosmos2.data import synthetic as world

    words = metrics.normalize_answer(text).split()
    if len(words) < 4 or words[0] != "the":
        return None
    size, colour, shape, position = words[1], words[2], words[3], " ".join(words[4:])
    if size not in world.SIZES or colour not in world.COLOURS or shape not in world.SHAPES:
        return None
    if position and position not in world.EXTREMES:
        return None
    return size, colour, shape, position


def reg_mistakes(answer: str, reference: str) -> list[str]:
    """Which parts of a REG answer differ from the world's canonical one: some of REG_PARTS ("position" is
    the word that tells an object from its identical twins, "on the left", or its absence), or ["form"]
    when the answer is not "the <size> <colour> <shape>[ <position>]". [] when they agree."""
    said, true = _reg_parts(answer), _reg_parts(reference)
    if true is None:
        raise ValueError(f"REG reference {reference!r} is not a canonical description of the world")
    if said is None:
        return ["form"]
    return [part for part, a, b in zip(REG_PARTS, said, true, strict=True) if a != b]


# ------------------------------------------------------------------------------------------------------------
# The synthetic world: summaries and targets


def _share(flags: Sequence[bool]) -> float:
    return sum(bool(f) for f in flags) / len(flags) if flags else 0.0


def _by(records: Sequence[Mapping[str, Any]], key: str) -> dict[str, dict[str, float | int]]:
    groups: dict[str, list[bool]] = {}
    for r in records:
        groups.setdefault(str(r[key]), []).append(r["correct"])
    return {k: {"n": len(v), "accuracy": _share(v)} for k, v in sorted(groups.items())}


def summarize_task(task: str, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The metrics of one task on one split from its records (fractions; see the module docstring)."""
    n = len(records)
    if task == "rec":
        scores = [
            metrics.RecScore(r["iou_first"], r["iou_any"], r["iou_mean"], r["decoded"]) for r in records
        ]
        return {
            "n": n,
            "accuracy": _share([s.correct("first") for s in scores]),
            "accuracy_any": _share([s.correct("any") for s in scores]),
            "accuracy_mean": _share([s.correct("mean") for s in scores]),
            "no_box": sum(not s.decoded for s in scores),
            "mean_iou": sum(s.iou_first for s in scores) / n if n else 0.0,
            "by_form": _by(records, "form"),
            "past_threshold": _past_threshold(records, [r["iou_first"] for r in records]),
        }
    if task == "phrase_grounding":
        pr = metrics.precision_recall(
            metrics.PairCounts(r["pairs_matched"], r["pairs_predicted"], r["pairs_true"]) for r in records
        )
        recall = {
            f"R@{k}": _share([r["ious"][str(k)] >= metrics.IOU_THRESHOLD for r in records])
            for k in metrics.RECALL_KS
        }
        return {
            "n": n,
            **recall,
            "box_precision": pr["precision"],
            "box_recall": pr["recall"],
            "all_boxes": _share(
                [r["pairs_matched"] == r["pairs_predicted"] == r["pairs_true"] for r in records]
            ),
            "no_box": sum(not r["decoded"] for r in records),
            "past_threshold": _past_threshold(records, [r["ious"]["1"] for r in records]),
        }
    if task == "grounded_caption":

        def pairs(rs: Sequence[Mapping[str, Any]]) -> dict[str, float | int]:
            return metrics.precision_recall(
                metrics.PairCounts(r["pairs_matched"], r["pairs_predicted"], r["pairs_true"]) for r in rs
            )

        # scenes with a group of identical objects ("two large blue squares": one phrase, several boxes)
        by_groups: dict[bool, list[Mapping[str, Any]]] = {True: [], False: []}
        for r in records:
            by_groups[any(len(boxes) > 1 for _, boxes in r["truth_entities"])].append(r)
        grouped, single = by_groups[True], by_groups[False]
        return {
            "n": n,
            **pairs(records),
            "all_entities": _share([r["correct"] for r in records]),
            "caption_exact": _share([r["caption_exact"] for r in records]),
            "by_groups": {
                "with": {"n": len(grouped), **pairs(grouped)},
                "without": {"n": len(single), **pairs(single)},
            },
        }
    if task in ("vqa", "grounded_vqa"):
        return {"n": n, "accuracy": _share([r["correct"] for r in records]), "by_kind": _by(records, "kind")}
    if task == "reg":
        missed = [r["mistakes"] for r in records if not r["correct"]]
        return {
            "n": n,
            "exact_match": _share([r["correct"] for r in records]),
            # misses with that part wrong (a miss may count under several parts)
            "mistakes": {part: sum(part in m for m in missed) for part in (*REG_PARTS, "form")},
        }
    return {"n": n, "exact_match": _share([r["correct"] for r in records])}  # caption


def _past_threshold(records: Sequence[Mapping[str, Any]], ious: Sequence[float]) -> dict[str, Any]:
    """metrics.threshold_metrics of REC or phrase-grounding records (the first box and its score)."""
    return metrics.threshold_metrics(
        ious,
        [r.get("score_first") for r in records],
        [r["predicted"][0] if r["predicted"] else None for r in records],
        [r["truth"] for r in records],
    )


def summarize_world(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{split: {task: summarize_task(...)}} in the order the records come."""
    groups: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for r in records:
        groups.setdefault(r["split"], {}).setdefault(r["task"], []).append(r)
    return {split: {t: summarize_task(t, rs) for t, rs in tasks.items()} for split, tasks in groups.items()}


@dataclass(frozen=True)
class Target:
    """A quality target of the default model: `metric` of `task` on `split` must be at least `minimum`."""

    split: str
    task: str
    metric: str
    minimum: float
    label: str


# The default-model issue: on held-out splits of ≥ MIN_QUERIES queries per task. The VQA target applies to
# plain and grounded questions each.
TARGETS = (
    Target("test", "rec", "accuracy", 0.95, "REC Acc@0.5"),
    Target("test", "grounded_caption", "precision", 0.90, "grounded-caption entity precision"),
    Target("test", "grounded_caption", "recall", 0.90, "grounded-caption entity recall"),
    Target("test", "reg", "exact_match", 0.80, "REG exact match"),
    Target("test", "vqa", "accuracy", 0.90, "VQA accuracy (plain)"),
    Target("test", "grounded_vqa", "accuracy", 0.90, "VQA accuracy (grounded)"),
    Target("compositional", "rec", "accuracy", 0.85, "REC Acc@0.5"),
)
MIN_QUERIES = 1000


def check_targets(
    results: Mapping[str, Mapping[str, Mapping[str, Any]]], targets: Sequence[Target] = TARGETS
) -> list[dict[str, Any]]:
    """One row per target: the measured value and n (None when that split/task was not run), whether it is
    met (None when not measured), and whether n reaches MIN_QUERIES (the issue's measurement size)."""
    rows = []
    for t in targets:
        s = results.get(t.split, {}).get(t.task)
        value = None if s is None else float(s[t.metric])
        n = None if s is None else int(s["n"])
        rows.append(
            {
                "split": t.split,
                "task": t.task,
                "metric": t.metric,
                "label": t.label,
                "target": t.minimum,
                "measured": value,
                "n": n,
                "met": None if value is None else value >= t.minimum,
                "full_size": n is not None and n >= MIN_QUERIES,
            }
        )
    return rows


def _verdict(row: Mapping[str, Any]) -> str:
    if row["met"] is None:
        return "not measured"
    verdict = "pass" if row["met"] else "**FAIL**"
    return verdict if row["full_size"] else f"{verdict} (n < {MIN_QUERIES})"


def targets_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The Markdown table of check_targets rows: split, metric, target, measured, n, result."""
    return report.markdown_table(
        ["split", "metric", "target", "measured", "n", "result"],
        [
            [r["split"], r["label"], f"≥ {r['target']:.2f}", _f3(r["measured"]), r["n"], _verdict(r)]
            for r in rows
        ],
    )


def _f3(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


# ------------------------------------------------------------------------------------------------------------
# The synthetic world: the run and its report


def evaluate_world(
    predictor: GroundingPredictor,
    out_dir: str | os.PathLike,
    *,
    model_id: str,
    splits: Sequence[str] = HELD_OUT_SPLITS,
    n_per_task: int = MIN_QUERIES,
    tasks: Sequence[str] = DEFAULT_TASKS,
    cache: PredictionCache | str | os.PathLike | None = None,
    batch_size: int = 8,
    generation: Mapping[str, Any] | None = None,
    progress: bool = True,
    examples: int = 16,
) -> dict[str, Any]:
    """Evaluate `predictor` on the world's fixed sets of `splits`, write the report, return the metrics.

    n_per_task queries per task and split; generation defaults to GENERATION (part of the cache key, as the
    model id is); cache defaults to out_dir/predictions.jsonl, so a rerun computes only missing queries;
    examples: tiles per example sheet (0: none). Returns the content of metrics.json:
    {"results": {split: {task: metrics}}, "targets": check_targets rows, "all_targets_met", "run", settings}.
    """
    from kosmos2.data.synthetic import SPLITS

    if not splits or any(s not in SPLITS for s in splits):
        raise ValueError(f"splits must be a non-empty list from {SPLITS}, got {splits!r}")
    if isinstance(n_per_task, bool) or not isinstance(n_per_task, int) or n_per_task < 1:
        raise ValueError(f"n_per_task must be a positive number of queries per task, got {n_per_task!r}")
    if examples < 0:
        raise ValueError(f"examples must be >= 0 (tiles per example sheet), got {examples}")
    tasks = _check_world_tasks(tasks)
    out_dir = Path(out_dir)
    generation = pinned_generation(GENERATION, generation)
    items = [item for split in dict.fromkeys(splits) for item in world_queries(split, n_per_task, tasks)]
    predictions, stats = run_queries(
        predictor,
        [item.query for item in items],
        model_id=model_id,
        cache=default_cache(cache, out_dir),
        batch_size=batch_size,
        generation=generation,
        progress=progress,
        load=_render,
    )
    records = [score_world(item, predictions[item.query.id]) for item in items]
    results = summarize_world(records)
    targets = check_targets(results)
    measured = [r["met"] for r in targets if r["met"] is not None]
    result = {
        "task": "synthetic-world",
        "model": model_id,
        "splits": list(dict.fromkeys(splits)),
        "tasks": tasks,
        "n_per_task": n_per_task,
        **generation_record(GENERATION, generation),
        "prompts": "each sample's training prompt through Predictor.ground",
        "results": results,
        "targets": targets,
        "all_targets_met": all(measured) if len(measured) == len(targets) else None,
        "run": stats.to_json(),
    }
    write_world_report(out_dir, result, records, examples)
    return result


def write_world_report(
    out_dir: Path, result: Mapping[str, Any], records: Sequence[Mapping[str, Any]], examples: int
) -> None:
    """metrics.json, records.jsonl, report.md, the REC IoU histograms and the example sheets."""
    out_dir = Path(out_dir)
    report.write_json(out_dir / "metrics.json", result)
    report.write_jsonl(out_dir / "records.jsonl", records)
    run = result["run"]
    md = [
        "# Synthetic world",
        "",
        f"Model: `{result['model']}`. Splits: {', '.join(result['splits'])}; up to {result['n_per_task']} "
        f"queries per task. Decoding: `{json.dumps(result['generation'], sort_keys=True)}`; prompts: "
        f"{result['prompts']}. Queries: {run['queries']} ({run['from_cache']} from the cache).",
        "",
        "## Targets",
        "",
        targets_table(result["targets"]),
        "",
        f"The issue's targets: on the held-out test split with at least {MIN_QUERIES} queries per task, and",
        "REC on the compositional split (shape×colour pairs never seen in training). Values are fractions.",
        "",
    ]
    for split, by_task in result["results"].items():
        md += [f"## {split} split", "", _results_table(by_task), ""]
        for task, key, title in (
            ("rec", "by_form", "REC by how the expression singles the object out"),
            ("vqa", "by_kind", "VQA (plain) by question kind"),
            ("grounded_vqa", "by_kind", "VQA (grounded) by question kind"),
        ):
            if task in by_task:
                groups = by_task[task][key]
                md += [
                    f"{title}:",
                    "",
                    report.markdown_table(
                        ["group", "n", "accuracy"],
                        [[g, v["n"], _f3(v["accuracy"])] for g, v in groups.items()],
                    ),
                    "",
                ]
        for task, stem in (("rec", "rec"), ("phrase_grounding", "grounding")):
            if task in by_task and "past_threshold" in by_task[task]:
                md += report.threshold_section(
                    by_task[task]["past_threshold"],
                    out_dir,
                    f"{stem}_{split}",
                    f"{TASK_NAMES[task]} ({split})",
                )
        ious = [r["iou_first"] for r in records if r["split"] == split and r["task"] == "rec"]
        if ious:
            hist = report.iou_histogram(
                ious, out_dir / f"rec_iou_{split}.png", f"REC ({split}): IoU of the first generated box"
            )
            md += [report.image_link(hist, out_dir, f"REC IoU histogram, {split}"), ""]
        for task in BOX_TASKS:
            chosen = [r for r in records if r["split"] == split and r["task"] == task]
            if not chosen or examples == 0:
                continue
            sheet = report.sample_sheet(
                report.pick_samples([_example(r) for r in chosen], examples),
                out_dir / "examples" / f"{split}_{task}.png",
                load=_render_record,
            )
            md += [
                f"Examples, {TASK_NAMES[task]} ({split}): true boxes green, predicted red.",
                "",
                report.image_link(sheet, out_dir, f"{task} examples, {split}"),
                "",
            ]
    md += [
        "## Definitions",
        "",
        "- REC: Acc@0.5 of the first box the model attaches to the expression (official protocol); *any* /",
        "  *mean*: best of all its boxes / their mean box. *no box*: nothing decodable (a miss).",
        "- Phrase grounding: R@k, ANY-box (some of the first k boxes has IoU ≥ 0.5 with a true box); box",
        "  precision / recall pair the phrase's boxes one-to-one with its true boxes (IoU ≥ 0.5).",
        "- Grounded caption: (phrase, box) pairs; a predicted pair is right when its phrase equals a true",
        "  phrase (lower case, whitespace collapsed, trailing period dropped) and its box is paired",
        "  one-to-one with a true box of that phrase at IoU ≥ 0.5. Precision over predicted pairs, recall",
        "  over true pairs, summed over the split. *all right*: captions with every pair right, none extra.",
        "- REG, VQA, caption: exact match after the same normalisation.",
        "",
    ]
    atomic_write_text(out_dir / "report.md", "\n".join(md))


def _results_table(by_task: Mapping[str, Mapping[str, Any]]) -> str:
    rows = []
    for task, s in by_task.items():
        if task == "rec":
            main = f"Acc@0.5 {_f3(s['accuracy'])}"
            more = (
                f"any box {_f3(s['accuracy_any'])}, mean box {_f3(s['accuracy_mean'])}, "
                f"no box {s['no_box']}, mean IoU {_f3(s['mean_iou'])}"
            )
        elif task == "phrase_grounding":
            main = f"R@1 {_f3(s['R@1'])}"
            more = (
                f"R@5 {_f3(s['R@5'])}, box precision {_f3(s['box_precision'])}, box recall "
                f"{_f3(s['box_recall'])}, all boxes {_f3(s['all_boxes'])}, no box {s['no_box']}"
            )
        elif task == "grounded_caption":
            main = f"precision {_f3(s['precision'])}, recall {_f3(s['recall'])}"
            more = (
                f"F1 {_f3(s['f1'])}, pairs {s['matched']}/{s['predicted']} predicted, {s['true']} true; "
                f"all right {_f3(s['all_entities'])}, caption text exact {_f3(s['caption_exact'])}; "
                + "; ".join(
                    f"{'with' if which == 'with' else 'no'} group of identical objects: {g['n']} captions, "
                    f"P/R {_f3(g['precision'])}/{_f3(g['recall'])}"
                    for which, g in s["by_groups"].items()
                )
            )
        elif task in ("vqa", "grounded_vqa"):
            main = f"accuracy {_f3(s['accuracy'])}"
            more = ", ".join(f"{kind} {_f3(k['accuracy'])}" for kind, k in s["by_kind"].items())
        elif task == "reg":
            main = f"exact match {_f3(s['exact_match'])}"
            more = "misses with a wrong " + ", ".join(f"{part} {k}" for part, k in s["mistakes"].items())
        else:
            main, more = f"exact match {_f3(s['exact_match'])}", ""
        rows.append([TASK_NAMES[task], s["n"], main, more])
    return report.markdown_table(["task", "n", "measured", "details"], rows)


def _example(r: Mapping[str, Any]) -> Any:
    """An example-sheet tile of a REC, phrase or grounded-caption record (its image: split and scene id)."""
    if r["task"] == "grounded_caption":
        truth = [b for _, boxes in r["truth_entities"] for b in boxes]
        predicted = [b for _, boxes in r["predicted_entities"] for b in boxes]
        title = r["caption"]
        verdict = (
            f"{r['pairs_matched']}/{r['pairs_predicted']} pairs right, {r['pairs_true']} true: "
            f"{'all right' if r['correct'] else 'not all right'}"
        )
    elif r["task"] == "rec":
        truth, predicted, title = r["truth"], r["predicted"], r["expression"]
        verdict = refcoco.rec_verdict(r)
    else:
        truth, predicted, title = r["truth"], r["predicted"], r["phrase"]
        verdict = flickr30k.recall_verdict(r)
    return report.Sample((r["split"], r["scene_id"]), title, truth, predicted, bool(r["correct"]), verdict)


def _render_record(key: tuple[str, int]) -> Image.Image:
    from kosmos2.data.synthetic import make_scene, render

    split, scene_id = key
    return render(make_scene(scene_id, split))


# ------------------------------------------------------------------------------------------------------------
# Trust: found / not found and "which one?" (Predictor.locate's decisions), calibrated on one split and
# measured on another

TRUST_TASKS = ("rec", "rec_absent", "rec_ambiguous")
TRUST_SPLITS = ("calibration", "test")  # thresholds are fitted on the first and measured on the second


def trust_records(
    predictor: Any,
    split: str,
    n_per_task: int,
    *,
    cache: str | os.PathLike | None = None,
    model_id: str = "",
    batch_size: int = 16,
    generation: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """`predictor.locate` (with 2 candidates) on the ordinary, absent and ambiguous REC queries of `split`
    (`make_eval_set(split, n_per_task, TRUST_TASKS)`); one record a query. With `cache` (a JSON Lines
    file), records already there for this model and split are reused and new ones appended per batch, so
    an interrupted run resumes."""
    from kosmos2.data import synthetic as world

    generation = dict(GENERATION if generation is None else generation)
    samples = world.make_eval_set(split, n_per_task, tasks=TRUST_TASKS)
    counters = dict.fromkeys(TRUST_TASKS, 0)
    keyed = []
    for s in samples:
        keyed.append((f"{split}/{s['task']}/{counters[s['task']]}/{s['scene_id']:016x}", s))
        counters[s["task"]] += 1
    done: dict[str, dict[str, Any]] = {}
    path = Path(cache) if cache is not None else None
    if path is not None and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line
            if row.get("model") == model_id and row.get("generation") == generation:
                done[row["id"]] = row
    todo = [(k, s) for k, s in keyed if k not in done]
    bar = _trust_progress(len(keyed), len(keyed) - len(todo), progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        images = [_render(s["scene"]) for _, s in chunk]
        results = predictor.locate(images, [s["expression"] for _, s in chunk], candidates=2, **generation)
        rows = [
            _trust_record(k, s, r, model_id, generation) for (k, s), r in zip(chunk, results, strict=True)
        ]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
                f.flush()
        done.update((row["id"], row) for row in rows)
        bar(len(chunk))
    bar(0, close=True)
    return [done[k] for k, _ in keyed]


def _trust_progress(total: int, initial: int, enabled: bool) -> Any:
    import sys

    state = {"n": initial}

    def update(n: int, close: bool = False) -> None:
        state["n"] += n
        if enabled:
            print(f"\rtrust: {state['n']}/{total} queries", end="\n" if close else "", file=sys.stderr)

    return update


def _trust_record(
    key: str, s: Mapping[str, Any], r: Any, model_id: str, generation: Mapping[str, Any]
) -> dict[str, Any]:
    from kosmos2.grounding import iou

    truth = [list(b) for b in s["boxes"]]
    box = r.box
    candidates = [list(c.box) for c in r.candidates]
    score = None
    for e in r.entities:
        if e.boxes and box is not None and e.boxes[0] == box:
            score = e.scores[0] if e.scores else None
            break
    return {
        "id": key,
        "model": model_id,
        "generation": dict(generation),
        "split": s["split"],
        "task": s["task"],
        "form": s.get("form"),
        "expression": s["expression"],
        "truth": truth,
        "box": None if box is None else list(box),
        "score": score,
        "iou": max((iou(box, t) for t in truth), default=0.0) if box is not None else 0.0,
        "found_score": r.found_score,
        "ambiguity_score": r.ambiguity_score,
        "found": r.found,
        "ambiguous": r.ambiguous,
        "signals": dict(getattr(r, "signals", {}) or {}),
        "candidates": candidates,
        # ambiguous queries: both true objects among the first two candidates (IoU ≥ 0.5 each)
        "covered": (
            all(any(iou(c, t) >= metrics.IOU_THRESHOLD for c in candidates[:2]) for t in truth)
            if s["task"] == "rec_ambiguous"
            else None
        ),
    }


def summarize_trust(
    calibration: Sequence[Mapping[str, Any]], test: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Thresholds fitted on `calibration` (metrics.best_threshold), everything measured on `test`.

    found: positives are the expressions that fit something (ordinary and ambiguous queries), negatives the
    absent ones; the headline AUROC is ordinary vs absent. ambiguous: positives the ambiguous queries,
    negatives the ordinary ones. Also the ordinary queries' REC numbers past one threshold.
    """

    def scores(rows: Sequence[Mapping[str, Any]], task: str, key: str) -> list[float]:
        return [float(r[key]) for r in rows if r["task"] == task]

    cal_found = metrics.best_threshold(
        scores(calibration, "rec", "found_score") + scores(calibration, "rec_ambiguous", "found_score"),
        scores(calibration, "rec_absent", "found_score"),
    )
    cal_amb = metrics.best_threshold(
        scores(calibration, "rec_ambiguous", "ambiguity_score"),
        scores(calibration, "rec", "ambiguity_score"),
    )
    present, absent = scores(test, "rec", "found_score"), scores(test, "rec_absent", "found_score")
    ambiguous_found = scores(test, "rec_ambiguous", "found_score")
    amb, plain = scores(test, "rec_ambiguous", "ambiguity_score"), scores(test, "rec", "ambiguity_score")
    t_found, t_amb = cal_found["threshold"], cal_amb["threshold"]
    rec = [r for r in test if r["task"] == "rec"]
    covered = [bool(r["covered"]) for r in test if r["task"] == "rec_ambiguous"]
    return {
        "thresholds": {"found": cal_found, "ambiguous": cal_amb},
        "found": {
            "auroc": metrics.auroc(present, absent),
            "auroc_with_ambiguous": metrics.auroc(present + ambiguous_found, absent),
            "present_found": _share([s >= t_found for s in present + ambiguous_found]),
            "absent_rejected": _share([s < t_found for s in absent]),
            "n_present": len(present),
            "n_ambiguous": len(ambiguous_found),
            "n_absent": len(absent),
        },
        "ambiguous": {
            "auroc": metrics.auroc(amb, plain),
            "ambiguous_flagged": _share([s >= t_amb for s in amb]),
            "ordinary_flagged": _share([s >= t_amb for s in plain]),
            "top2_cover_both": _share(covered),
            "n": len(amb),
        },
        "signals": _signal_aurocs(test),
        "rec": metrics.threshold_metrics(
            [r["iou"] for r in rec],
            [r["score"] for r in rec],
            [r["box"] for r in rec],
            [r["truth"] for r in rec],
        ),
    }


def _signal_aurocs(test: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Each of locate's signals (LocateResult.signals) as a found signal (AUROC of ordinary vs absent
    queries) and as an ambiguity signal (ambiguous vs ordinary), on the rows that carry it: which signal
    separates best, whichever the predictor uses for this model."""
    names = sorted({name for r in test for name in r.get("signals") or {}})
    out = {}
    for name in names:

        def values(task: str, name: str = name) -> list[float]:
            return [
                float(r["signals"][name]) for r in test if r["task"] == task and name in r.get("signals", {})
            ]

        present, absent, ambiguous = values("rec"), values("rec_absent"), values("rec_ambiguous")
        out[name] = {
            "found_auroc": metrics.auroc(present, absent) if present and absent else None,
            "ambiguity_auroc": metrics.auroc(ambiguous, present) if present and ambiguous else None,
        }
    return out


def evaluate_trust(
    predictor: Any,
    out_dir: str | os.PathLike,
    *,
    model_id: str,
    n_per_task: int = MIN_QUERIES,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Calibrate `locate`'s thresholds on the calibration split and measure them on the test split; write
    OUT/trust.json, OUT/trust.md and the plots; the records go to OUT/trust_records.jsonl (the resume
    cache)."""
    out_dir = Path(out_dir)
    cache = out_dir / "trust_records.jsonl"
    common = dict(cache=cache, model_id=model_id, batch_size=batch_size, progress=progress)
    calibration = trust_records(predictor, TRUST_SPLITS[0], n_per_task, **common)
    test = trust_records(predictor, TRUST_SPLITS[1], n_per_task, **common)
    result = {"model": model_id, "n_per_task": n_per_task, **summarize_trust(calibration, test)}
    report.write_json(out_dir / "trust.json", result)
    md = ["# Trust: found, ambiguous, and REC past one threshold", ""]
    md += trust_markdown(result)
    md += report.threshold_section(result["rec"], out_dir, "rec_trust", "REC (test split, ordinary queries)")
    atomic_write_text(out_dir / "trust.md", "\n".join(md) + "\n")
    return result


def trust_markdown(result: Mapping[str, Any]) -> list[str]:
    f, a, t = result["found"], result["ambiguous"], result["thresholds"]
    return [
        f"Thresholds fitted on the calibration split (best balanced accuracy): found when found_score ≥ "
        f"{t['found']['threshold']:.4f}; ambiguous when ambiguity_score ≥ {t['ambiguous']['threshold']:.4f}. "
        "Measured on the test split:",
        "",
        report.markdown_table(
            ["measure", "value", "n"],
            [
                ["found AUROC, ordinary vs absent", _f3(f["auroc"]), f"{f['n_present']} / {f['n_absent']}"],
                ["found AUROC, ordinary + ambiguous vs absent", _f3(f["auroc_with_ambiguous"]), ""],
                ["present expressions found", _f3(f["present_found"]), f["n_present"] + f["n_ambiguous"]],
                ["absent expressions rejected", _f3(f["absent_rejected"]), f["n_absent"]],
                ["ambiguity AUROC, ambiguous vs ordinary", _f3(a["auroc"]), a["n"]],
                ["ambiguous queries flagged", _f3(a["ambiguous_flagged"]), a["n"]],
                ["ordinary queries flagged", _f3(a["ordinary_flagged"]), f["n_present"]],
                ["top-2 candidates cover both objects", _f3(a["top2_cover_both"]), a["n"]],
                [
                    "REC Acc@0.5 (ordinary queries, via locate)",
                    _f3(result["rec"]["accuracy"]),
                    result["rec"]["n"],
                ],
            ],
        ),
        "",
    ] + _signals_markdown(result.get("signals") or {})


def _signals_markdown(signals: Mapping[str, Mapping[str, float | None]]) -> list[str]:
    if not signals:
        return []
    rows = [[name, _f3(v["found_auroc"]), _f3(v["ambiguity_auroc"])] for name, v in signals.items()]
    return [
        "Each signal of LocateResult.signals on its own (test split; found_score and ambiguity_score are "
        "the ones the model's kosmos2_tasks select, docs/TRUST.md):",
        "",
        report.markdown_table(["signal", "found AUROC (ordinary vs absent)", "ambiguity AUROC"], rows),
        "",
    ]
