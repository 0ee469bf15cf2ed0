"""The grounding detector of GRIT construction (SPEC §9, steps 3 and 4) behind one small interface.

    Detector.detect(images, phrases_per_image, keys) -> per image [(phrase index, box, score), ...]
        box: (x1, y1, x2, y2) normalised to the image's width and height; score: a confidence in [0, 1]

Three detectors:

- `GroundingDinoDetector(model_dir)`: Grounding DINO through transformers. All phrases of an image go into one
  prompt, "phrase one. phrase two." (lower case, the model's training format); each of the model's queries is
  given to the phrase whose tokens it matches best, and its score is its best token probability within that
  phrase (GLIP's phrase-grounding rule, which is what the paper's GLIP did). Phrases that do not fit the text
  encoder's `max_text_len` tokens go into further prompts for the same image.
- `Owlv2Detector(model_dir)`: OWLv2 through transformers. The phrases are the image's text queries; each
  predicted box goes to its best query with that query's probability (transformers' own post-processing rule).
  OWLv2 pads an image to a square before resizing, so its boxes are relative to the square; they are rescaled
  here.
- `PrecomputedDetections(path)`: detections read from a JSONL file, one line per image (format below), for
  detections made elsewhere (a GPU cluster, another detector, a cache).

This module is the one place where the package uses transformers at run time (the `grit` feature); it is
imported only when a model detector is built. The models are read from a local directory (`save_pretrained`
layout with the processor files); nothing is downloaded.

Then `select_detections` applies step 4: the confidence rule (score > 0.65) and class-agnostic non-maximum
suppression across all chunks of a caption (IoU > 0.5 suppresses, by default; the paper publishes no value).
"""

from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image

Box = tuple[float, float, float, float]
Detection = tuple[int, Box, float]  # (phrase index, normalised box, score)

DEFAULT_SCORE_THRESHOLD = 0.65  # SPEC §9: keep pairs with confidence > 0.65
# Class-agnostic NMS across chunks: the paper removes boxes that overlap a better box "even if they are for
# different noun chunks" and publishes no threshold. 0.5 is the usual detection value; with it a box that is
# more than half shared with a better box of another chunk goes (two chunks naming one object keep one box).
DEFAULT_NMS_IOU = 0.5


# ------------------------------------------------------------------------------------------------------------
# Step 4: the confidence rule and non-maximum suppression


def box_iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of every box in `boxes` [N, 4] with every box in `others` [M, 4] (x1, y1, x2, y2) -> [N, M].

    Empty boxes have zero area (IoU 0 with everything). IoU does not change when x and y are scaled by
    different factors, so normalised and pixel coordinates give the same value.
    """
    a = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(others, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)  # [N]
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # [M]
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h  # [N, M]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = DEFAULT_NMS_IOU) -> np.ndarray:
    """Greedy non-maximum suppression; returns the indices kept, best score first.

    boxes [N, 4] (x1, y1, x2, y2), scores [N]. A box is dropped when its IoU with a kept, better-scored box is
    greater than `iou_threshold` (torchvision's rule). Equal scores keep the input order (a stable sort), so
    the result does not depend on the platform's sort.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"nms: {len(boxes)} boxes but {len(scores)} scores; give one score per box")
    order = np.argsort(-scores, kind="stable")
    overlaps = box_iou(boxes[order], boxes[order])  # [N, N] in score order
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(order[i])
        suppressed[i + 1 :] |= overlaps[i, i + 1 :] > iou_threshold
    return np.asarray(keep, dtype=np.int64)


def select_detections(
    detections: Sequence[Detection],
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    nms_iou: float = DEFAULT_NMS_IOU,
) -> list[Detection]:
    """SPEC §9 step 4 for one image: keep detections scoring > `score_threshold`, then class-agnostic NMS.

    Thresholding first gives the same result as NMS first: greedy NMS only lets a better box suppress a worse
    one, so a box above the threshold is only ever suppressed by another box above it. Boxes with no area are
    dropped. Returns the survivors in the order of the input (the record builder sorts them itself).
    """
    candidates = [
        (i, d)
        for i, d in enumerate(detections)
        if d[2] > score_threshold and d[1][2] > d[1][0] and d[1][3] > d[1][1]
    ]
    if not candidates:
        return []
    boxes = np.array([d[1] for _, d in candidates], dtype=np.float64)
    scores = np.array([d[2] for _, d in candidates], dtype=np.float64)
    kept = sorted(int(k) for k in nms(boxes, scores, nms_iou))
    return [candidates[k][1] for k in kept]


# ------------------------------------------------------------------------------------------------------------
# The interface


class Detector(ABC):
    """Proposes boxes for phrases: `detect(images, phrases_per_image, keys)`.

    images: RGB PIL images; phrases_per_image[i]: the phrases (noun chunks) of image i; keys[i]: the sample
    key of image i (only `PrecomputedDetections` needs it). Returns, for each image, its detections
    (phrase index into phrases_per_image[i], box normalised to that image, score in [0, 1]), unfiltered apart
    from the detector's own `min_score`.
    """

    name: str = "detector"

    @abstractmethod
    def detect(
        self,
        images: Sequence[Image.Image],
        phrases_per_image: Sequence[Sequence[str]],
        keys: Sequence[str] | None = None,
    ) -> list[list[Detection]]: ...

    def describe(self) -> dict[str, Any]:
        """What identifies this detector's output, for the build manifest (a resumed build must match)."""
        return {"name": self.name}


def _check_batch(images: Sequence[Any], phrases_per_image: Sequence[Sequence[str]]) -> None:
    if len(images) != len(phrases_per_image):
        raise ValueError(
            f"detect: {len(images)} images but {len(phrases_per_image)} phrase lists; give one list per image"
        )
    for i, phrases in enumerate(phrases_per_image):
        if isinstance(phrases, str):
            raise ValueError(f"detect: phrases_per_image[{i}] is a string; give a list of phrases per image")


def _clip_box(x1: float, y1: float, x2: float, y2: float) -> Box:
    """A box clipped to the image, [0, 1] on both axes (models predict slightly outside it at the borders)."""
    return (min(max(x1, 0.0), 1.0), min(max(y1, 0.0), 1.0), min(max(x2, 0.0), 1.0), min(max(y2, 0.0), 1.0))


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "Model detectors run through transformers, which is not installed. Install the GRIT extra "
            "(pip install 'kosmos2[grit]', with -c constraints.txt for the pinned versions), or use "
            "precomputed detections (--detector precomputed --detections FILE)."
        ) from e
    return transformers


def _check_model_dir(model_dir: str | os.PathLike, model_types: tuple[str, ...], what: str) -> Path:
    """The model directory, checked: it exists, has config.json, and the config is of one of `model_types`."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what} model directory {str(path)!r} does not exist; pass a local directory saved with "
            "save_pretrained (model and processor files); models are not downloaded"
        )
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no config.json; a {what} directory holds the model (config.json, "
            "model.safetensors) and its processor files, as save_pretrained writes them"
        )
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in model_types:
        raise ValueError(
            f"{str(path)!r} holds a {model_type!r} model, not {what} "
            f"(model_type {' or '.join(model_types)}); pick the detector that matches the directory"
        )
    return path


class _TransformersDetector(Detector):
    """A detection model read from a local directory and run through transformers (the options are
    `GroundingDinoDetector`'s). A subclass names the config.json `model_types` it reads, its `title` for
    messages and the transformers `model_class` that loads it.
    """

    model_types: tuple[str, ...] = ()
    title: str = "detector"
    model_class: str = ""

    def __init__(
        self, model_dir: str | os.PathLike, device: str = "cpu", batch_size: int = 4, min_score: float = 0.0
    ) -> None:
        path = _check_model_dir(model_dir, self.model_types, self.title)
        transformers = _import_transformers()
        self.model_dir = str(path)
        self.processor = transformers.AutoProcessor.from_pretrained(path)
        self.model = getattr(transformers, self.model_class).from_pretrained(path).to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.min_score = min_score

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model_dir": self.model_dir, "min_score": self.min_score}

    def _forward(self, inputs: Any) -> Any:
        """The model's outputs for a processor batch `inputs` (tensors moved to the device), no autograd."""
        import torch

        with torch.no_grad():
            return self.model(**{k: v.to(self.device) for k, v in inputs.items()})


def _above(
    phrase: torch.Tensor, corners: torch.Tensor, scores: torch.Tensor, min_score: float
) -> list[Detection]:
    """(phrase index, box clipped to the image, score) of each prediction scoring above `min_score`.

    phrase [N]: each prediction's phrase index; corners [N, 4]: its normalised (x1, y1, x2, y2); scores [N].
    """
    import torch

    out = []
    for n in torch.nonzero(scores > min_score).flatten().tolist():
        out.append((int(phrase[n]), _clip_box(*corners[n].tolist()), float(scores[n])))
    return out


# ------------------------------------------------------------------------------------------------------------
# Grounding DINO


def grounding_dino_prompt(phrases: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """The Grounding DINO prompt for phrases and each phrase's character span in it.

    ["A dog", "the red ball"] -> "a dog. the red ball.", [(0, 5), (7, 19)]. Lower case and ". " separators are
    the model's training format (what transformers' processor builds too); a "." inside a phrase would split
    it in the model's text attention, so it becomes a space.
    """
    parts, spans, cursor = [], [], 0
    for phrase in phrases:
        text = " ".join(phrase.replace(".", " ").lower().split())
        spans.append((cursor, cursor + len(text)))
        parts.append(text)
        cursor += len(text) + 2  # ". "
    return ". ".join(parts) + ".", spans


def grounding_dino_postprocess(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    token_phrase: torch.Tensor,
    num_phrases: int,
    min_score: float = 0.0,
) -> list[Detection]:
    """Detections of one image from Grounding DINO's outputs.

    logits [Q, T]: query-token logits (T = the model's max_text_len; -inf past the text); boxes [Q, 4]:
    (cx, cy, w, h) normalised to the image; token_phrase [T]: the phrase index of each token, -1 for tokens of
    no phrase (special tokens, the "." separators, padding). Each query goes to the phrase holding its most
    probable token; its score is that probability (sigmoid of the logit). Queries scoring <= min_score are
    left out.
    """
    import torch

    probs = logits.float().sigmoid()  # [Q, T]
    phrase_of_token = token_phrase.to(probs.device)
    # per_phrase[q, p] = max over the tokens of phrase p of probs[q, token]; phrases with no token stay at -1.
    per_phrase = torch.full((probs.shape[0], num_phrases), -1.0, device=probs.device)
    in_phrase = phrase_of_token >= 0
    if in_phrase.any():
        index = phrase_of_token[in_phrase].expand(probs.shape[0], -1)  # [Q, T']
        per_phrase = per_phrase.scatter_reduce(1, index, probs[:, in_phrase], reduce="amax")
    scores, phrase = per_phrase.max(dim=1)  # [Q]
    cx, cy, w, h = boxes.float().unbind(-1)
    corners = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)  # [Q, 4]
    return _above(phrase, corners, scores, min_score)


class GroundingDinoDetector(_TransformersDetector):
    """Grounding DINO (`GroundingDinoForObjectDetection`) from a local directory, through transformers.

    model_dir: save_pretrained output of the model and its processor. device: "cpu", "cuda", "cuda:1"...
    batch_size: images per forward pass. min_score: detections scoring at or below it are not returned (the
    pipeline passes its confidence threshold, so nothing it would keep is lost).
    """

    name = "grounding-dino"
    model_types = ("grounding-dino",)
    title = "Grounding DINO"
    model_class = "GroundingDinoForObjectDetection"

    def __init__(
        self, model_dir: str | os.PathLike, device: str = "cpu", batch_size: int = 4, min_score: float = 0.0
    ) -> None:
        super().__init__(model_dir, device, batch_size, min_score)
        self.max_text_len = int(self.model.config.max_text_len)

    def _groups(self, phrases: Sequence[str]) -> list[list[int]]:
        """Phrase indices split into prompts that fit `max_text_len` tokens ([CLS] and [SEP] included)."""
        tokenizer = self.processor.tokenizer
        groups: list[list[int]] = [[]]
        used = 2  # [CLS] ... [SEP]
        for i, phrase in enumerate(phrases):
            prompt, _ = grounding_dino_prompt([phrase])
            n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])  # the phrase and its "."
            if groups[-1] and used + n > self.max_text_len:
                groups.append([])
                used = 2
            groups[-1].append(i)
            used += n
        return groups

    def detect(
        self,
        images: Sequence[Image.Image],
        phrases_per_image: Sequence[Sequence[str]],
        keys: Sequence[str] | None = None,
    ) -> list[list[Detection]]:
        import torch

        _check_batch(images, phrases_per_image)
        # One job per (image, prompt): an image whose phrases need several prompts is run once per prompt.
        jobs = [
            (i, group)
            for i, phrases in enumerate(phrases_per_image)
            if phrases
            for group in self._groups(phrases)
        ]
        results: list[list[Detection]] = [[] for _ in images]
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start : start + self.batch_size]
            built = [grounding_dino_prompt([phrases_per_image[i][p] for p in g]) for i, g in batch]
            prompts, spans = [p for p, _ in built], [s for _, s in built]
            inputs = self.processor(
                images=[images[i] for i, _ in batch], text=prompts, return_tensors="pt", padding=True
            )
            encoding = self.processor.tokenizer(
                list(prompts), padding=True, return_offsets_mapping=True, return_tensors="pt"
            )
            if not torch.equal(encoding["input_ids"], inputs["input_ids"]):  # offsets must describe these ids
                raise RuntimeError(
                    f"{self.model_dir}: the processor tokenised the prompts unlike its tokenizer"
                )
            outputs = self._forward(inputs)
            for b, (i, group) in enumerate(batch):
                token_phrase = self._token_phrase(
                    encoding["offset_mapping"][b], inputs["input_ids"][b], spans[b], outputs.logits.shape[-1]
                )
                found = grounding_dino_postprocess(
                    outputs.logits[b], outputs.pred_boxes[b], token_phrase, len(group), self.min_score
                )
                results[i].extend((group[p], box, score) for p, box, score in found)
        return results

    def _token_phrase(
        self,
        offsets: torch.Tensor,
        input_ids: torch.Tensor,
        spans: Sequence[tuple[int, int]],
        length: int,
    ) -> torch.Tensor:
        """[length] phrase index of each token (-1: none), from the tokenizer's character offsets."""
        import torch

        token_phrase = torch.full((length,), -1, dtype=torch.long)
        tokenizer = self.processor.tokenizer
        specials = set(tokenizer.all_special_ids)
        for t, (a, b) in enumerate(offsets.tolist()[:length]):
            if b <= a or int(input_ids[t]) in specials:
                continue  # special tokens and padding have empty offsets
            for p, (s, e) in enumerate(spans):
                if s <= a and b <= e:
                    token_phrase[t] = p
                    break
        return token_phrase


# ------------------------------------------------------------------------------------------------------------
# OWLv2


def owlv2_postprocess(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    width: int,
    height: int,
    num_phrases: int,
    min_score: float = 0.0,
) -> list[Detection]:
    """Detections of one image from OWLv2's outputs.

    logits [N, Q]: box-query logits (N predicted boxes, Q >= num_phrases queries; queries past num_phrases are
    batch padding and ignored); boxes [N, 4]: (cx, cy, w, h) normalised to the padded square image. Each box
    goes to its best query with that query's probability. The square has side max(width, height), the image
    at its top left, so x is rescaled by side / width and y by side / height.
    """
    import torch

    probs = logits[:, :num_phrases].float().sigmoid()  # [N, P]
    scores, phrase = probs.max(dim=1)  # [N]
    cx, cy, w, h = boxes.float().unbind(-1)
    side = float(max(width, height))
    sx, sy = side / width, side / height
    corners = torch.stack(
        [(cx - 0.5 * w) * sx, (cy - 0.5 * h) * sy, (cx + 0.5 * w) * sx, (cy + 0.5 * h) * sy], -1
    )  # [N, 4]
    return _above(phrase, corners, scores, min_score)


class Owlv2Detector(_TransformersDetector):
    """OWLv2 (`Owlv2ForObjectDetection`) from a local directory, through transformers.

    model_dir: save_pretrained output of the model and its processor. Same options as `GroundingDinoDetector`.
    Queries longer than the text encoder's context (16 tokens for the released models) are truncated.
    """

    name = "owlv2"
    model_types = ("owlv2",)
    title = "OWLv2"
    model_class = "Owlv2ForObjectDetection"

    def detect(
        self,
        images: Sequence[Image.Image],
        phrases_per_image: Sequence[Sequence[str]],
        keys: Sequence[str] | None = None,
    ) -> list[list[Detection]]:

        _check_batch(images, phrases_per_image)
        todo = [i for i, phrases in enumerate(phrases_per_image) if phrases]
        results: list[list[Detection]] = [[] for _ in images]
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            inputs = self.processor(
                text=[list(phrases_per_image[i]) for i in batch],
                images=[images[i] for i in batch],
                return_tensors="pt",
                padding="max_length",
                truncation=True,
            )
            outputs = self._forward(inputs)
            for b, i in enumerate(batch):
                width, height = images[i].size
                results[i] = owlv2_postprocess(
                    outputs.logits[b],
                    outputs.pred_boxes[b],
                    width,
                    height,
                    len(phrases_per_image[i]),
                    self.min_score,
                )
        return results


# ------------------------------------------------------------------------------------------------------------
# Precomputed detections


class PrecomputedDetections(Detector):
    """Detections read from a JSONL file, one line per image:

        {"key": "000000042", "detections": [{"phrase": "a dog", "box": [x1, y1, x2, y2], "score": 0.91}, ...]}

    box: normalised to the image (x by width, y by height). A detection names its phrase by text ("phrase",
    matched to the first of the image's phrases with that text, ignoring case and outer spaces) or by position
    ("phrase_index", into the image's noun chunks in caption order). Detections whose phrase is not among the
    image's phrases are ignored (they may come from another chunker); an image with no line has no detections.
    """

    name = "precomputed"

    def __init__(self, path: str | os.PathLike, min_score: float = 0.0) -> None:
        self.path = str(Path(path).expanduser())
        self.min_score = min_score
        if not os.path.isfile(self.path):
            raise FileNotFoundError(
                f"precomputed detections file {self.path!r} does not exist; pass a JSONL file with one "
                '{"key": ..., "detections": [...]} line per image'
            )
        self.by_key: dict[str, list[dict[str, Any]]] = {}
        with open(self.path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    key, detections = self._parse_line(line, number)
                    self.by_key.setdefault(key, []).extend(detections)

    def describe(self) -> dict[str, Any]:
        stat = os.stat(self.path)
        return {"name": self.name, "path": self.path, "size": stat.st_size, "min_score": self.min_score}

    def _parse_line(self, line: str, number: int) -> tuple[str, list[dict[str, Any]]]:
        where = f"{self.path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e}); each line must be one JSON object") from None
        if not isinstance(row, dict) or "key" not in row or not isinstance(row.get("detections"), list):
            raise ValueError(
                f'{where}: expected {{"key": str, "detections": [...]}}, got {line.strip()[:200]!r}'
            )
        checked = []
        for j, d in enumerate(row["detections"]):
            what = f"{where}: detection {j}"
            if not isinstance(d, dict) or ("phrase" not in d and "phrase_index" not in d):
                raise ValueError(f'{what}: needs "phrase" (text) or "phrase_index", "box" and "score"')
            box, score = d.get("box"), d.get("score")
            if (
                not isinstance(box, list)
                or len(box) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
            ):
                raise ValueError(
                    f"{what}: box must be 4 numbers [x1, y1, x2, y2] normalised to [0, 1], got {box!r}"
                )
            if not all(-0.01 <= v <= 1.01 for v in box):
                raise ValueError(
                    f"{what}: box {box} is not normalised to [0, 1]; divide x by width, y by height"
                )
            if not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
                raise ValueError(f"{what}: score must be a number in [0, 1], got {score!r}")
            phrase_index = d.get("phrase_index")
            if phrase_index is not None and (not isinstance(phrase_index, int) or phrase_index < 0):
                raise ValueError(f"{what}: phrase_index must be a non-negative int, got {phrase_index!r}")
            phrase = d.get("phrase")
            checked.append(
                {
                    "phrase": None if phrase is None else " ".join(str(phrase).lower().split()),
                    "phrase_index": phrase_index,
                    "box": _clip_box(*(float(v) for v in box)),
                    "score": float(score),
                }
            )
        return str(row["key"]), checked

    def detect(
        self,
        images: Sequence[Image.Image],
        phrases_per_image: Sequence[Sequence[str]],
        keys: Sequence[str] | None = None,
    ) -> list[list[Detection]]:
        _check_batch(images, phrases_per_image)
        if keys is None or len(keys) != len(images):
            raise ValueError("PrecomputedDetections.detect needs the key of every image (keys=...)")
        results = []
        for key, phrases in zip(keys, phrases_per_image, strict=True):
            first_index: dict[str, int] = {}
            for p, phrase in enumerate(phrases):
                first_index.setdefault(" ".join(phrase.lower().split()), p)
            found = []
            for d in self.by_key.get(str(key), []):
                p = d["phrase_index"] if d["phrase_index"] is not None else first_index.get(d["phrase"], -1)
                if 0 <= p < len(phrases) and d["score"] > self.min_score:
                    found.append((p, d["box"], d["score"]))
            results.append(found)
        return results


# ------------------------------------------------------------------------------------------------------------
# Construction from a name (the CLI and the build engines)

DETECTORS = ("grounding-dino", "owlv2", "precomputed")


def make_detector(
    kind: str, path: str | os.PathLike, device: str = "cpu", batch_size: int = 4, min_score: float = 0.0
) -> Detector:
    """A detector by name: "grounding-dino", "owlv2" (path: model directory), "precomputed" (path: JSONL)."""
    if kind == "grounding-dino":
        return GroundingDinoDetector(path, device=device, batch_size=batch_size, min_score=min_score)
    if kind == "owlv2":
        return Owlv2Detector(path, device=device, batch_size=batch_size, min_score=min_score)
    if kind == "precomputed":
        return PrecomputedDetections(path, min_score=min_score)
    raise ValueError(f"unknown detector {kind!r}; choose one of {', '.join(DETECTORS)}")
