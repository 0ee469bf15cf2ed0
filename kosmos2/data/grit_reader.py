"""The GRIT-20M reader for training: records + images -> grounded samples (SPEC §5 training crop, §9 rules).

    record (parquet row, or <key>.json of a webdataset shard) + image
      ──resize_and_crop──► short side to `size` (bicubic), centre crop size×size
      ──grounded_spans───► each ref_exps entry: score > threshold; box re-projected through the resize
                           and crop, dropped if it leaves the crop or keeps under 20% of its area; then
                           the containment filter (spans inside another go; equal spans become one
                           phrase with several boxes)
      ──prepare_sample───► grounded (about half, decided per key, seed and epoch): "<grounding>" +
                           markup; else the plain caption

The geometry follows torchvision's Resize(size) + CenterCrop(size), which the original training code used:
the long side becomes int(size * long / short) (truncated), the crop offset round((new - size) / 2). Boxes
are normalised, so the image may be stored at any scale (img2dataset's keep-ratio resizing is fine) as long
as its aspect ratio is the original's.

Sources: webdataset tars as `grit build` writes them, or as img2dataset writes GRIT-20M downloads with the
record's columns saved in <key>.json (`iter_webdataset`); GRIT-20M parquet files with the images in a
folder as <key>.jpg / .png / .webp (`iter_parquet`). `GritDataset` streams tars for a torch DataLoader,
spreading shards over distributed ranks and loader workers.

All markup goes through `kosmos2.grounding`; the containment filter is `grit_text.containment_filter`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.utils.data
from PIL import Image

from kosmos2 import grounding
from kosmos2.data.grit import split_member
from kosmos2.data.grit_text import containment_filter
from kosmos2.image import ImageError, load_image

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]

IMAGE_SIZE = 224
SCORE_THRESHOLD = 0.65  # SPEC §9: boxes with confidence > 0.65
MIN_AREA_FRACTION = 0.2  # SPEC §5: a box keeping under 20% of its area after the crop is dropped
GROUNDED_FRACTION = 0.5  # SPEC §9: roughly half the pairs are fed grounded
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class GritSample:
    """A training sample: the cropped image, the text to learn, and the phrases it grounds.

    image: RGB, size×size (feed it to `kosmos2.image.preprocess`, which leaves the size as it is). text:
    "<grounding>" + the caption with markup when `grounded`, else the plain caption. phrases: the surviving
    (char_start, char_end, [box, ...]) spans, boxes normalised to the crop (also set for plain samples).
    """

    key: str
    image: Image.Image
    text: str
    caption: str
    grounded: bool
    phrases: list[tuple[int, int, list[Box]]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------------
# Geometry


def crop_geometry(width: int, height: int, size: int = IMAGE_SIZE) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop left, crop top) of short-side resize to `size` + centre crop.

    torchvision's rule: the short side becomes `size`, the long one int(size * long / short); the crop
    starts at int(round((resized - size) / 2)) on each axis.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} has no pixels")
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    return new_w, new_h, int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))


def resize_and_crop(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """Short side to `size` with bicubic resampling, then the centre size×size crop."""
    new_w, new_h, left, top = crop_geometry(image.width, image.height, size)
    resized = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    return resized.crop((left, top, left + size, top + size))


def project_box(
    box: Sequence[float],
    width: int,
    height: int,
    size: int = IMAGE_SIZE,
    min_area_fraction: float = MIN_AREA_FRACTION,
) -> Box | None:
    """A box normalised to the original image -> normalised to the crop, or None if it is dropped.

    Dropped: a box with no area, one that leaves the crop, or one keeping less than `min_area_fraction` of its
    area inside the crop. The kept part is clipped to the crop.
    """
    new_w, new_h, left, top = crop_geometry(width, height, size)
    x1, y1, x2, y2 = (float(v) for v in box)
    # pixels of the resized image, shifted to the crop's origin
    x1, x2 = x1 * new_w - left, x2 * new_w - left
    y1, y2 = y1 * new_h - top, y2 * new_h - top
    area = (x2 - x1) * (y2 - y1)
    if not (x2 > x1 and y2 > y1) or not math.isfinite(area):
        return None
    cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(size)), min(y2, float(size))
    if cx2 <= cx1 or cy2 <= cy1:
        return None  # outside the crop
    if (cx2 - cx1) * (cy2 - cy1) < min_area_fraction * area:
        return None
    return cx1 / size, cy1 / size, cx2 / size, cy2 / size


def grounded_spans(
    record: dict[str, Any],
    width: int,
    height: int,
    size: int = IMAGE_SIZE,
    score_threshold: float = SCORE_THRESHOLD,
    min_area_fraction: float = MIN_AREA_FRACTION,
    column: str = "ref_exps",
) -> list[tuple[int, int, list[Box]]]:
    """The phrases of a record after the training rules, boxes normalised to the crop.

    record[column]: GRIT-20M entries [start, end, x1, y1, x2, y2, score]. An entry survives if its score is
    above `score_threshold` and its box survives `project_box`. Then the containment filter: spans inside
    another go, equal spans merge into one phrase with all their boxes. Two spans that overlap without one
    containing the other cannot both be marked up; the later one goes (spaCy's projective parses do not make
    them, but a record from elsewhere might).
    """
    kept = []
    for entry in record[column]:
        if len(entry) != 7:
            raise ValueError(
                f"record {record.get('key')!r}: {column} entry {entry!r} is not "
                "[start, end, x1, y1, x2, y2, score]"
            )
        if not entry[6] > score_threshold:
            continue
        box = project_box(entry[2:6], width, height, size, min_area_fraction)
        if box is not None:
            kept.append((int(entry[0]), int(entry[1]), box))
    phrases, reach = [], 0
    for start, end, boxes in containment_filter(kept):
        if start < reach:
            continue  # partial overlap with the previous phrase
        phrases.append((start, end, boxes))
        reach = end
    return phrases


def is_grounded(key: str, seed: int = 0, epoch: int = 0, fraction: float = GROUNDED_FRACTION) -> bool:
    """Whether a sample is fed grounded: a coin with P(grounded) = fraction, fixed by (seed, epoch, key).

    Per key rather than per position, so the choice does not depend on shuffling, workers or ranks; a new
    epoch draws again.
    """
    return random.Random(f"{seed}:{epoch}:{key}").random() < fraction


def prepare_sample(
    record: dict[str, Any],
    image: Image.Image,
    *,
    size: int = IMAGE_SIZE,
    score_threshold: float = SCORE_THRESHOLD,
    min_area_fraction: float = MIN_AREA_FRACTION,
    grounded_fraction: float = GROUNDED_FRACTION,
    seed: int = 0,
    epoch: int = 0,
    column: str = "ref_exps",
) -> GritSample:
    """A record and its image (RGB, any scale with the original aspect ratio) -> a training sample.

    A sample chosen to be grounded whose phrases all fall out (score, crop) is fed plain. Raises ValueError
    for a caption containing markup tokens (it would be read as tags).
    """
    caption = record["caption"]
    phrases = grounded_spans(
        record, image.width, image.height, size, score_threshold, min_area_fraction, column
    )
    key = str(record["key"])
    grounded = bool(phrases) and is_grounded(key, seed, epoch, grounded_fraction)
    if grounded:
        text = grounding.GROUNDING + grounding.markup(caption, phrases)
    else:
        grounding.markup(caption, [])  # the same check for markup tokens in a plain caption
        text = caption
    return GritSample(key, resize_and_crop(image, size), text, caption, grounded, phrases)


# ------------------------------------------------------------------------------------------------------------
# Sources


def iter_webdataset(path: str | os.PathLike) -> Iterator[tuple[dict[str, Any], bytes]]:
    """(record, encoded image) of each sample of a webdataset tar whose <key>.json holds the GRIT columns.

    The caption comes from the json, else from <key>.txt; the key from the json, else the member name. Samples
    without an image or without noun_chunks/ref_exps are skipped with a warning.
    """

    def finish(key: str, members: dict[str, bytes]) -> tuple[dict[str, Any], bytes] | None:
        where = f"{path}:{key}"
        if "json" not in members:
            log.warning("%s: no <key>.json with the GRIT record; skipped", where)
            return None
        record = json.loads(members["json"])
        if "caption" not in record and "txt" in members:
            record["caption"] = members["txt"].decode("utf-8")
        record.setdefault("key", key)
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        missing = [c for c in ("caption", "ref_exps", "noun_chunks") if c not in record]
        if image is None or missing:
            log.warning("%s: no image or no %s; skipped", where, missing or "image")
            return None
        return record, image

    current, members = None, {}
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            split = split_member(member.name) if member.isfile() else None
            if split is None:
                continue
            key, ext = split
            if key != current:
                if current is not None and (sample := finish(current, members)):
                    yield sample
                current, members = key, {}
            data = tar.extractfile(member)
            members[ext] = data.read() if data else b""
    if current is not None and (sample := finish(current, members)):
        yield sample


def iter_parquet(
    path: str | os.PathLike, image_root: str | os.PathLike
) -> Iterator[tuple[dict[str, Any], bytes]]:
    """(record, encoded image) of each row of a GRIT-20M parquet file whose image is <image_root>/<key>.<ext>.

    Rows whose image file is missing are skipped with a warning (downloads of GRIT-20M always miss some).
    """
    import pyarrow.parquet as pq

    root = Path(image_root)
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            candidates = [root / f"{record['key']}.{ext}" for ext in IMAGE_EXTENSIONS]
            file = next((c for c in candidates if c.is_file()), None)
            if file is None:
                log.warning("%s: no image for key %s in %s; skipped", path, record["key"], root)
                continue
            yield record, file.read_bytes()


def assign_shards(
    paths: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int
) -> list[str]:
    """The shards one loader worker of one rank reads: every (world_size · num_workers)-th, interleaved."""
    slot, slots = rank * num_workers + worker, world_size * num_workers
    return list(paths[slot::slots])


class GritDataset(torch.utils.data.IterableDataset):
    """Stream GritSamples from webdataset tars for a torch DataLoader.

    paths: tar files. Each (rank, loader worker) reads its own shards (`assign_shards`); with
    shuffle_shards, the shard order is shuffled per epoch (call `set_epoch` like a DistributedSampler), which
    also redraws the grounded/plain choice. Samples with an undecodable image or markup in the caption are
    skipped with a warning. The other options are those of `prepare_sample`.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        size: int = IMAGE_SIZE,
        score_threshold: float = SCORE_THRESHOLD,
        min_area_fraction: float = MIN_AREA_FRACTION,
        grounded_fraction: float = GROUNDED_FRACTION,
        seed: int = 0,
        shuffle_shards: bool = True,
        column: str = "ref_exps",
    ) -> None:
        super().__init__()
        self.paths = [str(p) for p in paths]
        if not self.paths:
            raise ValueError("GritDataset needs at least one webdataset tar")
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"GRIT shards not found: {missing[:5]}")
        self.options = dict(
            size=size,
            score_threshold=score_threshold,
            min_area_fraction=min_area_fraction,
            grounded_fraction=grounded_fraction,
            seed=seed,
            column=column,
        )
        self.seed = seed
        self.shuffle_shards = shuffle_shards
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_shards(self) -> list[str]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            rank, world = 0, 1
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        paths = list(self.paths)
        if self.shuffle_shards:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(paths)
        return assign_shards(paths, rank, world, worker, workers)

    def __iter__(self) -> Iterator[GritSample]:
        for path in self._my_shards():
            for record, data in iter_webdataset(path):
                try:
                    image = load_image(io.BytesIO(data))
                    yield prepare_sample(record, image, epoch=self.epoch, **self.options)
                except (ImageError, ValueError) as e:
                    log.warning("%s:%s: %s; skipped", path, record.get("key"), e)
