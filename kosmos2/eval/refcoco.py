"""RefCOCO, RefCOCO+ and RefCOCOg: referring expression comprehension (REC) and generation (REG).

Two annotation formats are read, both as released:

- refer (github.com/lichengunc/refer): `<root>/<dataset>/refs(unc).p` (RefCOCO, RefCOCO+) or `refs(umd).p`
  (RefCOCOg), a pickled list of refs {ref_id, ann_id, image_id, split, category_id, file_name, sent_ids,
  sentences: [{sent, raw, tokens, sent_id}]}, plus `<root>/<dataset>/instances.json` (COCO layout: images with
  id/file_name/width/height, annotations with id/image_id/bbox [x, y, w, h]). One query per sentence.
- MDETR (its `mdetr_annotations`): `finetune_<dataset>_<split>.json`, COCO layout with one image entry per
  expression (`caption` is the expression; file_name, height, width, id, original_id, dataset_name) and one
  annotation per entry (image_id, bbox [x, y, w, h], original_id = the COCO annotation id). The official
  Kosmos-2 evaluation reads these files.

Both give the same expressions (`sent`, lower-cased and tokenised by refer) and the same boxes; query ids are
`<dataset>/<split>/<sent_id>` for refer and `<dataset>/<split>/<image entry id>` for MDETR.

REC protocol (the official one, SPEC §1 and §11): prompt `<grounding><phrase>{expression}</phrase>`, greedy
decoding with no-repeat-ngram 3; the boxes the model attaches to the expression's phrase are the prediction,
scaled by the annotated image size; the first one is the answer (IoU ≥ 0.5 with the box is correct; no box
is a miss). The "any" and "mean" variants of the official script are reported beside it.

REG protocol: prompt `<phrase> It</phrase><object>{box}</object> is`, greedy; the words generated after the
prompt are the description, scored against all expressions of the object with CIDEr and METEOR
(text_metrics.py).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kosmos2.eval import metrics, report
from kosmos2.eval.runner import (
    GroundingPredictor,
    Prediction,
    PredictionCache,
    Query,
    RunStats,
    default_cache,
    describe_generation,
    generation_record,
    pinned_generation,
    resolve_image,
    run_queries,
)
from kosmos2.fileio import atomic_write_text
from kosmos2.grounding import GROUNDING, PHRASE_END, PHRASE_START, box_to_normalized, object_markup

Box = tuple[float, float, float, float]

# dataset -> (refer split_by, evaluation splits)
DATASETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "refcoco": ("unc", ("val", "testA", "testB")),
    "refcoco+": ("unc", ("val", "testA", "testB")),
    "refcocog": ("umd", ("val", "test")),
}

# Kosmos-2 zero-shot REC accuracy (first box, IoU ≥ 0.5), paper Table 2 and the official README.
PAPER_REC: dict[str, dict[str, float]] = {
    "refcoco": {"val": 52.32, "testA": 57.42, "testB": 47.26},
    "refcoco+": {"val": 45.48, "testA": 50.73, "testB": 42.24},
    "refcocog": {"val": 60.57, "test": 61.65},
}
# Kosmos-2 zero-shot referring expression generation on RefCOCOg (paper Table 3).
PAPER_REG: dict[str, float] = {"METEOR": 12.2, "CIDEr": 60.3}

# The protocols' decoding (SPEC §8, docs/EVAL.md): greedy, no-repeat-ngram 3 over the whole sequence. The
# official runs allowed 500 new tokens; 64 is ours (the boxes come right after the prompt, and REG's words
# end long before). Every option is passed explicitly, so a checkpoint's generation_config.json decides
# nothing; `generation=` changes them explicitly and metrics.json records what was used.
REC_GENERATION: dict[str, Any] = {
    "max_new_tokens": 64,
    "num_beams": 1,
    "do_sample": False,
    "no_repeat_ngram_size": 3,
    "length_penalty": 1.0,
}
REG_GENERATION: dict[str, Any] = dict(REC_GENERATION)

LENGTH_BUCKETS = ((1, 2), (3, 4), (5, 6), (7, 9), (10, 10**9))

# COCO 2014 images live in train2014/ (all RefCOCO images) or val2014/; --images may name either or their
# parent.
IMAGE_SUBDIRS = ("train2014", "val2014")


@dataclass(frozen=True)
class RefExample:
    """One referring expression with its object's box (pixels, x1 y1 x2 y2) on one COCO image."""

    id: str
    dataset: str
    split: str
    file_name: str
    size: tuple[int, int]  # (width, height) from the annotation
    expression: str
    box: Box
    object_id: str  # the COCO annotation id: expressions of one object share it (REG references)


# ------------------------------------------------------------------------------------------------------------
# Loading


class _DataOnlyUnpickler(pickle.Unpickler):
    """refs(*).p holds only lists, dicts, strings and numbers: refuse anything that would import code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a refer pickle holds only lists, dicts, strings and numbers"
        )


def dataset_name(name: str) -> str:
    """Canonical dataset name, or a ValueError listing the known ones."""
    key = name.lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return key


def load_refer(
    refs_path: str | os.PathLike, instances_path: str | os.PathLike, split: str, dataset: str | None = None
) -> list[RefExample]:
    """Expressions of one split from refer's refs(*).p and instances.json (dataset: from the folder name)."""
    refs_path, instances_path = Path(refs_path), Path(instances_path)
    dataset = dataset_name(dataset or refs_path.parent.name)
    for p in (refs_path, instances_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p}: not found; refer keeps refs(unc).p/refs(umd).p and instances.json in data/{dataset}/"
            )
    with open(refs_path, "rb") as f:
        try:
            refs = _DataOnlyUnpickler(f).load()
        except Exception as e:
            raise ValueError(f"{refs_path}: not a refer refs pickle ({e})") from e
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ValueError(f"{refs_path}: expected a pickled list of ref dicts, got {type(refs).__name__}")
    coco = _read_json(instances_path)
    images = {img["id"]: img for img in _field(coco, "images", instances_path)}
    anns = {ann["id"]: ann for ann in _field(coco, "annotations", instances_path)}

    splits = sorted({str(r.get("split")) for r in refs})
    chosen = [r for r in refs if r.get("split") == split]
    if not chosen:
        raise ValueError(f"{refs_path}: no refs in split {split!r}; the file has splits {', '.join(splits)}")
    out = []
    for ref in chosen:
        where = f"{refs_path} ref_id {ref.get('ref_id')}"
        try:
            ann = anns[ref["ann_id"]]
            image = images[ref["image_id"]]
        except KeyError as e:
            raise ValueError(
                f"{where}: {e} is not in {instances_path}; use the instances.json of the same "
                "refer dataset folder"
            ) from None
        box = metrics.check_box(metrics.xywh_to_xyxy(ann["bbox"]), f"{where} annotation {ann['id']}")
        for sent in ref["sentences"]:
            out.append(
                RefExample(
                    id=f"{dataset}/{split}/{sent['sent_id']}",
                    dataset=dataset,
                    split=split,
                    file_name=image["file_name"],
                    size=(int(image["width"]), int(image["height"])),
                    expression=sent["sent"],
                    box=box,
                    object_id=str(ref["ann_id"]),
                )
            )
    return out


def load_mdetr(
    json_path: str | os.PathLike, dataset: str | None = None, split: str | None = None
) -> list[RefExample]:
    """Expressions from MDETR's finetune_<dataset>_<split>.json (dataset and split: from the file name)."""
    json_path = Path(json_path)
    m = re.fullmatch(r"finetune_(refcoco\+?|refcocog)_(\w+)\.json", json_path.name)
    if m is None and (dataset is None or split is None):
        raise ValueError(
            f"{json_path}: not named finetune_<dataset>_<split>.json; pass dataset= and split= explicitly"
        )
    dataset = dataset_name(dataset or m.group(1))
    split = split or m.group(2)
    data = _read_json(json_path)
    images = _field(data, "images", json_path)
    by_image: dict[Any, list[dict]] = defaultdict(list)
    for ann in _field(data, "annotations", json_path):
        by_image[ann["image_id"]].append(ann)
    out = []
    for img in images:
        where = f"{json_path} image id {img.get('id')}"
        anns = by_image.get(img["id"], [])
        if len(anns) != 1:
            raise ValueError(
                f"{where}: {len(anns)} annotations; an MDETR referring file has exactly one per entry"
            )
        ann = anns[0]
        box = metrics.check_box(metrics.xywh_to_xyxy(ann["bbox"]), f"{where} annotation bbox")
        out.append(
            RefExample(
                id=f"{dataset}/{split}/{img['id']}",
                dataset=dataset,
                split=split,
                file_name=img["file_name"],
                size=(int(float(img["width"])), int(float(img["height"]))),
                expression=img["caption"],
                box=box,
                object_id=str(ann.get("original_id", f"{img.get('original_id')}:{ann['bbox']}")),
            )
        )
    return out


def find_refer_files(refer_dir: str | os.PathLike, dataset: str) -> tuple[Path, Path]:
    """(refs pickle, instances.json) for `dataset` under refer's data folder (or in that folder itself)."""
    dataset = dataset_name(dataset)
    split_by = DATASETS[dataset][0]
    root = Path(refer_dir)
    for folder in (root / dataset, root):
        refs, inst = folder / f"refs({split_by}).p", folder / "instances.json"
        if refs.is_file() and inst.is_file():
            return refs, inst
    raise FileNotFoundError(
        f"{root}: no {dataset}/refs({split_by}).p with instances.json beside it; point --refer-dir at "
        "refer's data/ folder (holding refcoco/, refcoco+/, refcocog/)"
    )


def find_mdetr_file(mdetr_dir: str | os.PathLike, dataset: str, split: str) -> Path:
    path = Path(mdetr_dir) / f"finetune_{dataset_name(dataset)}_{split}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; point --mdetr-dir at the unpacked mdetr_annotations/ folder "
            f"(it holds finetune_{dataset}_{split}.json)"
        )
    return path


def load_split(
    dataset: str,
    split: str,
    refer_dir: str | os.PathLike | None = None,
    mdetr_dir: str | os.PathLike | None = None,
) -> list[RefExample]:
    """One split from whichever format was given (exactly one of refer_dir / mdetr_dir)."""
    dataset = dataset_name(dataset)
    if split not in DATASETS[dataset][1]:
        raise ValueError(f"{dataset} has evaluation splits {', '.join(DATASETS[dataset][1])}, not {split!r}")
    if (refer_dir is None) == (mdetr_dir is None):
        raise ValueError(
            "give exactly one annotation source: --refer-dir (refer pickles) or --mdetr-dir (MDETR json)"
        )
    if refer_dir is not None:
        refs, inst = find_refer_files(refer_dir, dataset)
        return load_refer(refs, inst, split, dataset)
    return load_mdetr(find_mdetr_file(mdetr_dir, dataset, split), dataset, split)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _field(data: Any, name: str, path: Path) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(name), list):
        raise ValueError(f"{path}: expected a COCO-style JSON object with a list {name!r}")
    return data[name]


# ------------------------------------------------------------------------------------------------------------
# REC


def rec_prompt(expression: str) -> str:
    """The official REC prompt: `<grounding><phrase>{expression}</phrase>`."""
    return f"{GROUNDING}{PHRASE_START}{expression}{PHRASE_END}"


def rec_queries(examples: Sequence[RefExample], images_dir: str | os.PathLike) -> list[Query]:
    return [
        Query(e.id, resolve_image(images_dir, e.file_name, IMAGE_SUBDIRS), rec_prompt(e.expression), e.size)
        for e in examples
    ]


def length_bucket(expression: str) -> str:
    n = len(expression.split())
    for lo, hi in LENGTH_BUCKETS:
        if lo <= n <= hi:
            return f"{lo}-{hi}" if hi < 10**9 else f"{lo}+"
    return "0"


def rec_record(
    *,
    id: str,
    dataset: str,
    split: str,
    size: tuple[int, int],
    expression: str,
    truth: Sequence[Box],
    query: Query,
    prediction: Prediction,
) -> dict[str, Any]:
    """Score one REC query (metrics.score_rec) as a JSON-ready record (of several true boxes, the best)."""
    predicted = prediction.pixel_boxes_for(expression, size)
    s = metrics.score_rec(predicted, truth)
    return {
        "id": id,
        "dataset": dataset,
        "split": split,
        "image": str(query.image) if isinstance(query.image, (str, os.PathLike)) else query.id,
        "size": list(size),
        "expression": expression,
        "length": length_bucket(expression),
        "prompt": query.prompt,
        "text": prediction.text,
        "truth": [list(b) for b in truth],
        "predicted": [list(b) for b in predicted],
        "iou_first": s.iou_first,
        "iou_any": s.iou_any,
        "iou_mean": s.iou_mean,
        "decoded": s.decoded,
        "correct_first": s.correct("first"),
        "correct_any": s.correct("any"),
        "correct_mean": s.correct("mean"),
        "score_first": (prediction.scores_for(expression) or [None])[0],
    }


def score_examples(
    examples: Sequence[RefExample], queries: Sequence[Query], predictions: Mapping[str, Prediction]
) -> list[dict[str, Any]]:
    """One record per expression: boxes, the three IoUs, correctness (see metrics.score_rec)."""
    return [
        rec_record(
            id=e.id,
            dataset=e.dataset,
            split=e.split,
            size=e.size,
            expression=e.expression,
            truth=[e.box],
            query=q,
            prediction=predictions[q.id],
        )
        for e, q in zip(examples, queries, strict=True)
    ]


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{dataset: {split: rec_summary + paper number}} from scored records."""
    groups: dict[tuple[str, str], list[metrics.RecScore]] = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["split"])].append(
            metrics.RecScore(r["iou_first"], r["iou_any"], r["iou_mean"], r["decoded"])
        )
    out: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (dataset, split), scores in groups.items():
        out[dataset][split] = {
            **metrics.rec_summary(scores),
            "paper_acc_first": PAPER_REC.get(dataset, {}).get(split),
        }
    return dict(out)


def evaluate_rec(
    predictor: GroundingPredictor,
    examples: Sequence[RefExample],
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model_id: str,
    cache: PredictionCache | str | os.PathLike | None = None,
    batch_size: int = 8,
    generation: Mapping[str, Any] | None = None,
    progress: bool = True,
    samples: int = 16,
) -> dict[str, Any]:
    """Run REC on `examples` (any mix of datasets and splits), write the report to out_dir, return metrics.

    generation: changes to the protocol's decoding (REC_GENERATION); None: the protocol's.
    """
    out_dir = Path(out_dir)
    generation = pinned_generation(REC_GENERATION, generation)
    queries = rec_queries(examples, images_dir)
    predictions, stats = run_queries(
        predictor,
        queries,
        model_id=model_id,
        cache=default_cache(cache, out_dir),
        batch_size=batch_size,
        generation=generation,
        progress=progress,
    )
    records = score_examples(examples, queries, predictions)
    result = rec_result(
        records,
        stats,
        model_id=model_id,
        generation=generation,
        protocol="prompt <grounding><phrase>{expression}</phrase>; first generated box; IoU >= 0.5",
    )
    write_rec_report(out_dir, result, records, samples)
    return result


def rec_result(
    records: Sequence[Mapping[str, Any]],
    stats: RunStats,
    *,
    model_id: str,
    generation: Mapping[str, Any] | None,
    protocol: str,
    protocol_generation: Mapping[str, Any] = REC_GENERATION,
) -> dict[str, Any]:
    """The metrics.json content of a REC run: settings, `summarize(records)`, run statistics.

    generation: the decoding used; protocol_generation: the protocol's (a difference is listed).
    """
    return {
        "task": "rec",
        "model": model_id,
        **generation_record(protocol_generation, generation or {}),
        "protocol": protocol,
        "results": summarize(records),
        "run": stats.to_json(),
    }


def write_rec_report(
    out_dir: Path, result: dict[str, Any], records: Sequence[dict], samples: int, load: Any = None
) -> None:
    """metrics.json, records.jsonl, report.md, the plots and the sample sheet of a REC run."""
    result["past_threshold"] = past_threshold(records)
    report.write_json(out_dir / "metrics.json", result)
    report.write_jsonl(out_dir / "records.jsonl", records)
    rows = []
    for dataset, splits in result["results"].items():
        for split, s in splits.items():
            rows.append(
                [
                    dataset,
                    split,
                    s["count"],
                    s["acc_first"],
                    s["paper_acc_first"],
                    s["acc_any"],
                    s["acc_mean"],
                    s["undecodable"],
                    s["miou"],
                ]
            )
    table = report.markdown_table(
        [
            "dataset",
            "split",
            "n",
            "Acc@0.5 first box",
            "paper (first box)",
            "any box",
            "mean box",
            "no box",
            "mean IoU (first)",
        ],
        rows,
    )
    plots = rec_plots(out_dir, records)
    several = len({r["dataset"] for r in records}) > 1
    sheet = report.sample_sheet(
        report.pick_samples(
            [
                report.Sample(
                    r["image"],
                    r["expression"],
                    r["truth"],
                    r["predicted"],
                    r["correct_first"],
                    verdict=rec_verdict(
                        r, f"{r['dataset']} {r['split']}: " if several else f"{r['split']}: "
                    ),
                )
                for r in records
            ],
            samples,
        ),
        out_dir / "samples.png",
        load=load,
    )
    md = [
        "# Referring expression comprehension",
        "",
        f"Model: `{result['model']}`. Protocol: `{result['protocol']}` (SPEC §11). "
        f"Queries: {result['run']['queries']} ({result['run']['from_cache']} from the cache).",
        describe_generation(result),
        "",
        table,
        "",
        "*first box* is the official number; *any box* (best of all generated boxes) and *mean box* (their",
        "mean) are the other two variants of the official script. *no box*: queries where nothing decodable",
        "was attached to the expression (counted as misses).",
        "",
        *plots,
        "## Samples",
        "",
        "Each tile says its split and the official verdict: the first generated box's IoU, a hit at ≥ 0.5.",
        "",
        report.image_link(sheet, out_dir, "samples") if sheet else "",
        "",
        *(
            line
            for dataset, splits in result["past_threshold"].items()
            for split, summary in splits.items()
            for line in report.threshold_section(
                summary,
                out_dir,
                f"threshold_{report.slug(dataset, split)}",
                f"REC {dataset} {split}, first box",
            )
        ),
    ]
    atomic_write_text(out_dir / "report.md", "\n".join(md))


def past_threshold(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{dataset: {split: metrics.threshold_metrics}} of the first box and its score (None: unscored)."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["split"])].append(r)
    out: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (dataset, split), rs in groups.items():
        out[dataset][split] = metrics.threshold_metrics(
            [r["iou_first"] for r in rs],
            [r.get("score_first") for r in rs],
            [r["predicted"][0] if r["predicted"] else None for r in rs],
            [r["truth"] for r in rs],
        )
    return dict(out)


def rec_verdict(record: Mapping[str, Any], where: str = "") -> str:
    """A sample tile's first line: `where` (e.g. "val: ") and the official metric's verdict on the record."""
    if not record["decoded"]:
        return f"{where}no box, miss"
    hit = "hit" if record["correct_first"] else "miss"
    return f"{where}first box IoU {record['iou_first']:.2f}, {hit}"


def rec_plots(out_dir: Path, records: Sequence[Mapping[str, Any]]) -> list[str]:
    """One IoU histogram and one accuracy-by-length chart per dataset and split; their report.md lines."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["split"])].append(r)
    buckets = [f"{lo}-{hi}" if hi < 10**9 else f"{lo}+" for lo, hi in LENGTH_BUCKETS]
    md = []
    for (dataset, split), rs in groups.items():
        name = report.slug(dataset, split)
        hist = report.iou_histogram(
            [r["iou_first"] for r in rs],
            out_dir / f"iou_hist_{name}.png",
            f"REC {dataset} {split}: IoU of the first generated box (n={len(rs)})",
        )
        by_len = {b: [r for r in rs if r["length"] == b] for b in buckets}
        by_len = {b: group for b, group in by_len.items() if group}
        bars = report.bar_chart(
            list(by_len),
            {
                v: [100.0 * sum(r[f"correct_{v}"] for r in group) / len(group) for group in by_len.values()]
                for v in ("first", "any", "mean")
            },
            out_dir / f"by_length_{name}.png",
            f"REC {dataset} {split}: accuracy by expression length",
            "words in the expression",
            counts=[len(group) for group in by_len.values()],
        )
        md += [
            f"## {dataset} {split}",
            "",
            report.image_link(hist, out_dir, f"IoU histogram, {dataset} {split}"),
            "",
            report.image_link(bars, out_dir, f"accuracy by expression length, {dataset} {split}"),
            "",
        ]
    return md


# ------------------------------------------------------------------------------------------------------------
# REG


def reg_prompt(box: Sequence[float], size: tuple[int, int]) -> str:
    """The REG prompt for a pixel box (SPEC §1): `<phrase> It</phrase><object><ul><lr></object> is`."""
    normalised = box_to_normalized(box, *size)
    clamped = tuple(min(max(v, 0.0), 1.0) for v in normalised)
    return f"{PHRASE_START} It{PHRASE_END}{object_markup([clamped])} is"


def evaluate_reg(
    predictor: GroundingPredictor,
    examples: Sequence[RefExample],
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model_id: str,
    cache: PredictionCache | str | os.PathLike | None = None,
    batch_size: int = 8,
    generation: Mapping[str, Any] | None = None,
    progress: bool = True,
    metrics_names: Sequence[str] = ("CIDEr", "METEOR"),
) -> dict[str, Any]:
    """Describe each referred object (one query per object) and score against all its expressions.

    generation: changes to the protocol's decoding (REG_GENERATION); None: the protocol's.
    """
    from kosmos2.eval import text_metrics

    text_metrics.require()
    out_dir = Path(out_dir)
    generation = pinned_generation(REG_GENERATION, generation)
    objects: dict[str, list[RefExample]] = defaultdict(list)
    for e in examples:
        objects[f"{e.dataset}/{e.split}/object{e.object_id}"].append(e)
    queries = [
        Query(
            key,
            resolve_image(images_dir, es[0].file_name, IMAGE_SUBDIRS),
            reg_prompt(es[0].box, es[0].size),
            es[0].size,
        )
        for key, es in objects.items()
    ]
    predictions, stats = run_queries(
        predictor,
        queries,
        model_id=model_id,
        cache=default_cache(cache, out_dir),
        batch_size=batch_size,
        generation=generation,
        progress=progress,
    )
    candidates = {q.id: predictions[q.id].answer for q in queries}
    references = {key: [e.expression for e in es] for key, es in objects.items()}
    scores = text_metrics.caption_metrics(candidates, references, metrics_names)
    result = {
        "task": "reg",
        "model": model_id,
        **generation_record(REG_GENERATION, generation),
        "protocol": "prompt <phrase> It</phrase><object>{box}</object> is; words after the prompt vs. all "
        "expressions of the object",
        "results": scores,
        "paper": PAPER_REG,
        "run": stats.to_json(),
    }
    records = [
        {
            "id": q.id,
            "image": str(q.image),
            "prompt": q.prompt,
            "text": predictions[q.id].text,
            "description": candidates[q.id],
            "references": references[q.id],
        }
        for q in queries
    ]
    report.write_json(out_dir / "metrics.json", result)
    report.write_jsonl(out_dir / "records.jsonl", records)
    rows = [[name, scores["scores"].get(name), PAPER_REG.get(name)] for name in scores["scores"]]
    md = [
        "# Referring expression generation",
        "",
        f"Model: `{model_id}`. {len(queries)} objects. Tokenizer: {scores['tokenizer']}.",
        describe_generation(result),
        "",
        report.markdown_table(["metric", "ours (×100)", "paper, RefCOCOg zero-shot"], rows),
        "",
        *(f"- {note}" for note in scores["notes"]),
        "",
    ]
    atomic_write_text(out_dir / "report.md", "\n".join(md))
    return result
