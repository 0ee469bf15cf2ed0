"""Batched inference for evaluation, with a resumable prediction cache.

    queries ─(skip those in the cache)─► batches of B ─predictor.ground(images, prompts)─► predictions
                                                              │
                                                              └── appended to the cache (JSON Lines) per batch

The harness talks to the model only through the predictor's batched `ground` (docs/CONTRACTS.md), so any
object with this method can be evaluated (`GroundingPredictor` below):

    ground(images: list[PIL.Image], prompts: list[str], **generation) -> list[result]
        result.text:     the generated continuation, tags kept (not the prompt)
        result.caption:  prompt + continuation without markup
        result.entities: prompt + continuation parsed: objects with .phrase and .boxes (normalised
                         (x1, y1, x2, y2), in generated order); a prompt's <phrase> gets its generated boxes

Each query fixes its full prompt (the datasets' modules write them as the official evaluation does), so the
cache key is exactly what determines the output: query id + model id + prompt + generation settings. The cache
file is appended one batch at a time and flushed, so an interrupted run loses at most the batch in flight;
a torn last line (killed mid-write) is ignored and overwritten. Records for other models or prompts may share
the file: they are simply not hits.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from kosmos2.grounding import box_to_pixels, parse

Box = tuple[float, float, float, float]
T = TypeVar("T")


class GroundingPredictor(Protocol):
    """What the harness needs from a model: batched grounded generation (kosmos2.predictor.Predictor)."""

    def ground(self, images: list[Any], prompts: list[str], **generation: Any) -> list[Any]: ...


@dataclass(frozen=True)
class Query:
    """One model call: an image, the exact prompt, and a stable id (the cache key's first part).

    image: a file path (loaded with kosmos2.image.load_image when its batch runs) or an in-memory image.
    size: (width, height) of the image as annotated; predicted boxes are scaled by it, as the official scripts
    scale by the annotation's width and height.
    """

    id: str
    image: Any
    prompt: str
    size: tuple[int, int]


@dataclass(frozen=True)
class Prediction:
    """What the model produced for one query, as stored in the cache."""

    text: str  # the generated continuation, markup kept
    caption: str  # prompt + continuation without markup
    entities: tuple[tuple[str, tuple[Box, ...]], ...]  # (phrase, normalised boxes) in generated order
    # per entity, per box: the box's score (kosmos2.predictor.EntityResult.scores); None when the predictor
    # gave none (or the cache line predates scores)
    scores: tuple[tuple[float | None, ...], ...] | None = None

    def scores_for(self, phrase: str) -> list[float | None]:
        """The scores of `boxes_for(phrase)`, aligned with it (None where there is no score)."""
        wanted = " ".join(phrase.split())
        out: list[float | None] = []
        for i, (name, boxes) in enumerate(self.entities):
            if " ".join(name.split()) == wanted:
                own = self.scores[i] if self.scores is not None and i < len(self.scores) else ()
                out += [own[j] if j < len(own) else None for j in range(len(boxes))]
        return out

    def boxes_for(self, phrase: str) -> list[Box]:
        """Normalised boxes of every entity whose phrase is `phrase`, in generated order.

        Phrases are compared with whitespace collapsed (the official scripts compare stripped strings; decoded
        text may differ from the annotation in inner spacing only). Boxes on other phrases are not counted.
        """
        wanted = " ".join(phrase.split())
        return [box for name, boxes in self.entities if " ".join(name.split()) == wanted for box in boxes]

    @property
    def answer(self) -> str:
        """The generated words without markup (a region description, a caption's continuation)."""
        return parse(self.text).caption

    def pixel_boxes_for(self, phrase: str, size: tuple[int, int]) -> list[Box]:
        width, height = size
        return [box_to_pixels(box, width, height) for box in self.boxes_for(phrase)]

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "caption": self.caption,
            "entities": [
                {"phrase": p, "boxes": [list(b) for b in boxes]}
                | ({"scores": list(self.scores[i])} if self.scores is not None else {})
                for i, (p, boxes) in enumerate(self.entities)
            ],
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Prediction:
        entities = tuple(
            (str(e["phrase"]), tuple(tuple(float(v) for v in b) for b in e["boxes"]))
            for e in record["entities"]
        )
        scores = None
        if record["entities"] and all("scores" in e for e in record["entities"]):
            scores = tuple(
                tuple(None if v is None else float(v) for v in e["scores"]) for e in record["entities"]
            )
        return cls(str(record["text"]), str(record["caption"]), entities, scores)  # type: ignore[arg-type]


def prediction_from_result(result: Any) -> Prediction:
    """A Prediction from a predictor result (`.text`, `.caption`, `.entities[*].phrase/.boxes`)."""
    for name in ("text", "caption", "entities"):
        if not hasattr(result, name):
            raise TypeError(
                f"the predictor returned a {type(result).__name__} without .{name}; the evaluation needs "
                "results with .text, .caption and .entities (each with .phrase and normalised .boxes)"
            )
    entities = tuple(
        (str(e.phrase), tuple(tuple(float(v) for v in b) for b in e.boxes)) for e in result.entities
    )
    scores = None
    if result.entities and all(len(getattr(e, "scores", ()) or ()) == len(e.boxes) for e in result.entities):
        scores = tuple(tuple(None if v is None else float(v) for v in e.scores) for e in result.entities)
    return Prediction(str(result.text), str(result.caption), entities, scores)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------------
# The cache


def cache_key(query_id: str, model_id: str, prompt: str, generation: Mapping[str, Any]) -> str:
    """sha256 over the four things that determine a prediction (generation settings in sorted-key JSON)."""
    payload = json.dumps(
        [query_id, model_id, prompt, dict(sorted(generation.items()))], ensure_ascii=False, default=str
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class PredictionCache:
    """A JSON Lines file of predictions: {"key", "query_id", "model", "prompt", "generation", ...} a line."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.entries: dict[str, Prediction] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        if self.path.is_dir():
            raise IsADirectoryError(f"prediction cache {str(self.path)!r} is a directory; give a file path")
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete = lines[:-1] if not data.endswith(b"\n") else lines  # the part after the last \n may be torn
        for number, line in enumerate(complete, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self.entries[record["key"]] = Prediction.from_json(record)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f"prediction cache {str(self.path)!r}, line {number}: not a prediction record ({e}); "
                    "the file was edited or is not a kosmos2 cache: delete it (or pass another --cache) "
                    "to recompute"
                ) from e
        if not data.endswith(b"\n") and data:
            # An interrupted write left a partial last line: drop it so the next append starts a fresh line.
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __getitem__(self, key: str) -> Prediction:
        return self.entries[key]

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, records: Sequence[tuple[str, Query, str, Mapping[str, Any], Prediction]]) -> None:
        """Append (key, query, model_id, generation, prediction) records and flush them to disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for key, query, model_id, generation, prediction in records:
                line = {
                    "key": key,
                    "query_id": query.id,
                    "model": model_id,
                    "prompt": query.prompt,
                    "generation": dict(generation),
                    **prediction.to_json(),
                }
                f.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
                self.entries[key] = prediction
            f.flush()
            os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------------------
# Running


@dataclass
class RunStats:
    """How a run went: queries answered from the cache and queries sent to the model."""

    total: int = 0
    cached: int = 0
    computed: int = 0
    batches: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, int]:
        """The "run" entry of an evaluation's metrics.json."""
        return {"queries": self.total, "from_cache": self.cached, "computed": self.computed}


def run_queries(
    predictor: GroundingPredictor,
    queries: Sequence[Query],
    *,
    model_id: str,
    cache: PredictionCache | str | os.PathLike | None = None,
    batch_size: int = 8,
    generation: Mapping[str, Any] | None = None,
    progress: bool = True,
    load: Callable[[Any], Any] | None = None,
) -> tuple[dict[str, Prediction], RunStats]:
    """Predictions for every query (by query id), computing only those not already in the cache.

    predictor: anything with the batched `ground` above. model_id: names the model in cache keys (a changed
    checkpoint must get a new id). cache: a PredictionCache, a path, or None (no cache). batch_size: queries
    per model call. generation: keyword arguments passed to `ground` and made part of the cache key.
    load: turns Query.image into what the predictor takes (default: `load_stored_frame`, which reads paths and
    PIL images without applying EXIF orientation; anything else is passed through).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    seen: set[str] = set()
    for q in queries:
        if q.id in seen:
            raise ValueError(
                f"query id {q.id!r} appears twice; every query needs a unique id (the cache key)"
            )
        seen.add(q.id)
    generation = dict(generation or {})
    if cache is not None and not isinstance(cache, PredictionCache):
        cache = PredictionCache(cache)
    load = load or load_stored_frame

    out: dict[str, Prediction] = {}
    todo: list[tuple[str, Query]] = []
    for q in queries:
        key = cache_key(q.id, model_id, q.prompt, generation)
        if cache is not None and key in cache:
            out[q.id] = cache[key]
        else:
            todo.append((key, q))
    stats = RunStats(total=len(queries), cached=len(out))

    bar = _progress(len(queries), initial=len(out), enabled=progress)
    try:
        for batch in _chunks(todo, batch_size):
            # one decoded image per file in a batch: the predictor encodes an image object once for all its
            # prompts (RefCOCO and Flickr30k ask several questions about each picture)
            loaded: dict[Any, Any] = {}
            images = []
            for _, q in batch:
                key = os.fspath(q.image) if isinstance(q.image, (str, os.PathLike)) else id(q.image)
                if key not in loaded:
                    loaded[key] = load(q.image)
                images.append(loaded[key])
            results = predictor.ground(images, [q.prompt for _, q in batch], **generation)
            results = list(results)
            if len(results) != len(batch):
                raise RuntimeError(
                    f"the predictor returned {len(results)} results for a batch of {len(batch)} prompts; "
                    "ground(images, prompts) must return one result per prompt"
                )
            predictions = [prediction_from_result(r) for r in results]
            if cache is not None:
                cache.append(
                    [
                        (key, q, model_id, generation, p)
                        for (key, q), p in zip(batch, predictions, strict=True)
                    ]
                )
            for (_, q), p in zip(batch, predictions, strict=True):
                out[q.id] = p
            stats.computed += len(batch)
            stats.batches += 1
            bar.update(len(batch))
    finally:
        bar.close()
    return out, stats


def pinned_generation(
    protocol: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The protocol's decoding with `overrides` (explicit changes) applied.

    Every decoding option the protocol fixes is passed to the predictor, so a checkpoint's own
    generation_config.json (which may, say, turn n-gram blocking off or sampling on) decides nothing; the
    result is what metrics.json records as the decoding used.
    """
    return {**protocol, **{k: v for k, v in (overrides or {}).items() if v is not None}}


def generation_record(protocol: Mapping[str, Any], used: Mapping[str, Any]) -> dict[str, Any]:
    """metrics.json's account of decoding: "generation" (what was used) and, when it is not the protocol's,
    "generation_changed": {option: {"protocol": value, "used": value}}."""
    changed = {
        k: {"protocol": protocol.get(k), "used": used.get(k)}
        for k in sorted(set(protocol) | set(used))
        if protocol.get(k) != used.get(k)
    }
    return {"generation": dict(used), **({"generation_changed": changed} if changed else {})}


def describe_generation(result: Mapping[str, Any]) -> str:
    """report.md's line on decoding, from a metrics.json content with `generation_record`'s keys."""
    used = json.dumps(result.get("generation", {}), sort_keys=True)
    changed = result.get("generation_changed")
    if not changed:
        return f"Decoding: `{used}` (the protocol's)."
    changes = ", ".join(f"{k} {v['protocol']!r} → {v['used']!r}" for k, v in changed.items())
    return f"Decoding: `{used}`, **changed from the protocol's**: {changes}."


def default_cache(
    cache: PredictionCache | str | os.PathLike | None, out_dir: str | os.PathLike
) -> PredictionCache | str | os.PathLike:
    """`cache`, or out_dir/predictions.jsonl when none is given (where every evaluation keeps its cache)."""
    return cache if cache is not None else Path(out_dir) / "predictions.jsonl"


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def load_stored_frame(source: Any) -> Any:
    """A dataset image (a path or a PIL image) as stored, in RGB: EXIF orientation is not applied.

    The benchmarks annotate the stored pixels (COCO's and Flickr30k's width, height and boxes are those of
    the frame as stored) and the official pipeline ignores the tag, so an image stored 320×240 with
    orientation 6 is evaluated as 320×240, not as the 240×320 a viewer shows.
    """
    from PIL import Image

    if isinstance(source, (str, os.PathLike, Image.Image)):
        from kosmos2.image import load_image

        # a PIL image too: opened from a tagged file it still carries the tag, which the predictor would apply
        return load_image(source, exif_orientation=False)
    return source


class _Progress:
    """A one-line stderr counter, used when tqdm is not installed (or progress is off: then silent)."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, initial, enabled
        self._show()

    def update(self, n: int) -> None:
        self.done += n
        self._show()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")

    def _show(self) -> None:
        if self.enabled:
            sys.stderr.write(f"\revaluating: {self.done}/{self.total}")
            sys.stderr.flush()


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, initial=initial, desc="evaluating", unit="query", dynamic_ncols=True)
        except ImportError:
            pass
    return _Progress(total, initial, enabled)


def limit_queries(queries: Iterable[T], limit: int | None) -> list[T]:
    """The first `limit` queries (all of them for None); a quick run is a prefix of the full one.

    Works on anything listed per query (examples, samples, (id, image) pairs), so `--limit` cuts them early.
    """
    queries = list(queries)
    if limit is None:
        return queries
    if limit < 1:
        raise ValueError(f"--limit must be a positive number of queries, got {limit}")
    return queries[:limit]


def resolve_image(images_dir: str | os.PathLike, file_name: str, subdirs: Sequence[str] = ()) -> Path:
    """The image file `file_name` under `images_dir` (or under one of its `subdirs`), or a clear error."""
    root = Path(images_dir)
    tried = [root / file_name, *(root / sub / file_name for sub in subdirs)]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"image {file_name!r} not found; tried {', '.join(str(p) for p in tried)}. Point --images at the "
        "folder holding the dataset's image files"
    )
