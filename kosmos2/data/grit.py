"""GRIT construction (SPEC §9): local image–caption pairs -> GRIT-20M-format parquet and webdataset shards.

    input: a JSONL or CSV listing (image, caption), webdataset tars, or parquet with image bytes or paths
      ──plan_shards──► InputShard × N: fixed runs of `shard_size` pairs, the unit of work and of commits
      per shard (the step functions, shared by the local engine here and the Ray engine in grit_ray.py):
        read_shard      ──► [Pair]             key, caption, encoded image, optional url / id / CLIP scores
        text_stage      ──► [CaptionParse]     spaCy noun chunks minus abstract ones, referring expressions
        detector_stage  ──► records + images   boxes for the chunks, score > 0.65, NMS across chunks; pairs
                                               with no chunk, no box or an unreadable image are dropped
        write_shard     ──► part-NNNNN.parquet + part-NNNNN.tar, each written to a temporary name and renamed
      ──► manifest.json: rewritten atomically after each shard with the shards done and their counts

Resuming: a shard's files appear only complete (rename), and the manifest lists a shard only after both of its
files are in place, so a killed run restarted with the same command redoes exactly the shards the manifest
lacks (overwriting any file a shard left before the manifest named it): nothing lost, nothing duplicated.
Shard boundaries and keys depend only on the input and `shard_size`, never on the number of workers. A lock
file (<output>/.lock, flock) keeps a second build out of a folder that one is writing.

The parquet records have exactly the released GRIT-20M columns, in the released order (`grit_schema()`), so
that pyarrow.concat_tables accepts released files and ours together:

    key str, clip_similarity_vitb32 float64, clip_similarity_vitl14 float64, id int64, url str, caption str,
    width int64, height int64, noun_chunks list<list<float64>>, ref_exps list<list<float64>>

Each entry of noun_chunks is [char_start, char_end (exclusive), x_min, y_min, x_max, y_max (normalised),
score], one per box (a chunk with two boxes has two entries); ref_exps[i] is the referring expression of
noun_chunks[i] with the same box and score, and nested expressions are kept (the containment filter belongs to
the training reader, as in the release). Entries are ordered by chunk start, chunk end, then score (best
first).
`key` and `id` come from the input when it has them, else from the pair's position in the input (key
"000000042", id 42); `url` is the input's or null. CLIP similarities cannot be computed here (no CLIP model is
shipped): they are copied from the input's `clip_similarity_vitb32` / `clip_similarity_vitl14` when present,
else null. `width` and `height` are those of the image as `kosmos2.image.load_image` sees it (EXIF orientation
applied), which the boxes are normalised to.

The webdataset tar of a shard holds, per record, `<key>.jpg` or `<key>.png` (the input file's bytes when it
is a JPEG or PNG without an EXIF rotation, else the decoded image re-encoded), `<key>.txt` (the caption) and
`<key>.json` (the record, plus "phrases": the referring expressions after the containment filter, equal spans
merged, [[start, end, [[x1, y1, x2, y2, score], ...]], ...], for training without this package's reader).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kosmos2.data.detectors import (
    DEFAULT_NMS_IOU,
    DEFAULT_SCORE_THRESHOLD,
    DETECTORS,
    Detection,
    Detector,
    make_detector,
    select_detections,
)
from kosmos2.fileio import atomic_write, fsync_dir

if TYPE_CHECKING:
    import pyarrow as pa
    from PIL import Image

    from kosmos2.data.grit_text import CaptionParse

log = logging.getLogger(__name__)

# In the released files' order (GRIT-20M's dataset card lists the same): pyarrow.concat_tables and
# datasets.concatenate_datasets with released files need the same columns in the same order.
GRIT_COLUMNS = (
    "key",
    "clip_similarity_vitb32",
    "clip_similarity_vitl14",
    "id",
    "url",
    "caption",
    "width",
    "height",
    "noun_chunks",
    "ref_exps",
)
CLIP_COLUMNS = ("clip_similarity_vitb32", "clip_similarity_vitl14")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "kosmos2-grit-build/1"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
INPUT_KINDS = ("jsonl", "csv", "webdataset", "parquet")


def grit_schema() -> pa.Schema:
    """The arrow schema of a GRIT-20M record, as in the released parquet files (columns in their order)."""
    import pyarrow as pa

    boxes = pa.list_(pa.list_(pa.float64()))
    types = {
        "key": pa.string(),
        "clip_similarity_vitb32": pa.float64(),
        "clip_similarity_vitl14": pa.float64(),
        "id": pa.int64(),
        "url": pa.string(),
        "caption": pa.string(),
        "width": pa.int64(),
        "height": pa.int64(),
        "noun_chunks": boxes,
        "ref_exps": boxes,
    }
    return pa.schema([(name, types[name]) for name in GRIT_COLUMNS])


# ------------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class BuildSettings:
    """Everything a build needs; picklable, so workers and Ray tasks receive it as it is.

    input: a listing file (.jsonl / .csv), a webdataset .tar, a .parquet file, or a folder holding files of
    one of those kinds. detector: "grounding-dino", "owlv2" (detector_path: the model directory) or
    "precomputed" (detector_path: the JSONL of detections). nms_iou: class-agnostic NMS threshold across
    chunks (a box overlapping a better one by IoU > nms_iou is dropped; 1.0 turns NMS off). batch_size: images
    per detector call. spacy_pipeline: a spaCy pipeline name or directory (None: grit_text's default).
    overwrite: delete a previous build's files in `output` (shards, manifest) and start over, instead of
    resuming it; a build with other settings can be rerun only so (or into another folder).
    """

    input: str
    output: str
    detector: str = "precomputed"
    detector_path: str = ""
    device: str = "cpu"
    shard_size: int = 1000
    batch_size: int = 8
    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    nms_iou: float = DEFAULT_NMS_IOU
    spacy_pipeline: str | None = None
    webdataset: bool = True
    workers: int = 1
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ValueError(f"detector {self.detector!r} is not one of {', '.join(DETECTORS)}")
        if not self.detector_path:
            what = "--detections FILE" if self.detector == "precomputed" else "--model-dir DIR"
            raise ValueError(f"the {self.detector} detector needs a path ({what})")
        for name in ("shard_size", "batch_size", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= self.score_threshold < 1.0:
            raise ValueError(f"score_threshold must lie in [0, 1), got {self.score_threshold!r}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must lie in (0, 1] (1.0 turns NMS off), got {self.nms_iou!r}")

    def fingerprint(self, detector_factory: Callable[[], Detector] | None = None) -> dict[str, Any]:
        """The settings that decide the records; a resumed build must have the same ones."""
        from kosmos2.data import grit_text

        path = Path(self.detector_path).resolve()
        detector: dict[str, Any] = {"kind": self.detector, "path": str(path)}
        if path.is_file():  # precomputed detections: a changed file is a different build
            detector["size"] = path.stat().st_size
        if detector_factory is not None:
            detector = {
                "factory": f"{detector_factory.__module__}.{getattr(detector_factory, '__qualname__', '')}"
            }
        nouns = hashlib.sha256(" ".join(sorted(grit_text.ABSTRACT_NOUNS)).encode()).hexdigest()[:16]
        return {
            "input": str(Path(self.input).resolve()),
            "shard_size": self.shard_size,
            "batch_size": self.batch_size,  # batch padding can change a model detector's outputs slightly
            "score_threshold": self.score_threshold,
            "nms_iou": self.nms_iou,
            "detector": detector,
            "spacy_pipeline": self.spacy_pipeline or grit_text.default_pipeline_name(),
            "abstract_nouns": nouns,
            "webdataset": self.webdataset,
        }


# ------------------------------------------------------------------------------------------------------------
# Input: planning shards and reading them


@dataclass(frozen=True)
class InputShard:
    """A run of input pairs: items [start, stop) of one input file; `offset` is the first pair's global index.

    kind "jsonl" / "csv" carry their rows (the listing is small); "webdataset" and "parquet" are read from the
    file when the shard runs.
    """

    index: int
    kind: str
    path: str
    start: int
    stop: int
    offset: int
    rows: tuple[tuple[int, dict[str, Any]], ...] = ()  # (line number, row) for listings

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass
class Pair:
    """One input pair, its image still encoded (bytes)."""

    key: str
    id: int
    caption: str
    image: bytes
    source: str  # where the pair came from, for messages: "listing.jsonl:12", "shard.tar:abc"
    url: str | None = None
    clip_similarity_vitb32: float | None = None
    clip_similarity_vitl14: float | None = None


def _input_files(path: Path) -> tuple[str, list[Path]]:
    """(kind, files) of an input path: a file, or a folder of files of one kind (sorted by name)."""
    suffix_kind = {".jsonl": "jsonl", ".csv": "csv", ".tar": "webdataset", ".parquet": "parquet"}
    if path.is_file():
        kind = suffix_kind.get(path.suffix.lower())
        if kind is None:
            raise ValueError(
                f"input {str(path)!r}: unknown kind of file; give a .jsonl or .csv listing of "
                "(image, caption), a webdataset .tar, a .parquet file, or a folder of such files"
            )
        return kind, [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input {str(path)!r} does not exist")
    found: dict[str, list[Path]] = {}
    for file in sorted(path.iterdir()):
        kind = suffix_kind.get(file.suffix.lower())
        if kind and file.is_file():
            found.setdefault(kind, []).append(file)
    if len(found) != 1:
        what = (
            ", ".join(f"{len(v)} {k}" for k, v in found.items()) or "no .jsonl, .csv, .tar or .parquet file"
        )
        raise ValueError(
            f"input folder {str(path)!r} holds {what}; it must hold input files of exactly one kind "
            "(a listing, webdataset tars or parquet files); pass the file itself to pick one"
        )
    ((kind, files),) = found.items()
    return kind, files


def _read_listing(file: Path, kind: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of a JSONL or CSV listing; each row needs "image" and "caption"."""
    rows: list[tuple[int, dict[str, Any]]] = []
    with open(file, encoding="utf-8", newline="" if kind == "csv" else None) as f:
        if kind == "jsonl":
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{file}:{number}: not valid JSON ({e}); one JSON object per line"
                    ) from None
                if not isinstance(row, dict):
                    raise ValueError(f"{file}:{number}: expected a JSON object with image and caption")
                rows.append((number, row))
        else:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
                raise ValueError(
                    f"{file}: the CSV header must name the columns image and caption, "
                    f"found {reader.fieldnames}"
                )
            for row in reader:
                rows.append((reader.line_num, {k: v for k, v in row.items() if v not in (None, "")}))
    for number, row in rows:
        if not isinstance(row.get("image"), str) or not row["image"]:
            raise ValueError(
                f"{file}:{number}: no image path (field 'image'); each row needs image and caption"
            )
        if not isinstance(row.get("caption"), str):
            raise ValueError(f"{file}:{number}: no caption (field 'caption', a string)")
    return rows


def split_member(name: str) -> tuple[str, str] | None:
    """webdataset's naming: "dir/abc.def.jpg" -> ("dir/abc", "def.jpg"); None for a name with no extension."""
    directory, _, base = name.rpartition("/")
    if "." not in base:
        return None
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _tar_keys(file: Path) -> list[str]:
    """Sample keys of a webdataset tar in order of first appearance (headers only; data is skipped)."""
    keys: dict[str, None] = {}
    try:
        with tarfile.open(file, "r:*") as tar:
            for member in tar:
                split = split_member(member.name) if member.isfile() else None
                if split:
                    keys.setdefault(split[0], None)
    except tarfile.TarError as e:
        raise ValueError(f"{file}: not a readable tar file ({e})") from e
    return list(keys)


def _parquet_rows(file: Path) -> int:
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(file).metadata
    except Exception as e:
        raise ValueError(f"{file}: not a readable parquet file ({e})") from e
    return metadata.num_rows


def input_fingerprint(files: Sequence[Path]) -> list[list[Any]]:
    """Names and sizes of the input files: a resumed build must read the same input."""
    return [[file.name, file.stat().st_size] for file in files]


def plan_shards(input_path: str | os.PathLike, shard_size: int) -> tuple[list[InputShard], list[list[Any]]]:
    """Cut the input into shards of `shard_size` pairs (the last of each file may be shorter).

    Returns the shards and the input's fingerprint. Shards never span two input files, so a shard's pairs are
    one contiguous read.
    """
    kind, files = _input_files(Path(input_path).expanduser())
    shards: list[InputShard] = []
    offset = 0
    for file in files:
        rows: list[tuple[int, dict[str, Any]]] = []
        if kind in ("jsonl", "csv"):
            rows = _read_listing(file, kind)
            count = len(rows)
        elif kind == "webdataset":
            count = len(_tar_keys(file))
        else:
            count = _parquet_rows(file)
        for start in range(0, count, shard_size):
            stop = min(start + shard_size, count)
            shards.append(
                InputShard(len(shards), kind, str(file), start, stop, offset + start, tuple(rows[start:stop]))
            )
        offset += count
    return shards, input_fingerprint(files)


def _optional_float(value: Any, where: str, name: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name} must be a number, got {value!r}") from None
    return None if math.isnan(number) else number


def _make_pair(fields: dict[str, Any], image: bytes, index: int, where: str) -> Pair:
    """A Pair from an input row's fields; key and id default to the pair's global index."""
    key = fields.get("key")
    key = f"{index:09d}" if key is None or key == "" else str(key)
    check_key(key, where)
    raw_id = fields.get("id")
    try:
        pair_id = index if raw_id is None or raw_id == "" else int(raw_id)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: id must be an integer, got {raw_id!r}") from None
    caption = fields.get("caption")
    if not isinstance(caption, str):
        raise ValueError(f"{where}: caption must be a string, got {type(caption).__name__}")
    url = fields.get("url")
    return Pair(
        key=key,
        id=pair_id,
        caption=caption,
        image=image,
        source=where,
        url=None if url is None or url == "" else str(url),
        clip_similarity_vitb32=_optional_float(
            fields.get("clip_similarity_vitb32"), where, "clip_similarity_vitb32"
        ),
        clip_similarity_vitl14=_optional_float(
            fields.get("clip_similarity_vitl14"), where, "clip_similarity_vitl14"
        ),
    )


_BAD_KEY = re.compile(r"(^/)|(^|/)\.\.?(/|$)|[\x00-\x1f\\]")


def check_key(key: str, where: str) -> None:
    """A key must work as a webdataset member name: no "." in its last part, no absolute or ".." paths."""
    if not key or "." in key.rpartition("/")[2] or _BAD_KEY.search(key):
        raise ValueError(
            f"{where}: key {key!r} cannot name webdataset members (webdataset splits a member name at the "
            "first '.' of its last path part, and keys must be relative paths); use keys without dots, or "
            "drop the key column to number the pairs"
        )


def _read_file_bytes(path: Path, where: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        # An unreadable image drops the pair like an undecodable one (counted as bad_images), not the build.
        log.warning("%s: cannot read image %s (%s); the pair is dropped", where, path, e.strerror or e)
        return b""


def read_shard(shard: InputShard) -> list[Pair]:
    """The pairs of one input shard, in input order, images as encoded bytes."""
    if shard.kind in ("jsonl", "csv"):
        base = Path(shard.path).parent
        pairs = []
        for i, (number, row) in enumerate(shard.rows):
            where = f"{shard.path}:{number}"
            image_path = Path(row["image"]).expanduser()
            image_path = image_path if image_path.is_absolute() else base / image_path
            pairs.append(_make_pair(row, _read_file_bytes(image_path, where), shard.offset + i, where))
        return pairs
    if shard.kind == "webdataset":
        return _read_webdataset_shard(shard)
    if shard.kind == "parquet":
        return _read_parquet_shard(shard)
    raise ValueError(f"unknown input kind {shard.kind!r}; one of {', '.join(INPUT_KINDS)}")


def _read_webdataset_shard(shard: InputShard) -> list[Pair]:
    """Samples [start, stop) of a webdataset tar: an image member, and the caption in .txt or in .json."""
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with tarfile.open(shard.path, "r:*") as tar:
        for member in tar:
            split = split_member(member.name) if member.isfile() else None
            if split is None:
                continue
            key, ext = split
            if key not in samples:
                if len(order) >= shard.stop:
                    break  # samples are contiguous in a webdataset tar
                samples[key] = {}
                order.append(key)
            if len(order) > shard.start:
                data = tar.extractfile(member)
                samples[key][ext] = data.read() if data else b""
    pairs = []
    for i, key in enumerate(order[shard.start : shard.stop]):
        members = samples[key]
        where = f"{shard.path}:{key}"
        fields: dict[str, Any] = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"])
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}.json: not valid JSON ({e})") from None
            if isinstance(meta, dict):
                fields.update({k: meta[k] for k in ("caption", "url", "id", "key") if k in meta})
                for name in ("clip_similarity_vitb32", "clip_similarity_vitl14"):
                    if name in meta:
                        fields[name] = meta[name]
        if "txt" in members:
            fields["caption"] = members["txt"].decode("utf-8")
        if "caption" not in fields:
            raise ValueError(f"{where}: no caption; a sample needs <key>.txt or a 'caption' in <key>.json")
        fields.setdefault("key", key)
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        if image is None:
            raise ValueError(
                f"{where}: no image member; a sample needs one of "
                + ", ".join(f"<key>.{e}" for e in IMAGE_EXTENSIONS)
            )
        pairs.append(_make_pair(fields, image, shard.offset + i, where))
    return pairs


def _read_parquet_shard(shard: InputShard) -> list[Pair]:
    """Rows [start, stop) of a parquet file with columns image (bytes, a path, or {bytes, path}) and caption.

    Only the row groups that overlap the shard are read, so a large file costs each shard its own rows only.
    """
    import pyarrow.parquet as pq

    file = pq.ParquetFile(shard.path)
    names = set(file.schema_arrow.names)
    if not {"image", "caption"} <= names:
        raise ValueError(f"{shard.path}: needs the columns image and caption, found {sorted(names)}")
    columns = [c for c in ("image", "caption", "key", "id", "url") + CLIP_COLUMNS if c in names]
    groups, group_start, first_row = [], 0, 0  # first_row: the file row where the first chosen group begins
    for g in range(file.num_row_groups):
        n = file.metadata.row_group(g).num_rows
        if group_start < shard.stop and group_start + n > shard.start:
            if not groups:
                first_row = group_start
            groups.append(g)
        group_start += n
    table = file.read_row_groups(groups, columns=columns)
    table = table.slice(shard.start - first_row, len(shard))
    base = Path(shard.path).parent
    pairs = []
    for i, row in enumerate(table.to_pylist()):
        where = f"{shard.path}:row {shard.start + i}"
        image = row.pop("image")
        if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
            image = image.get("bytes") or image.get("path")
        if isinstance(image, str):
            path = Path(image).expanduser()
            image = _read_file_bytes(path if path.is_absolute() else base / path, where)
        if not isinstance(image, (bytes, bytearray)):
            raise ValueError(
                f"{where}: image must be bytes, a path or {{bytes, path}}, got {type(image).__name__}"
            )
        pairs.append(_make_pair(row, bytes(image), shard.offset + i, where))
    return pairs


# ------------------------------------------------------------------------------------------------------------
# The step functions


def text_stage(pairs: Sequence[Pair], nlp: Any = None) -> list[CaptionParse]:
    """SPEC §9 steps 2 and 5: each caption's visible noun chunks and their referring expressions."""
    from kosmos2.data import grit_text

    return grit_text.process_captions([p.caption for p in pairs], nlp=nlp)


def load_text_pipeline(name: str | None) -> Any:
    """The spaCy pipeline of the text stage, loaded once per process."""
    from kosmos2.data import grit_text

    return grit_text.cached_pipeline(name)


def make_record(pair: Pair, parse: CaptionParse, size: tuple[int, int], kept: Sequence[Detection]) -> dict:
    """The GRIT-20M record of a pair with its surviving detections (layout: the module docstring)."""
    chunks, expressions = parse.noun_chunks, parse.ref_exps
    ordered = sorted(kept, key=lambda d: (chunks[d[0]].start, chunks[d[0]].end, -d[2], d[1]))
    noun_chunks, ref_exps = [], []
    for p, box, score in ordered:
        coords = [float(v) for v in box]
        noun_chunks.append([float(chunks[p].start), float(chunks[p].end), *coords, float(score)])
        ref_exps.append([float(expressions[p].start), float(expressions[p].end), *coords, float(score)])
    width, height = size
    return {
        "key": pair.key,
        "clip_similarity_vitb32": pair.clip_similarity_vitb32,
        "clip_similarity_vitl14": pair.clip_similarity_vitl14,
        "id": pair.id,
        "url": pair.url,
        "caption": pair.caption,
        "width": int(width),
        "height": int(height),
        "noun_chunks": noun_chunks,
        "ref_exps": ref_exps,
    }


def grounded_phrases(record: dict) -> list[list[Any]]:
    """A record's referring expressions after the containment filter, equal spans merged (SPEC §9 step 6).

    [[start, end, [[x1, y1, x2, y2, score], ...]], ...] sorted by start: what the webdataset json carries.
    """
    from kosmos2.data.grit_text import containment_filter

    rows = [(int(r[0]), int(r[1]), *r[2:7]) for r in record["ref_exps"]]
    return [[start, end, [list(box) for box in boxes]] for start, end, boxes in containment_filter(rows)]


@dataclass
class ShardOutput:
    """What the detector stage makes of a shard: records, the image file of each, and counts."""

    index: int
    records: list[dict] = field(default_factory=list)
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (extension, encoded image) per record
    counts: Counter = field(default_factory=Counter)


def _image_file(data: bytes, image: Image.Image) -> tuple[str, bytes]:
    """(extension, bytes) of the image for the tar: the input file itself if it is a plain JPEG or PNG."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(data)) as original:
            kind = original.format
            orientation = original.getexif().get(0x0112, 1)
    except Exception:
        kind, orientation = None, 1
    if kind in ("JPEG", "PNG") and orientation in (None, 1):
        return ("jpg" if kind == "JPEG" else "png"), data
    # Other formats, or a rotated JPEG (the record's size and boxes are for the upright image): re-encode.
    buffer = io.BytesIO()
    if kind == "JPEG":
        image.save(buffer, format="JPEG", quality=95)
        return "jpg", buffer.getvalue()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def detector_stage(
    index: int,
    pairs: Sequence[Pair],
    parses: Sequence[CaptionParse],
    detector: Detector,
    settings: BuildSettings,
) -> ShardOutput:
    """SPEC §9 steps 3 and 4 for one shard: detect, keep score > threshold, NMS across chunks, build records.

    Pairs with no visible noun chunk, with an unreadable image, or with no box left are dropped and counted.
    Images are decoded one detector batch at a time.
    """
    from kosmos2.image import ImageError, load_image

    out = ShardOutput(index)
    out.counts["pairs"] = len(pairs)
    todo = [(pair, parse) for pair, parse in zip(pairs, parses, strict=True) if parse.noun_chunks]
    out.counts["no_chunks"] = len(pairs) - len(todo)
    for start in range(0, len(todo), settings.batch_size):
        batch = []
        for pair, parse in todo[start : start + settings.batch_size]:
            try:
                image = load_image(pair.image)
            except ImageError as e:
                log.warning("%s: %s; the pair is dropped", pair.source, e)
                out.counts["bad_images"] += 1
                continue
            batch.append((pair, parse, image))
        if not batch:
            continue
        detections = detector.detect(
            [image for _, _, image in batch],
            [[chunk.text for chunk in parse.noun_chunks] for _, parse, _ in batch],
            keys=[pair.key for pair, _, _ in batch],
        )
        for (pair, parse, image), found in zip(batch, detections, strict=True):
            kept = select_detections(found, settings.score_threshold, settings.nms_iou)
            if not kept:
                out.counts["no_boxes"] += 1
                continue
            out.records.append(make_record(pair, parse, image.size, kept))
            out.images.append(_image_file(pair.image, image))
    out.counts["records"] = len(out.records)
    return out


def shard_names(index: int) -> tuple[str, str]:
    return f"part-{index:05d}.parquet", f"part-{index:05d}.tar"


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: equal shards are equal bytes
    tar.addfile(info, io.BytesIO(data))


def write_shard(output: str | os.PathLike, shard: ShardOutput, webdataset: bool = True) -> dict[str, Any]:
    """Write a shard's parquet (and webdataset tar) atomically; returns its manifest entry."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(output)
    parquet_name, tar_name = shard_names(shard.index)
    keys = Counter(r["key"] for r in shard.records)
    duplicates = [k for k, n in keys.items() if n > 1]
    if duplicates:
        raise ValueError(
            f"shard {shard.index}: the keys {duplicates[:5]} occur more than once; keys must be unique"
        )
    table = pa.Table.from_pylist(shard.records, schema=grit_schema())
    atomic_write(directory / parquet_name, lambda f: pq.write_table(table, f))
    files = [parquet_name]
    if webdataset:

        def write_tar(f: Any) -> None:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for record, (ext, data) in zip(shard.records, shard.images, strict=True):
                    meta = dict(record, phrases=grounded_phrases(record))
                    _tar_member(tar, f"{record['key']}.{ext}", data)
                    _tar_member(tar, f"{record['key']}.txt", record["caption"].encode("utf-8"))
                    _tar_member(
                        tar, f"{record['key']}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8")
                    )

        atomic_write(directory / tar_name, write_tar)
        files.append(tar_name)
    fsync_dir(directory)
    return {"files": files, **{k: int(v) for k, v in sorted(shard.counts.items())}}


def process_shard(shard: InputShard, settings: BuildSettings, nlp: Any, detector: Detector) -> dict[str, Any]:
    """All steps for one shard, files written; returns its manifest entry (the local engine's work unit)."""
    pairs = read_shard(shard)
    parses = text_stage(pairs, nlp)
    output = detector_stage(shard.index, pairs, parses, detector, settings)
    return write_shard(settings.output, output, settings.webdataset)


# ------------------------------------------------------------------------------------------------------------
# The manifest


def _lock(directory: Path) -> Any:
    """An open file holding an exclusive flock on <directory>/.lock (None where flock does not exist)."""
    try:
        import fcntl
    except ImportError:  # not on Windows: no protection against two builds in one folder
        return None
    handle = open(directory / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ValueError(
            f"another grit build is writing {directory} (it holds {directory / '.lock'}); wait for it to "
            "end, or write to another folder"
        ) from None
    return handle


class Manifest:
    """manifest.json of an output folder: the settings, the plan's size and the shards done, with counts.

    Rewritten atomically (temporary file, fsync, rename) after each shard, so it is always a complete JSON
    file that lists only shards whose files are complete.
    """

    def __init__(self, directory: Path, data: dict[str, Any], lock: Any = None) -> None:
        self.directory = directory
        self.data = data
        self._lock = lock  # an open file holding the folder's lock (released when closed or collected)

    @property
    def path(self) -> Path:
        return self.directory / MANIFEST

    @property
    def done(self) -> set[int]:
        return {int(k) for k in self.data["shards"]}

    @classmethod
    def open(
        cls,
        directory: Path,
        settings: dict[str, Any],
        input_files: list,
        num_shards: int,
        overwrite: bool = False,
    ) -> Manifest:
        """Load the folder's manifest (checking that it was made by the same settings) or start a new one.

        Holds an exclusive lock on <directory>/.lock while the object lives, so two builds cannot write one
        folder at once; the operating system releases it when the process ends, however it ends.
        overwrite: first delete a previous build's files there (under the lock: never a running build's).
        """
        directory.mkdir(parents=True, exist_ok=True)
        lock = _lock(directory)
        try:
            if overwrite:
                remove_build_files(directory)
            return cls._load_or_create(directory, settings, input_files, num_shards, lock)
        except BaseException:
            if lock is not None:
                lock.close()
            raise

    @classmethod
    def _load_or_create(
        cls, directory: Path, settings: dict[str, Any], input_files: list, num_shards: int, lock: Any
    ) -> Manifest:
        path = directory / MANIFEST
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e}); it was not written by grit build") from None
            if data.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"{path}: format {data.get('format')!r}, not {MANIFEST_FORMAT!r}")
            for name, now in (
                ("settings", settings),
                ("input_files", input_files),
                ("num_shards", num_shards),
            ):
                before = data.get(name)
                if before != now:
                    raise ValueError(
                        f"{directory} holds a build with other {name} ({_difference(before, now)}); "
                        "resume with the same input and options, start over with --overwrite (deletes "
                        "that build's shards), or write to a new output folder"
                    )
            return cls(directory, data, lock)
        unexpected = [p.name for p in directory.iterdir() if p.name.startswith("part-")]
        if unexpected:
            raise ValueError(
                f"{directory} holds shard files ({unexpected[:3]}...) but no {MANIFEST}; write to an "
                "empty folder, or pass --overwrite to delete them"
            )
        data = {
            "format": MANIFEST_FORMAT,
            "settings": settings,
            "input_files": input_files,
            "num_shards": num_shards,
            "complete": False,
            "shards": {},
        }
        manifest = cls(directory, data, lock)
        manifest.save()
        return manifest

    def close(self) -> None:
        """Release the folder's lock."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def commit(self, index: int, entry: dict[str, Any]) -> None:
        """Record shard `index` as done (its files are in place) and save."""
        self.data["shards"][f"{index:05d}"] = entry
        self.data["complete"] = len(self.data["shards"]) == self.data["num_shards"]
        self.save()

    def save(self) -> None:
        text = json.dumps(self.data, indent=1, sort_keys=True).encode("utf-8")
        atomic_write(self.path, lambda f: f.write(text))
        fsync_dir(self.directory)

    def totals(self) -> Counter:
        total: Counter = Counter()
        for entry in self.data["shards"].values():
            total.update({k: v for k, v in entry.items() if isinstance(v, int)})
        return total


# a shard's files, and the temporary names fileio.atomic_write gives them and the manifest
_BUILD_FILE = re.compile(r"part-\d{5}\.(parquet|tar)|\.(part-\d{5}\.(parquet|tar)|manifest\.json)\..+\.tmp")


def remove_build_files(directory: Path) -> list[str]:
    """Delete what a build writes in `directory` (shards, their temporary files, the manifest); other files
    stay. Returns the names deleted."""
    removed = []
    for path in sorted(directory.iterdir()):
        if path.is_file() and (path.name == MANIFEST or _BUILD_FILE.fullmatch(path.name)):
            path.unlink()
            removed.append(path.name)
    if removed:
        fsync_dir(directory)
        log.info(
            "grit build --overwrite: deleted %d files of the previous build in %s", len(removed), directory
        )
    return removed


def _difference(before: Any, now: Any) -> str:
    if isinstance(before, dict) and isinstance(now, dict):
        changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        return "; ".join(f"{k}: {before.get(k)!r} then, {now.get(k)!r} now" for k in changed)
    return f"{before!r} then, {now!r} now"


# ------------------------------------------------------------------------------------------------------------
# The local engine


@dataclass
class BuildSummary:
    """What a build did: the output folder, the shards run now and before, and counts over all shards."""

    output: str
    shards_total: int
    shards_run: int
    shards_skipped: int
    counts: dict[str, int]
    seconds: float

    @classmethod
    def of(
        cls, manifest: Manifest, shards: Sequence[InputShard], pending: Sequence[InputShard], began: float
    ) -> BuildSummary:
        """The summary of a build that planned `shards`, ran `pending` and began at perf_counter() `began`."""
        return cls(
            output=str(manifest.directory),
            shards_total=len(shards),
            shards_run=len(pending),
            shards_skipped=len(shards) - len(pending),
            counts=dict(manifest.totals()),
            seconds=time.perf_counter() - began,
        )


def prepare(
    settings: BuildSettings, detector_factory: Callable[[], Detector] | None = None
) -> tuple[list[InputShard], Manifest]:
    """Plan the shards and open the output's manifest (both engines start here)."""
    shards, files = plan_shards(settings.input, settings.shard_size)
    if not shards:
        raise ValueError(f"input {settings.input!r} holds no pairs")
    directory = Path(settings.output).expanduser()
    manifest = Manifest.open(
        directory, settings.fingerprint(detector_factory), files, len(shards), overwrite=settings.overwrite
    )
    for stale in directory.glob(".*.tmp"):  # left by a killed run; never named by the manifest
        stale.unlink()
    return shards, manifest


def build_detector(
    settings: BuildSettings, detector_factory: Callable[[], Detector] | None = None
) -> Detector:
    """The settings' detector (or the factory's); it returns only detections the confidence rule may keep."""
    if detector_factory is not None:
        return detector_factory()
    return make_detector(
        settings.detector,
        settings.detector_path,
        device=settings.device,
        batch_size=settings.batch_size,
        min_score=settings.score_threshold,
    )


class BuildProgress:
    """A tqdm bar over pairs (stderr), or nothing; counts of records and drops in its postfix."""

    def __init__(self, enabled: bool, total: int, initial: int, counts: Counter) -> None:
        self.counts = counts
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="pair", desc="grit build", file=sys.stderr)
            self._postfix()

    def _postfix(self) -> None:
        if self.bar is not None:
            c = self.counts
            self.bar.set_postfix(
                records=c["records"], no_chunks=c["no_chunks"], no_boxes=c["no_boxes"], bad=c["bad_images"]
            )

    def update(self, entry: dict[str, Any]) -> None:
        self.counts.update({k: v for k, v in entry.items() if isinstance(v, int)})
        if self.bar is not None:
            self.bar.update(entry["pairs"])
            self._postfix()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# Per-process state of a worker: the spaCy pipeline and the detector, loaded once by the initializer.
_worker: dict[str, Any] = {}


def end_with_parent(parent: int, poll_seconds: float = 1.0) -> None:
    """Make this worker process end when `parent` (the build process that started it) ends, however it ends.

    A pool's workers otherwise outlive a parent killed by SIGKILL (or dying without cleanup): they wait on the
    task queue forever. On Linux the kernel sends SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG); on
    every system a daemon thread also checks os.getppid() every `poll_seconds` and ends the process when it
    has been re-parented. A parent that died before this ran is noticed at once.
    """
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:
                os._exit(1)  # no cleanup: the parent, which owns the output, is gone

    threading.Thread(target=watch, name="grit-build-parent-watch", daemon=True).start()


def _init_worker(
    settings: BuildSettings,
    detector_factory: Callable[[], Detector] | None,
    threads: int,
    parent: int | None = None,
) -> None:
    if parent is not None:
        end_with_parent(parent)
    if threads and settings.detector != "precomputed":
        import torch

        torch.set_num_threads(threads)  # workers share the cores instead of each taking all of them
    _worker["settings"] = settings
    _worker["nlp"] = load_text_pipeline(settings.spacy_pipeline)
    _worker["detector"] = build_detector(settings, detector_factory)


def _run_shard(shard: InputShard) -> tuple[int, dict[str, Any]]:
    entry = process_shard(shard, _worker["settings"], _worker["nlp"], _worker["detector"])
    return shard.index, entry


def build(
    settings: BuildSettings,
    progress: bool = True,
    detector_factory: Callable[[], Detector] | None = None,
) -> BuildSummary:
    """Build GRIT records from `settings.input` into `settings.output` with `settings.workers` processes.

    Resumes a build the output's manifest records (same settings required). detector_factory: a picklable
    callable returning a Detector, used instead of `settings.detector` (custom detectors, tests).
    """
    began = time.perf_counter()
    shards, manifest = prepare(settings, detector_factory)
    pending = iter_pending(shards, manifest)
    counts = manifest.totals()
    bar = BuildProgress(
        progress, sum(map(len, shards)), sum(map(len, shards)) - sum(map(len, pending)), counts
    )
    try:
        if settings.workers == 1 or len(pending) <= 1:
            if pending:
                _init_worker(settings, detector_factory, threads=0)
            for shard in pending:
                index, entry = _run_shard(shard)
                manifest.commit(index, entry)
                bar.update(entry)
        else:
            import multiprocessing
            from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

            # spawn, not fork: the parent may hold torch or spaCy threads, which fork does not copy safely.
            context = multiprocessing.get_context("spawn")
            threads = max(1, (os.cpu_count() or 1) // settings.workers)
            with ProcessPoolExecutor(
                settings.workers, context, _init_worker, (settings, detector_factory, threads, os.getpid())
            ) as pool:
                queue = iter(pending)
                running = set()
                while True:
                    # At most two shards per worker in flight: a crash loses little, results stay small.
                    while len(running) < 2 * settings.workers:
                        shard = next(queue, None)
                        if shard is None:
                            break
                        running.add(pool.submit(_run_shard, shard))
                    if not running:
                        break
                    finished, running = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        index, entry = future.result()
                        manifest.commit(index, entry)
                        bar.update(entry)
    finally:
        bar.close()
        manifest.close()
    return BuildSummary.of(manifest, shards, pending, began)


def read_records(output: str | os.PathLike) -> list[dict]:
    """All records of a finished or partial build, in shard order (the shards the manifest lists)."""
    import pyarrow.parquet as pq

    directory = Path(output)
    data = json.loads((directory / MANIFEST).read_text())
    records: list[dict] = []
    for name in sorted(data["shards"]):
        records.extend(pq.read_table(directory / shard_names(int(name))[0]).to_pylist())
    return records


def iter_pending(shards: Iterable[InputShard], manifest: Manifest) -> list[InputShard]:
    """The shards the manifest does not list yet."""
    done = manifest.done
    return [s for s in shards if s.index not in done]
