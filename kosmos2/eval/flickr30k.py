"""Flickr30k Entities: phrase grounding (R@1/5/10, ANY-box protocol) and captioning (CIDEr).

Two annotation formats are read, both as released:

- Flickr30k Entities (github.com/BryanPlummer/flickr30k_entities): `<root>/{train,val,test}.txt` (image
  ids), `<root>/Annotations/<id>.xml` (`<annotation><filename>…<size><width>…<height>…` and one `<object>`
  per box or per box-less entity: `<name>` entity id(s), then `<bndbox><xmin>…` or `<nobndbox>1</nobndbox>`
  and `<scene>1</scene>`), `<root>/Sentences/<id>.txt` (five captions, phrases marked
  `[/EN#<id>/<type> words]`).
- MDETR: `final_flickr_separateGT_<split>.json`, COCO layout with one image entry per caption (caption,
  sentence_id, original_img_id, tokens_positive_eval = one list of [start, end] spans per phrase that has a
  box, width/height as strings) and one annotation per box (bbox [x, y, w, h], tokens_positive = the spans it
  grounds).

The official Kosmos-2 evaluation takes its queries from the MDETR file and the ground truth (separate boxes)
and phrase types from the Entities folder; give both to do the same. Either alone works: from the Entities
folder every phrase with at least one box is a query (the same set MDETR lists); from the MDETR file alone the
boxes come from its annotations and phrase types are unknown (only "all" is reported).

Protocol (SPEC §1, §11): for a phrase at [start, end) of caption C the prompt is
`<grounding>{C[:start]} <phrase>{C[start:end]}</phrase>`, greedy decoding; the boxes the model attaches to
that phrase, in generated order and scaled by the annotated image size, are the prediction. R@k: the phrase is
found when any of the first k boxes has IoU ≥ 0.5 with any of its ground-truth boxes (no box: a miss).
Phrases without a box (`nobndbox`, scene-only, `notvisual`) are not queried. A phrase with several types
counts in each type.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
from kosmos2.grounding import GROUNDING, PHRASE_END, PHRASE_START

Box = tuple[float, float, float, float]

SPLITS = ("val", "test")
# The protocols' decoding (SPEC §1 and §8, docs/EVAL.md): phrase grounding greedy, captions beam search with 5
# beams, both with no-repeat-ngram 3; up to 64 new tokens (ours; the official runs allowed 500). Passed in
# full, so a checkpoint's generation_config.json decides nothing; `generation=` changes them explicitly.
GROUNDING_GENERATION: dict[str, Any] = {
    "max_new_tokens": 64,
    "num_beams": 1,
    "do_sample": False,
    "no_repeat_ngram_size": 3,
    "length_penalty": 1.0,
}
CAPTION_GENERATION: dict[str, Any] = {**GROUNDING_GENERATION, "num_beams": 5}
# Kosmos-2 zero-shot phrase grounding, R@1/5/10 in percent (paper Table 1; official README, all phrases).
PAPER_RECALL: dict[str, dict[str, float]] = {
    "val": {"R@1": 77.8, "R@5": 79.2, "R@10": 79.3},
    "test": {"R@1": 78.7, "R@5": 80.1, "R@10": 80.1},
}
# Flickr30k captioning CIDEr in the paper, before instruction tuning (80.5 for the released, instruction-tuned
# model).
PAPER_CAPTION_CIDER = 66.7
CAPTION_PROMPT = "An image of"
IMAGE_SUBDIRS = ("flickr30k-images",)


@dataclass(frozen=True)
class Phrase:
    """A marked phrase of a Flickr30k Entities sentence."""

    phrase_id: str
    text: str
    first_word_index: int
    types: tuple[str, ...]
    span: tuple[int, int]  # characters [start, end) in the sentence


@dataclass(frozen=True)
class Sentence:
    text: str  # the words joined by single spaces, markup removed
    phrases: tuple[Phrase, ...]


@dataclass
class ImageAnnotation:
    """One Annotations/<id>.xml: image size and, per entity id, its boxes (pixels, x1 y1 x2 y2)."""

    filename: str
    width: int
    height: int
    boxes: dict[str, list[Box]] = field(default_factory=dict)
    nobox: set[str] = field(default_factory=set)
    scene: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class PhraseExample:
    """One phrase-grounding query with its ground truth."""

    id: str
    split: str
    image_id: str
    sentence_id: int
    caption: str
    span: tuple[int, int]
    types: tuple[str, ...]
    file_name: str
    size: tuple[int, int]
    truth: tuple[Box, ...]

    @property
    def phrase(self) -> str:
        return self.caption[self.span[0] : self.span[1]]


# ------------------------------------------------------------------------------------------------------------
# The Flickr30k Entities files


def parse_sentence(line: str, where: str = "sentence") -> Sentence:
    """One line of Sentences/<id>.txt: `[/EN#18/people A man] in [/EN#19/clothing an orange hat] ...`."""
    words: list[str] = []
    phrases: list[Phrase] = []
    current: list[str] | None = None  # words of the open phrase
    header: tuple[str, tuple[str, ...], int] | None = None  # (id, types, first word index)
    for token in line.split():
        if current is None and token.startswith("[/EN#"):
            parts = token[1:].split("/")  # ["", "EN#18", "people", ...]
            if len(parts) < 3 or not parts[1][3:]:
                raise ValueError(f"{where}: malformed phrase marker {token!r}; expected [/EN#<id>/<type> ...")
            header = (parts[1][3:], tuple(parts[2:]), len(words))
            current = []
            continue
        if current is not None and token.endswith("]"):
            token = token[:-1]
            current.append(token)
            words.append(token)
            pid, types, first = header  # type: ignore[misc]
            text = " ".join(current)
            start = sum(len(w) for w in words[:first]) + first  # words are joined by single spaces
            phrases.append(Phrase(pid, text, first, types, (start, start + len(text))))
            current = header = None
            continue
        if current is not None:
            current.append(token)
        words.append(token)
    if current is not None:
        raise ValueError(f"{where}: phrase {header[0]!r} is not closed with ']'")  # type: ignore[index]
    return Sentence(" ".join(words), tuple(phrases))


def read_sentences(path: str | os.PathLike) -> list[Sentence]:
    path = Path(path)
    lines = [ln for ln in path.read_text(encoding="utf-8").split("\n") if ln.strip()]
    return [parse_sentence(ln, f"{path} line {i + 1}") for i, ln in enumerate(lines)]


def read_annotation(path: str | os.PathLike) -> ImageAnnotation:
    """Annotations/<id>.xml → size and boxes per entity id (an object with several names counts for each)."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: not valid XML ({e})") from e
    size = root.find("size")
    if size is None or size.findtext("width") is None or size.findtext("height") is None:
        raise ValueError(f"{path}: no <size><width>/<height>; not a Flickr30k Entities annotation")
    ann = ImageAnnotation(
        root.findtext("filename") or f"{path.stem}.jpg",
        int(size.findtext("width")),
        int(size.findtext("height")),
    )
    for obj in root.findall("object"):
        names = [n.text.strip() for n in obj.findall("name") if n.text and n.text.strip()]
        bndbox = obj.find("bndbox")
        if bndbox is not None and len(bndbox):
            try:
                box = tuple(float(bndbox.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: object {names}: <bndbox> needs numeric xmin/ymin/xmax/ymax") from e
            for name in names:
                ann.boxes.setdefault(name, []).append(box)  # type: ignore[arg-type]
        else:
            for name in names:
                if int(obj.findtext("nobndbox") or 0) > 0:
                    ann.nobox.add(name)
                if int(obj.findtext("scene") or 0) > 0:
                    ann.scene.add(name)
    return ann


def read_split_ids(root: str | os.PathLike, split: str) -> list[str]:
    path = Path(root) / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; point --entities-dir at the flickr30k_entities folder (with {split}.txt, "
            "Annotations/ and Sentences/)"
        )
    return [ln.strip() for ln in path.read_text(encoding="utf-8").split("\n") if ln.strip()]


def load_entities(root: str | os.PathLike, split: str) -> list[PhraseExample]:
    """Every phrase with at least one box, from the Entities folder, in file order."""
    root = Path(root)
    out = []
    for image_id in read_split_ids(root, split):
        ann = read_annotation(_entities_file(root, "Annotations", f"{image_id}.xml"))
        for k, sent in enumerate(read_sentences(_entities_file(root, "Sentences", f"{image_id}.txt"))):
            for ph in sent.phrases:
                if ph.phrase_id not in ann.boxes:
                    continue  # no box (nobndbox / scene / notvisual): not a grounding query
                out.append(
                    _example(
                        split,
                        image_id,
                        k,
                        sent.text,
                        ph.span,
                        ph.types,
                        ann.filename,
                        (ann.width, ann.height),
                        ann.boxes[ph.phrase_id],
                    )
                )
    return out


def _entities_file(root: Path, folder: str, name: str) -> Path:
    path = root / folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the Entities folder needs {folder}/{name}")
    return path


def _example(
    split: str,
    image_id: str,
    sentence_id: int,
    caption: str,
    span: tuple[int, int],
    types: Sequence[str],
    file_name: str,
    size: tuple[int, int],
    truth: Sequence[Box],
) -> PhraseExample:
    return PhraseExample(
        id=f"flickr30k/{image_id}/{sentence_id}/{span[0]}-{span[1]}",
        split=split,
        image_id=str(image_id),
        sentence_id=int(sentence_id),
        caption=caption,
        span=(int(span[0]), int(span[1])),
        types=tuple(types),
        file_name=file_name,
        size=size,
        truth=tuple(tuple(float(v) for v in b) for b in truth),  # type: ignore[misc]
    )


# ------------------------------------------------------------------------------------------------------------
# MDETR's final_flickr_separateGT_<split>.json


def load_mdetr(
    json_path: str | os.PathLike, entities_root: str | os.PathLike | None = None, split: str | None = None
) -> list[PhraseExample]:
    """Queries from MDETR's file; ground truth from the Entities folder when given (the official way)."""
    json_path = Path(json_path)
    m = re.fullmatch(r"final_flickr_(?:separate|merged)GT_(\w+)\.json", json_path.name)
    split = split or (m.group(1) if m else None)
    if split is None:
        raise ValueError(f"{json_path}: cannot tell the split from the file name; pass split=")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path}: expected a COCO-style JSON object with 'images' and 'annotations'")
    anns_by_image: dict[Any, list[dict]] = defaultdict(list)
    for ann in data.get("annotations", []):
        anns_by_image[ann["image_id"]].append(ann)

    annotations: dict[str, ImageAnnotation] = {}
    sentences: dict[str, list[Sentence]] = {}
    out = []
    for img in data["images"]:
        where = f"{json_path} image id {img.get('id')}"
        image_id = str(img["original_img_id"])
        sentence_id = int(img["sentence_id"])
        caption = img["caption"]
        size = (int(float(img["width"])), int(float(img["height"])))  # strings in the released files
        for spans in img["tokens_positive_eval"]:
            start, end = (int(v) for v in spans[0])  # the official script uses a phrase's first span
            if entities_root is None:
                truth = [
                    metrics.xywh_to_xyxy(a["bbox"])
                    for a in anns_by_image.get(img["id"], [])
                    if any(list(t) == [start, end] for t in a["tokens_positive"])
                ]
                types: tuple[str, ...] = ()
            else:
                if image_id not in annotations:
                    root = Path(entities_root)
                    annotations[image_id] = read_annotation(
                        _entities_file(root, "Annotations", f"{image_id}.xml")
                    )
                    sentences[image_id] = read_sentences(_entities_file(root, "Sentences", f"{image_id}.txt"))
                phrase = _match_phrase(sentences[image_id], sentence_id, caption, (start, end), where)
                truth = annotations[image_id].boxes.get(phrase.phrase_id, [])
                types = phrase.types
            if not truth:
                raise ValueError(
                    f"{where}: phrase {caption[start:end]!r} at {start}-{end} has no ground-truth box; "
                    "the file and the annotations do not belong together"
                )
            out.append(
                _example(
                    split, image_id, sentence_id, caption, (start, end), types, img["file_name"], size, truth
                )
            )
    return out


def _match_phrase(
    sents: list[Sentence], sentence_id: int, caption: str, span: tuple[int, int], where: str
) -> Phrase:
    if not 0 <= sentence_id < len(sents):
        raise ValueError(
            f"{where}: sentence_id {sentence_id} but the Sentences file has {len(sents)} sentences"
        )
    sent = sents[sentence_id]
    for ph in sent.phrases:  # by position first; the official script matches the text (first phrase wins)
        if ph.span == span:
            return ph
    for ph in sent.phrases:
        if ph.text == caption[span[0] : span[1]]:
            return ph
    raise ValueError(
        f"{where}: phrase {caption[span[0] : span[1]]!r} is not in sentence {sentence_id} of the "
        "Entities folder; the MDETR file and the Entities folder do not match"
    )


def find_mdetr_file(mdetr_dir: str | os.PathLike, split: str) -> Path:
    path = Path(mdetr_dir) / f"final_flickr_separateGT_{split}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; point --mdetr-dir at the unpacked mdetr_annotations/ folder"
        )
    return path


def load_split(
    split: str, entities_dir: str | os.PathLike | None = None, mdetr_dir: str | os.PathLike | None = None
) -> list[PhraseExample]:
    """One split from the Entities folder, MDETR's file, or both (MDETR queries, Entities ground truth)."""
    if split not in ("train", *SPLITS):
        raise ValueError(f"Flickr30k Entities splits are train, val, test; got {split!r}")
    if entities_dir is None and mdetr_dir is None:
        raise ValueError("give --entities-dir (flickr30k_entities folder), --mdetr-dir (MDETR json), or both")
    if mdetr_dir is not None:
        return load_mdetr(find_mdetr_file(mdetr_dir, split), entities_dir, split)
    return load_entities(entities_dir, split)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------------
# Phrase grounding


def grounding_prompt(caption: str, span: tuple[int, int]) -> str:
    """The official prompt: `<grounding>{caption before the phrase} <phrase>{phrase}</phrase>`."""
    start, end = span
    return f"{GROUNDING}{caption[:start]} {PHRASE_START}{caption[start:end]}{PHRASE_END}"


def grounding_queries(examples: Sequence[PhraseExample], images_dir: str | os.PathLike) -> list[Query]:
    return [
        Query(
            e.id,
            resolve_image(images_dir, e.file_name, IMAGE_SUBDIRS),
            grounding_prompt(e.caption, e.span),
            e.size,
        )
        for e in examples
    ]


def phrase_record(
    *,
    id: str,
    split: str,
    size: tuple[int, int],
    caption: str,
    span: tuple[int, int],
    types: Sequence[str],
    truth: Sequence[Box],
    query: Query,
    prediction: Prediction,
    ks: Sequence[int] = metrics.RECALL_KS,
) -> dict[str, Any]:
    """Score one phrase (metrics.recall_ious, ANY-box) into a JSON-ready record."""
    phrase = caption[span[0] : span[1]]
    predicted = prediction.pixel_boxes_for(phrase, size)
    ious = metrics.recall_ious(predicted, truth, ks)
    return {
        "id": id,
        "split": split,
        "image": str(query.image) if isinstance(query.image, (str, os.PathLike)) else query.id,
        "size": list(size),
        "caption": caption,
        "phrase": phrase,
        "types": list(types),
        "prompt": query.prompt,
        "text": prediction.text,
        "truth": [list(b) for b in truth],
        "predicted": [list(b) for b in predicted],
        "ious": {str(k): v for k, v in ious.items()},
        "decoded": bool(predicted),
        "score_first": (prediction.scores_for(phrase) or [None])[0],
    }


def score_examples(
    examples: Sequence[PhraseExample], queries: Sequence[Query], predictions: Mapping[str, Prediction]
) -> list[dict[str, Any]]:
    return [
        phrase_record(
            id=e.id,
            split=e.split,
            size=e.size,
            caption=e.caption,
            span=e.span,
            types=e.types,
            truth=e.truth,
            query=q,
            prediction=predictions[q.id],
        )
        for e, q in zip(examples, queries, strict=True)
    ]


def summarize(records: Sequence[Mapping[str, Any]], ks: Sequence[int] = metrics.RECALL_KS) -> dict[str, Any]:
    """{split: {"all": {count, R@k...}, "<type>": {...}, "undecodable": n}}."""
    by_split: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        by_split[r["split"]].append(r)
    out = {}
    for split, rs in by_split.items():
        table = metrics.recall_summary(
            (({int(k): v for k, v in r["ious"].items()}, r["types"]) for r in rs), ks
        )
        out[split] = {
            "recall": table,
            "undecodable": sum(not r["decoded"] for r in rs),
            "paper": PAPER_RECALL.get(split),
        }
    return out


def evaluate_grounding(
    predictor: GroundingPredictor,
    examples: Sequence[PhraseExample],
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
    """Run phrase grounding on `examples`, write the report to out_dir, return the metrics.

    generation: changes to the protocol's decoding (GROUNDING_GENERATION); None: the protocol's.
    """
    out_dir = Path(out_dir)
    generation = pinned_generation(GROUNDING_GENERATION, generation)
    queries = grounding_queries(examples, images_dir)
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
    result = grounding_result(
        records,
        stats,
        model_id=model_id,
        generation=generation,
        protocol="prompt <grounding>{caption before} <phrase>{phrase}</phrase>; ANY-box; R@k over the "
        "first k generated boxes; IoU >= 0.5",
    )
    write_grounding_report(out_dir, result, records, samples)
    return result


def grounding_result(
    records: Sequence[Mapping[str, Any]],
    stats: RunStats,
    *,
    model_id: str,
    generation: Mapping[str, Any] | None,
    protocol: str,
    protocol_generation: Mapping[str, Any] = GROUNDING_GENERATION,
) -> dict[str, Any]:
    """The metrics.json content of a phrase-grounding run: settings, `summarize(records)`, run statistics.

    generation: the decoding used; protocol_generation: the protocol's (a difference is listed).
    """
    return {
        "task": "phrase-grounding",
        "model": model_id,
        **generation_record(protocol_generation, generation or {}),
        "protocol": protocol,
        "results": summarize(records),
        "run": stats.to_json(),
    }


def write_grounding_report(
    out_dir: Path, result: dict[str, Any], records: Sequence[dict], samples: int, load: Any = None
) -> None:
    """metrics.json, records.jsonl, report.md, the plots and the sample sheet of a phrase-grounding run."""
    by_split: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        by_split[r["split"]].append(r)
    # per split: the first box and its score (None: unscored) past one IoU threshold
    result["past_threshold"] = {
        split: metrics.threshold_metrics(
            [r["ious"]["1"] for r in rs],
            [r.get("score_first") for r in rs],
            [r["predicted"][0] if r["predicted"] else None for r in rs],
            [r["truth"] for r in rs],
        )
        for split, rs in by_split.items()
    }
    report.write_json(out_dir / "metrics.json", result)
    report.write_jsonl(out_dir / "records.jsonl", records)
    md = [
        "# Flickr30k Entities phrase grounding",
        "",
        f"Model: `{result['model']}`. Protocol: `{result['protocol']}` (SPEC §11). Queries: "
        f"{result['run']['queries']} ({result['run']['from_cache']} from the cache).",
        describe_generation(result),
        "",
    ]
    rows = []
    for split, s in result["results"].items():
        a, paper = s["recall"]["all"], s["paper"] or {}
        rows.append(
            [
                split,
                a["count"],
                a["R@1"],
                a["R@5"],
                a["R@10"],
                paper.get("R@1"),
                paper.get("R@5"),
                paper.get("R@10"),
                s["undecodable"],
            ]
        )
    md += [
        report.markdown_table(
            ["split", "phrases", "R@1", "R@5", "R@10", "paper R@1", "paper R@5", "paper R@10", "no box"], rows
        ),
        "",
    ]
    for split, s in result["results"].items():
        types = [t for t in s["recall"] if t != "all"]
        if types:
            md += [
                f"## {split}: by phrase type",
                "",
                report.markdown_table(
                    ["type", "phrases", "R@1", "R@5", "R@10"],
                    [
                        [
                            t,
                            s["recall"][t]["count"],
                            s["recall"][t]["R@1"],
                            s["recall"][t]["R@5"],
                            s["recall"][t]["R@10"],
                        ]
                        for t in ["all", *types]
                    ],
                ),
                "",
            ]
    md += grounding_plots(out_dir, records)
    sheet = report.sample_sheet(
        report.pick_samples(
            [
                report.Sample(
                    r["image"],
                    f"{r['phrase']} in: {r['caption']}",
                    r["truth"],
                    r["predicted"],
                    r["ious"]["1"] >= metrics.IOU_THRESHOLD,
                    verdict=recall_verdict(r, f"{r['split']}: "),
                )
                for r in records
            ],
            samples,
        ),
        out_dir / "samples.png",
        load=load,
    )
    if sheet:
        md += [
            "## Samples",
            "",
            "Each tile says its split and R@k for each k: a hit when one of the first k boxes has IoU ≥ 0.5",
            "with a true box (the best IoU of the first box in brackets); tiles are picked by R@1.",
            "",
            report.image_link(sheet, out_dir, "samples"),
            "",
        ]
    for split, summary in result["past_threshold"].items():
        md += report.threshold_section(
            summary, out_dir, f"threshold_{report.slug(split)}", f"Phrase grounding {split}, first box"
        )
    atomic_write_text(out_dir / "report.md", "\n".join(md))


def recall_verdict(record: Mapping[str, Any], where: str = "") -> str:
    """A sample tile's first line: `where` (e.g. "val: ") and R@k hit or miss for each k ("R@1 miss, R@5
    hit, R@10 hit (IoU 0.31)", the IoU that of the first box)."""
    if not record["decoded"]:
        return f"{where}no box, R@k miss"
    ious = record["ious"]
    parts = [f"R@{k} {'hit' if ious[k] >= metrics.IOU_THRESHOLD else 'miss'}" for k in sorted(ious, key=int)]
    return f"{where}{', '.join(parts)} (IoU {ious['1']:.2f})"


def grounding_plots(out_dir: Path, records: Sequence[Mapping[str, Any]]) -> list[str]:
    """One IoU histogram and one recall-by-type chart per split; their report.md lines."""
    by_split: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        by_split[r["split"]].append(r)
    md = []
    for split, rs in by_split.items():
        name = report.slug(split)
        hist = report.iou_histogram(
            [r["ious"]["1"] for r in rs],
            out_dir / f"iou_hist_{name}.png",
            f"Phrase grounding {split}: best IoU of the first box (n={len(rs)})",
        )
        md += [f"## {split}: plots", "", report.image_link(hist, out_dir, f"IoU histogram, {split}"), ""]
        groups = sorted({t for r in rs for t in r["types"]})
        if groups:
            rows_by = {g: [r for r in rs if g in r["types"]] for g in groups}
            bars = report.bar_chart(
                groups,
                {
                    f"R@{k}": [
                        100.0 * sum(r["ious"][str(k)] >= metrics.IOU_THRESHOLD for r in group) / len(group)
                        for group in rows_by.values()
                    ]
                    for k in metrics.RECALL_KS
                },
                out_dir / f"by_type_{name}.png",
                f"Phrase grounding {split}: recall by phrase type",
                "phrase type",
                counts=[len(group) for group in rows_by.values()],
            )
            md += [report.image_link(bars, out_dir, f"recall by phrase type, {split}"), ""]
    return md


# ------------------------------------------------------------------------------------------------------------
# Captioning


def caption_references(
    examples: Sequence[PhraseExample],
) -> dict[str, tuple[str, str, tuple[int, int], list[str]]]:
    """image id → (file name, split, size, its captions), from any loaded phrase examples."""
    seen: dict[str, dict[int, str]] = defaultdict(dict)
    info: dict[str, tuple[str, str, tuple[int, int]]] = {}
    for e in examples:
        seen[e.image_id][e.sentence_id] = e.caption
        info[e.image_id] = (e.file_name, e.split, e.size)
    return {i: (*info[i], [caps[k] for k in sorted(caps)]) for i, caps in seen.items()}


def load_captions(
    root: str | os.PathLike, split: str
) -> dict[str, tuple[str, str, tuple[int, int], list[str]]]:
    """image id → (file name, split, size, all its captions) from the Entities folder (box-less ones too)."""
    root = Path(root)
    out = {}
    for image_id in read_split_ids(root, split):
        ann = read_annotation(_entities_file(root, "Annotations", f"{image_id}.xml"))
        sents = read_sentences(_entities_file(root, "Sentences", f"{image_id}.txt"))
        out[image_id] = (ann.filename, split, (ann.width, ann.height), [s.text for s in sents])
    return out


def evaluate_captions(
    predictor: GroundingPredictor,
    images: Mapping[str, tuple[str, str, tuple[int, int], list[str]]],
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model_id: str,
    prompt: str = CAPTION_PROMPT,
    cache: PredictionCache | str | os.PathLike | None = None,
    batch_size: int = 8,
    generation: Mapping[str, Any] | None = None,
    progress: bool = True,
    metrics_names: Sequence[str] = ("CIDEr", "METEOR"),
) -> dict[str, Any]:
    """Caption each image with `prompt`; score the words after the prompt against its five captions.

    generation: changes to the protocol's decoding (CAPTION_GENERATION); None: the protocol's.
    """
    from kosmos2.eval import text_metrics

    text_metrics.require()
    out_dir = Path(out_dir)
    generation = pinned_generation(CAPTION_GENERATION, generation)
    queries = [
        Query(f"flickr30k-caption/{i}", resolve_image(images_dir, fn, IMAGE_SUBDIRS), prompt, size)
        for i, (fn, _, size, _) in images.items()
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
    ids = list(images)
    candidates = {i: predictions[q.id].answer for i, q in zip(ids, queries, strict=True)}
    references = {i: images[i][3] for i in ids}
    scores = text_metrics.caption_metrics(candidates, references, metrics_names)
    result = {
        "task": "caption",
        "model": model_id,
        "prompt": prompt,
        **generation_record(CAPTION_GENERATION, generation),
        "results": scores,
        "paper": {"CIDEr": PAPER_CAPTION_CIDER},
        "run": stats.to_json(),
    }
    report.write_json(out_dir / "metrics.json", result)
    report.write_jsonl(
        out_dir / "records.jsonl",
        [
            {
                "id": i,
                "image": str(q.image),
                "prompt": prompt,
                "text": predictions[q.id].text,
                "caption": candidates[i],
                "references": references[i],
            }
            for i, q in zip(ids, queries, strict=True)
        ],
    )
    rows = [
        [name, value, PAPER_CAPTION_CIDER if name == "CIDEr" else None]
        for name, value in scores["scores"].items()
    ]
    md = [
        "# Flickr30k captioning",
        "",
        f"Model: `{model_id}`. Prompt `{prompt}`. {len(ids)} images. Tokenizer: {scores['tokenizer']}.",
        describe_generation(result),
        "",
        report.markdown_table(["metric", "ours (×100)", "paper"], rows),
        "",
        *(f"- {n}" for n in scores["notes"]),
        "",
    ]
    atomic_write_text(out_dir / "report.md", "\n".join(md))
    return result
