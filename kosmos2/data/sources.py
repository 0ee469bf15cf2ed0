"""Fine-tuning data: annotation files in the common grounding formats -> grounded samples.

A `Sample` is one training example: an image (a path, or encoded bytes), the prompt the model is given, and
the target markup it learns (written by `kosmos2.grounding`); collation applies the SPEC §3 loss mask with the
loss on the target only. Every reader is a `Source`; `--data` specs (`parse_spec`) pick one or mix several.

    kind     file(s)                                      samples
    coco     COCO detection instances.json               caption listing the objects (category names are the
                                                          phrases), REC for each object that its name or a
                                                          position picks out uniquely, REG for them
    refer    refer's refs(unc|umd|google).p + instances   REC (and REG) for each expression of a split
    mdetr    MDETR finetune_refcoco*_<split>.json         REC (and REG)
    flickr   Flickr30k Entities folder (Annotations/,     grounded caption per sentence, phrase grounding per
             Sentences/, <split>.txt)                     phrase
    odvg     Open-GroundingDino ODVG JSONL                detection records as coco, grounding records as
                                                          grounded captions + REC per region
    grit     GRIT-20M parquet (images <key>.jpg) or our   grounded or plain captions via grit_reader
             GRIT webdataset shards (.tar)
    jsonl    plain JSONL, see `JsonlSource`               grounded text as given

Bad records (missing image, box outside the image or without area, empty phrase, phrase not in the caption,
malformed markup, unknown category) are counted in a `Report` by file and record and left out; they never
stop a run and never become a wrong box. A reader raises only when a whole file cannot be read.

The `--data` spec (see `parse_spec`):

    KIND:PATH[:KEY=VALUE]...[*WEIGHT] , ...       e.g.
    coco:/data/ui/instances_train.json:images=/data/ui/images*2,jsonl:/data/extra.jsonl*1

KEY=VALUE options: `images=DIR` (image folder; default: the annotation file's folder), `tasks=caption+rec+reg`
(which samples to make), `split=NAME` (refer, mdetr, flickr), `refs=FILE` (refer pickle). WEIGHT (default 1)
is the source's share of the mixture's draws. Paths may not contain "," or ":" followed by `KEY=`; repeat
`--data` instead of joining with "," when a path holds a comma.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kosmos2 import grounding
from kosmos2.eval import flickr30k, refcoco
from kosmos2.eval.metrics import xywh_to_xyxy

Box = tuple[float, float, float, float]

CAPTION_PROMPT = "An image of"  # the grounded brief caption prompt, SPEC §1 (after <grounding>)
PIXEL_TOLERANCE = (
    1.0  # pixel boxes this far outside the image are clamped (annotation rounding); further: bad
)
POSITION_MARGIN = (
    0.2  # REC by position: the object's centre is this fraction of the image apart from the rest
)
TASKS = ("caption", "rec", "reg", "phrase")


@dataclass(frozen=True)
class Sample:
    """One grounded training example.

    image: a file path or encoded image bytes. prompt: what the model is given after the image (e.g.
    "<grounding>An image of"); target: the markup it learns (loss on the target and `</s>` only). task:
    "caption", "rec", "reg", "phrase" or "text". where: "file record N" for reports. group: the image's key,
    so held-out splits never share an image with training. truth: (phrase, normalised boxes) the held-out
    evaluation scores against. center_crop: resize the short side and centre-crop before preprocessing
    (GRIT samples: their boxes were re-projected through that crop).
    """

    image: str | bytes
    prompt: str
    target: str
    task: str
    where: str
    group: str
    truth: tuple[tuple[str, tuple[Box, ...]], ...] = ()
    size: tuple[int, int] = (0, 0)  # (width, height) as annotated
    center_crop: bool = False


class Report:
    """Bad records by file and record: counted, listed (the first `keep`), never raised."""

    def __init__(self, keep: int = 1000) -> None:
        self.counts: Counter[str] = Counter()  # file -> bad records
        self.items: list[dict[str, str]] = []
        self.keep = keep

    def bad(self, file: str | os.PathLike, record: Any, reason: str) -> None:
        self.counts[str(file)] += 1
        if len(self.items) < self.keep:
            self.items.append({"file": str(file), "record": str(record), "reason": reason})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self, limit: int = 5) -> str:
        if not self.total:
            return "no bad records"
        lines = [f"{self.total} bad records left out:"]
        lines += [f"  {file}: {n}" for file, n in self.counts.most_common()]
        lines += [f"  e.g. {i['file']} record {i['record']}: {i['reason']}" for i in self.items[:limit]]
        return "\n".join(lines)


class BadRecord(ValueError):
    """A record that cannot become a sample; the message says why."""


# ------------------------------------------------------------------------------------------------------------
# Shared helpers


def pixel_box(box: Sequence[float], size: tuple[int, int], xywh: bool = False) -> Box:
    """A pixel box checked against the image: 4 finite numbers, with area, inside the image (up to
    PIXEL_TOLERANCE, then clamped). Raises BadRecord."""
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise BadRecord(f"box {box!r} is not 4 numbers") from None
    if len(values) != 4 or any(v != v or v in (float("inf"), float("-inf")) for v in values):
        raise BadRecord(f"box {box!r} is not 4 finite numbers")
    x1, y1, x2, y2 = xywh_to_xyxy(values) if xywh else values
    W, H = size
    if not (x2 > x1 and y2 > y1):
        raise BadRecord(f"box {list(box)} has no area ({'x, y, w, h' if xywh else 'x1, y1, x2, y2'})")
    t = PIXEL_TOLERANCE
    if x1 < -t or y1 < -t or x2 > W + t or y2 > H + t:
        raise BadRecord(f"box {list(box)} lies outside the {W}x{H} image")
    return max(x1, 0.0), max(y1, 0.0), min(x2, float(W)), min(y2, float(H))


def normalized_box(box: Sequence[float], size: tuple[int, int], xywh: bool = False) -> Box:
    """`pixel_box` divided by the image size: a normalised (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = pixel_box(box, size, xywh)
    W, H = size
    return x1 / W, y1 / H, x2 / W, y2 / H


def image_size_of(path: Path) -> tuple[int, int]:
    """(width, height) from the file header (no decoding); BadRecord for a missing or unreadable file."""
    from PIL import Image

    if not path.is_file():
        raise BadRecord(f"image {path} not found")
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:
        raise BadRecord(f"image {path} cannot be read ({e.__class__.__name__}: {e})") from None


def find_image(root: Path, file_name: str, subdirs: Sequence[str] = ()) -> Path:
    """root/file_name (or root/<subdir>/file_name); BadRecord naming the first candidate if none exists."""
    for folder in (root, *(root / s for s in subdirs)):
        if (folder / file_name).is_file():
            return folder / file_name
    raise BadRecord(f"image {root / file_name} not found")


def held_out(group: str, fraction: float, seed: int = 0) -> bool:
    """Whether an image belongs to the held-out split: a stable hash of its key's last path component (its
    file name), so a rerun picks the same split, and so does the same data set copied to another folder."""
    if fraction <= 0:
        return False
    name = group.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); fix or remove the file") from None


def _read_jsonl(path: Path, report: Report) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of each JSON object line; bad lines are reported."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                report.bad(path, f"line {number}", f"not valid JSON ({e})")
                continue
            if not isinstance(record, dict):
                report.bad(path, f"line {number}", "not a JSON object")
                continue
            yield number, record


# ------------------------------------------------------------------------------------------------------------
# Sample builders: one grounded fact -> prompt + target


def caption_sample(
    image: str, size: tuple[int, int], phrases: Sequence[tuple[str, Sequence[Box]]], where: str, group: str
) -> Sample:
    """Caption "An image of A, B and C." with each phrase grounded (normalised boxes), as the target after
    the prompt "<grounding>An image of"."""
    names = [p for p, _ in phrases]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    caption = f"{CAPTION_PROMPT} {listed}."
    spans, at = [], len(CAPTION_PROMPT) + 1
    for name, boxes in phrases:
        spans.append((at, at + len(name), list(boxes)))
        at += len(name) + (2 if len(spans) < len(names) - 1 else 5)  # ", " or " and "
    text = grounding.markup(caption, spans)
    target = text[len(CAPTION_PROMPT) :]
    truth = tuple((p, tuple(b)) for p, b in phrases)
    return Sample(image, grounding.GROUNDING + CAPTION_PROMPT, target, "caption", where, group, truth, size)


def rec_sample(
    image: str, size: tuple[int, int], expression: str, box: Box, where: str, group: str
) -> Sample:
    """REC: prompt `<grounding><phrase>{expression}</phrase>`, target `<object><ul><lr></object>`."""
    return Sample(
        image,
        refcoco.rec_prompt(expression),
        grounding.object_markup([box]),
        "rec",
        where,
        group,
        ((expression, (box,)),),
        size,
    )


def reg_sample(
    image: str, size: tuple[int, int], expression: str, box: Box, where: str, group: str
) -> Sample:
    """REG: prompt `<phrase> It</phrase><object>…</object> is`, target the expression."""
    W, H = size
    pixels = grounding.box_to_pixels(box, W, H)
    return Sample(
        image,
        refcoco.reg_prompt(pixels, size),
        expression,
        "reg",
        where,
        group,
        ((expression, (box,)),),
        size,
    )


def phrase_sample(
    image: str,
    size: tuple[int, int],
    caption: str,
    span: tuple[int, int],
    boxes: Sequence[Box],
    where: str,
    group: str,
) -> Sample:
    """Phrase grounding (Flickr30k protocol): prompt `<grounding>{words before} <phrase>{phrase}</phrase>`."""
    phrase = caption[span[0] : span[1]]
    return Sample(
        image,
        flickr30k.grounding_prompt(caption, span),
        grounding.object_markup(list(boxes)),
        "phrase",
        where,
        group,
        ((phrase, tuple(boxes)),),
        size,
    )


def position_word(index: int, boxes: Sequence[Box], margin: float = POSITION_MARGIN) -> str | None:
    """The position that singles out boxes[index] among `boxes` (normalised, one category on one image):
    "on the left" / "on the right" / "at the top" / "at the bottom" when its centre is at least `margin`
    further that way than every other box's centre; None when no position picks it out."""
    cx = [(b[0] + b[2]) / 2 for b in boxes]
    cy = [(b[1] + b[3]) / 2 for b in boxes]
    others = [j for j in range(len(boxes)) if j != index]
    tests = (
        ("on the left", all(cx[j] - cx[index] >= margin for j in others)),
        ("on the right", all(cx[index] - cx[j] >= margin for j in others)),
        ("at the top", all(cy[j] - cy[index] >= margin for j in others)),
        ("at the bottom", all(cy[index] - cy[j] >= margin for j in others)),
    )
    return next((word for word, holds in tests if holds), None)


def object_samples(
    image: str,
    size: tuple[int, int],
    objects: Sequence[tuple[str, Box]],
    tasks: Sequence[str],
    where: str,
    group: str,
) -> list[Sample]:
    """COCO-style objects (name, normalised box) of one image -> caption, REC and REG samples.

    The caption lists every name once (in order of first appearance) with all its boxes. REC and REG cover
    each object that its name alone ("the blue button") or its name and a position ("the blue button on the
    left", `position_word`) picks out; others are left out (ambiguous, not bad).
    """
    out: list[Sample] = []
    by_name: dict[str, list[Box]] = {}
    for name, box in objects:
        by_name.setdefault(name, []).append(box)
    if "caption" in tasks and by_name:
        out.append(caption_sample(image, size, list(by_name.items()), where, group))
    for name, boxes in by_name.items():
        for i, box in enumerate(boxes):
            if len(boxes) == 1:
                expression = f"the {name}"
            else:
                place = position_word(i, boxes)
                if place is None:
                    continue
                expression = f"the {name} {place}"
            if "rec" in tasks:
                out.append(rec_sample(image, size, expression, box, where, group))
            if "reg" in tasks:
                out.append(reg_sample(image, size, expression, box, where, group))
    return out


def _phrase_text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRecord(f"empty phrase {value!r}")
    if grounding._TOKEN_RE.search(value):  # noqa: SLF001 - the one markup-token pattern
        raise BadRecord(f"phrase {value!r} contains a markup token")
    return " ".join(value.split())


# ------------------------------------------------------------------------------------------------------------
# Sources


@dataclass
class Source:
    """A reader: `samples(report)` yields its Samples (re-readable: each call reads the files again).

    path: the annotation file or folder. images: the image folder (default: the annotation file's folder).
    tasks: which sample kinds to make. weight: its share in a mixture. split: for refer/mdetr/flickr.
    """

    path: Path
    images: Path | None = None
    tasks: tuple[str, ...] = ("caption", "rec", "reg")
    weight: float = 1.0
    split: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    kind = "source"
    streaming = False  # too large to hold: streamed, not shuffled in memory

    @property
    def image_root(self) -> Path:
        if self.images is not None:
            return self.images
        return self.path if self.path.is_dir() else self.path.parent

    def samples(self, report: Report) -> Iterator[Sample]:
        """The source's grounded samples; each reader (a subclass per format) defines it."""
        raise NotImplementedError(f"{type(self).__name__} reads no format: use a subclass of Source")

    def referring(
        self, path: Path, size: tuple[int, int], expression: str, box: Box, where: str
    ) -> Iterator[Sample]:
        """The REC and REG samples (those `tasks` asks for) of one referring expression and its box."""
        if "rec" in self.tasks:
            yield rec_sample(str(path), size, expression, box, where, str(path))
        if "reg" in self.tasks:
            yield reg_sample(str(path), size, expression, box, where, str(path))

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}"


class CocoSource(Source):
    """COCO detection `instances.json` (images, annotations [x, y, w, h] pixels, categories with names).

    Category names become phrases (`object_samples`); crowd annotations (iscrowd=1) are skipped. Images are
    `images=DIR/<file_name>`.
    """

    kind = "coco"

    def samples(self, report: Report) -> Iterator[Sample]:
        data = _read_json(self.path)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(f"{self.path}: not a COCO instances file (no 'images' list)")
        names = {c.get("id"): c.get("name") for c in data.get("categories", [])}
        by_image: dict[Any, list[dict]] = {}
        for ann in data.get("annotations", []):
            by_image.setdefault(ann.get("image_id"), []).append(ann)
        for img in data["images"]:
            where = f"image id {img.get('id')}"
            try:
                path = find_image(self.image_root, str(img["file_name"]))
                size = (int(img["width"]), int(img["height"]))
            except (KeyError, TypeError, ValueError, BadRecord) as e:
                report.bad(self.path, where, str(e) if isinstance(e, BadRecord) else f"bad image entry ({e})")
                continue
            objects = []
            for ann in by_image.get(img.get("id"), []):
                if ann.get("iscrowd"):
                    continue
                try:
                    name = _phrase_text(names.get(ann.get("category_id")))
                    objects.append((name, normalized_box(ann.get("bbox", ()), size, xywh=True)))
                except BadRecord as e:
                    report.bad(self.path, f"annotation id {ann.get('id')}", str(e))
            yield from object_samples(str(path), size, objects, self.tasks, where, str(path))


class ReferSource(Source):
    """refer's `refs(unc).p` (or umd/google) with `instances.json` beside it: REC/REG per expression.

    path: the refs pickle (or its folder, refs(*).p found there); `split=` (default train).
    """

    kind = "refer"

    def samples(self, report: Report) -> Iterator[Sample]:
        refs_path = self.path
        if refs_path.is_dir():
            found = sorted(refs_path.glob("refs(*).p"))
            if not found:
                raise FileNotFoundError(f"{refs_path}: no refs(*).p in this folder")
            refs_path = found[0]
        instances = refs_path.parent / "instances.json"
        with open(refs_path, "rb") as f:
            try:
                refs = refcoco._DataOnlyUnpickler(f).load()  # noqa: SLF001 - the safe refer unpickler
            except Exception as e:
                raise ValueError(f"{refs_path}: not a refer refs pickle ({e})") from None
        coco = _read_json(instances)
        images = {img["id"]: img for img in coco.get("images", [])}
        anns = {ann["id"]: ann for ann in coco.get("annotations", [])}
        split = self.split or "train"
        root = self.images or refs_path.parent
        for ref in refs:
            if not isinstance(ref, dict) or ref.get("split") != split:
                continue
            where = f"ref_id {ref.get('ref_id')}"
            try:
                ann, img = anns.get(ref.get("ann_id")), images.get(ref.get("image_id"))
                if ann is None or img is None:
                    raise BadRecord(
                        f"ann_id {ref.get('ann_id')} or image_id {ref.get('image_id')} not in {instances}"
                    )
                path = find_image(root, img["file_name"], refcoco.IMAGE_SUBDIRS)
                size = (int(img["width"]), int(img["height"]))
                box = normalized_box(ann["bbox"], size, xywh=True)
            except BadRecord as e:
                report.bad(refs_path, where, str(e))
                continue
            for sent in ref.get("sentences", []):
                try:
                    expression = _phrase_text(sent.get("sent"))
                except BadRecord as e:
                    report.bad(refs_path, f"{where} sent_id {sent.get('sent_id')}", str(e))
                    continue
                yield from self.referring(path, size, expression, box, where)


class MdetrSource(Source):
    """MDETR's `finetune_refcoco*_<split>.json`: one image entry per expression (`caption`) with one box."""

    kind = "mdetr"

    def samples(self, report: Report) -> Iterator[Sample]:
        data = _read_json(self.path)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(f"{self.path}: not an MDETR referring file (no 'images' list)")
        by_image: dict[Any, list[dict]] = {}
        for ann in data.get("annotations", []):
            by_image.setdefault(ann.get("image_id"), []).append(ann)
        for img in data["images"]:
            where = f"image id {img.get('id')}"
            try:
                anns = by_image.get(img.get("id"), [])
                if len(anns) != 1:
                    raise BadRecord(f"{len(anns)} annotations; an MDETR referring entry has exactly one")
                path = find_image(self.image_root, img["file_name"], refcoco.IMAGE_SUBDIRS)
                size = (int(float(img["width"])), int(float(img["height"])))
                box = normalized_box(anns[0]["bbox"], size, xywh=True)
                expression = _phrase_text(img.get("caption"))
            except BadRecord as e:
                report.bad(self.path, where, str(e))
                continue
            yield from self.referring(path, size, expression, box, where)


class FlickrSource(Source):
    """Flickr30k Entities: path is the folder with Annotations/, Sentences/ and <split>.txt (default train).

    Each sentence becomes a grounded caption (prompt "<grounding>", its boxed phrases marked up; phrases
    without a box stay plain text) and, with task "phrase", one phrase-grounding sample per boxed phrase.
    Images: `images=DIR/<id>.jpg` (default: <path>/flickr30k-images).
    """

    kind = "flickr"

    @property
    def image_root(self) -> Path:
        return self.images or self.path / "flickr30k-images"

    def samples(self, report: Report) -> Iterator[Sample]:
        split = self.split or "train"
        for image_id in flickr30k.read_split_ids(self.path, split):
            where = f"image {image_id}"
            try:
                ann = flickr30k.read_annotation(self.path / "Annotations" / f"{image_id}.xml")
                sentences = flickr30k.read_sentences(self.path / "Sentences" / f"{image_id}.txt")
                path = find_image(self.image_root, ann.filename, flickr30k.IMAGE_SUBDIRS)
            except (OSError, ValueError) as e:
                report.bad(self.path, where, str(e))
                continue
            size = (ann.width, ann.height)
            boxes: dict[str, list[Box]] = {}
            for pid, pixel_boxes in ann.boxes.items():
                try:
                    boxes[pid] = [normalized_box(b, size) for b in pixel_boxes]
                except BadRecord as e:
                    report.bad(self.path, f"{where} entity {pid}", str(e))
            for k, sent in enumerate(sentences):
                spans = [
                    (p.span[0], p.span[1], boxes[p.phrase_id]) for p in sent.phrases if p.phrase_id in boxes
                ]
                if not spans:
                    continue
                swhere = f"{where} sentence {k}"
                if "caption" in self.tasks:
                    target = grounding.markup(sent.text, spans)
                    truth = tuple((sent.text[s:e], tuple(b)) for s, e, b in spans)
                    yield Sample(
                        str(path), grounding.GROUNDING, target, "caption", swhere, str(path), truth, size
                    )
                if "phrase" in self.tasks:
                    for s, e, b in spans:
                        yield phrase_sample(str(path), size, sent.text, (s, e), b, swhere, str(path))


class OdvgSource(Source):
    """Open-GroundingDino's ODVG JSONL: `{"filename", "width", "height", "detection": {"instances":
    [{"bbox": [x1, y1, x2, y2], "category"}]}}` (handled as COCO objects) or `{"grounding": {"caption",
    "regions": [{"bbox", "phrase"}]}}` (a grounded caption: each phrase marked at its first occurrence after
    the previous one, plus REC per region). Boxes are pixels, x1 y1 x2 y2; a region's bbox may be a list of
    boxes."""

    kind = "odvg"

    def samples(self, report: Report) -> Iterator[Sample]:
        for number, record in _read_jsonl(self.path, report):
            where = f"line {number}"
            try:
                path = find_image(self.image_root, str(record.get("filename")))
                size = (int(record["width"]), int(record["height"]))
            except (KeyError, TypeError, ValueError, BadRecord) as e:
                report.bad(self.path, where, str(e) if isinstance(e, BadRecord) else f"no width/height ({e})")
                continue
            try:
                if "detection" in record:
                    objects = [
                        (_phrase_text(i.get("category")), normalized_box(i.get("bbox", ()), size))
                        for i in record["detection"].get("instances", [])
                    ]
                    yield from object_samples(str(path), size, objects, self.tasks, where, str(path))
                elif "grounding" in record:
                    yield from self._grounding(record["grounding"], str(path), size, where)
                else:
                    raise BadRecord("neither 'detection' nor 'grounding'")
            except BadRecord as e:
                report.bad(self.path, where, str(e))

    def _grounding(self, g: Mapping[str, Any], image: str, size: tuple[int, int], where: str) -> list[Sample]:
        caption = g.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise BadRecord("empty caption")
        spans, at = [], 0
        for region in g.get("regions", []):
            phrase = _phrase_text(region.get("phrase"))
            raw = region.get("bbox", ())
            raw = raw if raw and isinstance(raw[0], (list, tuple)) else [raw]
            boxes = [normalized_box(b, size) for b in raw]
            start = caption.find(phrase, at)
            if start < 0:
                start = caption.find(phrase)
            if start < 0:
                raise BadRecord(f"phrase {phrase!r} is not in the caption {caption!r}")
            spans.append((start, start + len(phrase), boxes))
            at = start + len(phrase)
        return _text_samples(caption, spans, image, size, where, self.tasks)


def _text_samples(
    caption: str,
    spans: list[tuple[int, int, list[Box]]],
    image: str,
    size: tuple[int, int],
    where: str,
    tasks: Sequence[str],
) -> list[Sample]:
    """A grounded caption (prompt "<grounding>") and REC per phrase, from character spans."""
    try:
        target = grounding.markup(caption, spans)
    except ValueError as e:
        raise BadRecord(str(e)) from None
    truth = tuple((caption[s:e].strip(), tuple(b)) for s, e, b in spans)
    out = []
    if "caption" in tasks:
        out.append(Sample(image, grounding.GROUNDING, target, "caption", where, image, truth, size))
    if "rec" in tasks:
        for phrase, boxes in truth:
            if len(boxes) == 1:
                out.append(rec_sample(image, size, phrase, boxes[0], where, image))
    return out


class JsonlSource(Source):
    """Plain JSONL, one record per line, image paths relative to `images=` (default: the file's folder):

        {"image": "a.png", "text": "<grounding>An image of<phrase> a cat</phrase><object>…</object>"}
        {"image": "a.png", "caption": "a cat on a mat", "phrases": [{"text": "a cat",
         "boxes": [[x1,y1,x2,y2]]}]}

    "text" is grounded markup as the model writes it; a leading `<grounding>` and an optional "prompt" field
    (default "<grounding>") become the prompt, the rest is the target. It must parse back to itself
    (malformed markup is a bad record). "phrases": each "text" is marked at its first occurrence after the
    previous phrase (or at "span": [start, end]). Boxes are pixels x1 y1 x2 y2 unless the record says
    otherwise: "box_format": "xyxy" | "xywh", "normalized": true for boxes in [0, 1].
    """

    kind = "jsonl"

    def samples(self, report: Report) -> Iterator[Sample]:
        for number, record in _read_jsonl(self.path, report):
            where = f"line {number}"
            try:
                path = find_image(self.image_root, str(record.get("image")))
                yield from self._record(record, path, where)
            except BadRecord as e:
                report.bad(self.path, where, str(e))

    def _record(self, record: Mapping[str, Any], path: Path, where: str) -> list[Sample]:
        image = str(path)
        size = image_size_of(path)
        if "text" in record:
            text = record["text"]
            if not isinstance(text, str) or not text.strip():
                raise BadRecord("empty text")
            prompt = str(record.get("prompt", grounding.GROUNDING))
            if text.startswith(grounding.GROUNDING):
                prompt, text = grounding.GROUNDING + prompt.removeprefix(grounding.GROUNDING), text[11:]
            parsed = grounding.parse(text)
            spans = [(e.span[0], e.span[1], list(e.boxes)) for e in parsed.entities]
            try:
                rebuilt = grounding.markup(parsed.caption, spans)
            except ValueError as e:
                raise BadRecord(f"malformed markup ({e})") from None
            if re.sub(r"\s+", "", rebuilt) != re.sub(r"\s+", "", text.strip()):
                raise BadRecord(f"malformed markup: {text!r} does not parse back to itself")
            truth = tuple((e.phrase, tuple(e.boxes)) for e in parsed.entities if e.phrase)
            return [Sample(image, prompt, text.strip(), "text", where, image, truth, size)]
        caption = record.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise BadRecord("neither 'text' nor a non-empty 'caption'")
        fmt = record.get("box_format", "xyxy")
        if fmt not in ("xyxy", "xywh"):
            raise BadRecord(f"box_format {fmt!r} is not 'xyxy' or 'xywh'")
        spans, at = [], 0
        for phrase in record.get("phrases", []):
            text = _phrase_text(phrase.get("text") if isinstance(phrase, dict) else None)
            boxes = phrase.get("boxes") or []
            if not boxes:
                raise BadRecord(f"phrase {text!r} has no boxes")
            if record.get("normalized"):
                W, H = size
                boxes = [[b[0] * W, b[1] * H, b[2] * W, b[3] * H] if len(b) == 4 else b for b in boxes]
            boxes = [normalized_box(b, size, xywh=fmt == "xywh") for b in boxes]
            if "span" in phrase:
                start, end = (int(v) for v in phrase["span"])
                if caption[start:end].strip() != text:
                    raise BadRecord(f"span {phrase['span']} is {caption[start:end]!r}, not {text!r}")
            else:
                start = caption.find(text, at)
                if start < 0:
                    raise BadRecord(f"phrase {text!r} is not in the caption {caption!r}")
                end = start + len(text)
            spans.append((start, end, boxes))
            at = end
        return _text_samples(caption, spans, image, size, where, self.tasks)


class GritSource(Source):
    """GRIT-20M parquet (images in `images=DIR` as <key>.jpg/.png/.webp) or our GRIT webdataset shards
    (a .tar or a folder of them), through `grit_reader.prepare_sample` (score filter, training crop,
    containment filter, grounded about half the time). Streamed."""

    kind = "grit"
    streaming = True

    def samples(self, report: Report) -> Iterator[Sample]:
        from kosmos2.data import grit_reader

        paths = (
            sorted(self.path.glob("*.tar")) + sorted(self.path.glob("*.parquet"))
            if self.path.is_dir()
            else [self.path]
        )
        for path in paths:
            for key, record, data in self._records(path, report):
                where = f"key {key}"
                try:
                    from kosmos2.image import load_image

                    image = load_image(io.BytesIO(data))
                    s = grit_reader.prepare_sample(record, image)
                except Exception as e:  # an undecodable image, markup in the caption, a bad entry
                    report.bad(path, where, str(e))
                    continue
                prompt = grounding.GROUNDING if s.grounded else ""
                target = s.text.removeprefix(grounding.GROUNDING)
                truth = tuple((s.caption[a:b], tuple(bx)) for a, b, bx in s.phrases) if s.grounded else ()
                buf = io.BytesIO()
                s.image.save(buf, format="PNG")  # already cropped: center_crop stays False
                yield Sample(
                    buf.getvalue(), prompt, target, "caption", where, f"{path}:{key}", truth, s.image.size
                )

    def _records(self, path: Path, report: Report) -> Iterator[tuple[str, dict[str, Any], bytes]]:
        from kosmos2.data import grit_reader

        if path.suffix == ".tar":
            for record, data in grit_reader.iter_webdataset(path):
                yield str(record.get("key")), record, data
            return
        import pyarrow.parquet as pq

        root = self.images or path.parent
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                key = str(record.get("key"))
                file = next(
                    (
                        root / f"{key}.{e}"
                        for e in grit_reader.IMAGE_EXTENSIONS
                        if (root / f"{key}.{e}").is_file()
                    ),
                    None,
                )
                if file is None:
                    report.bad(path, f"key {key}", f"no image {root}/{key}.jpg (or .png/.webp)")
                    continue
                yield key, record, file.read_bytes()


SOURCES: dict[str, type[Source]] = {
    s.kind: s
    for s in (CocoSource, ReferSource, MdetrSource, FlickrSource, OdvgSource, GritSource, JsonlSource)
}
DEFAULT_TASKS = {"flickr": ("caption",), "refer": ("rec",), "mdetr": ("rec",)}


# ------------------------------------------------------------------------------------------------------------
# --data specs and mixtures


def parse_spec(spec: str | Sequence[str]) -> list[Source]:
    """Sources of a `--data` value (see the module docstring), or of several values (a repeated flag).

    Raises ValueError with the offending part for an unknown kind, a bad option or weight.
    """
    parts = [spec] if isinstance(spec, str) else list(spec)
    sources = []
    for value in parts:
        for item in (p.strip() for p in value.split(",")):
            if not item:
                continue
            sources.append(_parse_source(item))
    if not sources:
        raise ValueError(
            "--data is empty; give KIND:PATH, e.g. coco:/data/instances.json:images=/data/images"
        )
    return sources


def _parse_source(item: str) -> Source:
    weight = 1.0
    m = re.fullmatch(r"(.*)\*([0-9.eE+-]+)", item)
    if m:
        item = m.group(1)
        try:
            weight = float(m.group(2))
        except ValueError:
            raise ValueError(f"--data {item!r}: weight {m.group(2)!r} is not a number") from None
        if not weight > 0:
            raise ValueError(f"--data {item!r}: weight must be positive, got {weight}")
    kind, sep, rest = item.partition(":")
    if not sep or kind not in SOURCES:
        raise ValueError(f"--data {item!r}: start with one of {', '.join(SOURCES)} then ':PATH'")
    # options are the trailing ":KEY=VALUE" parts; the path is everything before them (it may hold ':')
    pieces = rest.split(":")
    options: dict[str, str] = {}
    while len(pieces) > 1 and re.fullmatch(r"[a-z_]+=.*", pieces[-1]):
        key, _, val = pieces.pop().partition("=")
        options[key] = val
    path = Path(":".join(pieces)).expanduser()
    known = {"images", "tasks", "split", "refs"}
    if set(options) - known:
        raise ValueError(
            f"--data {item!r}: unknown option(s) {sorted(set(options) - known)}; use {sorted(known)}"
        )
    tasks = tuple(
        options.get("tasks", "+".join(DEFAULT_TASKS.get(kind, ("caption", "rec", "reg")))).split("+")
    )
    if set(tasks) - set(TASKS):
        raise ValueError(f"--data {item!r}: unknown task(s) {sorted(set(tasks) - set(TASKS))}; use {TASKS}")
    if not path.exists():
        raise FileNotFoundError(f"--data {item!r}: {path} not found")
    images = Path(options["images"]).expanduser() if "images" in options else None
    if images is not None and not images.is_dir():
        raise FileNotFoundError(f"--data {item!r}: images folder {images} not found")
    return SOURCES[kind](path, images, tasks, weight, options.get("split"), options)


@dataclass
class Dataset:
    """The samples of some sources, read once, split into train and held-out by image (`held_out`)."""

    train: list[list[Sample]]  # per source
    heldout: list[Sample]
    sources: list[Source]
    report: Report

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.sources]


def load_sources(
    sources: Sequence[Source], report: Report | None = None, holdout: float = 0.0, seed: int = 0
) -> Dataset:
    """Read every sample of `sources`; images whose key `held_out` picks go to the held-out list.

    Samples hold image paths and strings, so fine-tuning sets of 10^5-10^6 samples fit in memory; GRIT
    samples hold their cropped image (PNG bytes): read GRIT subsets of fine-tuning size this way, not all of
    GRIT-20M. Raises ValueError for a source without a single usable sample.
    """
    report = report or Report()
    train, heldout = [], []
    for source in sources:
        mine, held = [], 0
        for sample in source.samples(report):
            if held_out(sample.group, holdout, seed):
                heldout.append(sample)
                held += 1
            else:
                mine.append(sample)
        if not mine and not held:
            raise ValueError(
                f"{source}: no usable training samples ({report.counts.get(str(source.path), 0)} bad)"
            )
        train.append(mine)
    return Dataset(train, heldout, list(sources), report)


def draw(per_source: Sequence[Sequence[Sample]], weights: Sequence[float], seed: int, index: int) -> Sample:
    """The `index`-th sample of the run's endless stream, a pure function of its arguments (so a resumed or
    multi-process run draws the same samples): a source picked with probability proportional to its
    weight (seeded by the index), then that source's sample at position `index` of its order, reshuffled
    every pass. With one source the stream visits every sample once per pass."""
    live = [w if len(p) else 0.0 for p, w in zip(per_source, weights, strict=True)]
    if not any(live):
        raise ValueError("no training samples to draw from (everything was held out or bad)")
    k = random.Random(f"{seed}:source:{index}").choices(range(len(live)), live)[0] if len(live) > 1 else 0
    n = len(per_source[k])
    epoch, position = divmod(index, n)
    return per_source[k][_order(seed, k, epoch, n)[position]]


@functools.lru_cache(maxsize=16)
def _order(seed: int, source: int, epoch: int, n: int) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}:{source}:{epoch}").shuffle(order)
    return order


def words_of(samples: Iterable[Sample]) -> set[str]:
    """The distinct words of the samples' prompts and targets, markup removed (for the vocabulary check)."""
    words: set[str] = set()
    for s in samples:
        for text in (s.prompt, s.target):
            words.update(grounding._TOKEN_RE.sub(" ", text).split())  # noqa: SLF001
    return words
