"""The one inference API: `Predictor` turns images and prompts into grounded text with pixel boxes.

    p = Predictor.from_pretrained()                     # the built-in default model (or a checkpoint dir)
    r = p.ground("photo.jpg")                           # "<grounding>An image of" -> GroundingResult
    r.caption, [(e.phrase, e.pixel_boxes) for e in r.entities]
    p.locate("photo.jpg", "the red ball")               # REC: the first generated box is the answer
    p.describe_region("photo.jpg", (10, 20, 200, 180))  # box in (pixels; units="normalized" for [0, 1])

Every task of SPEC §1 is a prompt plus decoding settings; all go through `ground`, which batches lists
(left padding, one image encoding per image) and parses the output with `kosmos2.grounding`. The CLI, the
server, the demo and the evaluation all call this class.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kosmos2 import grounding, verify
from kosmos2.errors import UnsupportedTaskError, UsageError, UserError
from kosmos2.generate import (
    GenerationConfig,
    encode_images,
    generate,
    location_candidates,
    prefill,
    stream,
    token_logprobs,
)
from kosmos2.image import image_size, load_image, preprocess

DEFAULT_MODEL_ENV = "KOSMOS2_MODEL"  # a checkpoint directory to use when none is given

# prompts of SPEC §1
PROMPT_BRIEF = "<grounding>An image of"
PROMPT_DETAILED = "<grounding>Describe this image in detail:"
PROMPT_PLAIN = "An image of"

# The tasks of SPEC §1 by name. A model folder states the ones its model was trained for in
# generation_config.json, `"kosmos2_tasks": [...]` (transformers keeps unknown keys there); a model that does
# not say (the official weights) is taken to know them all. The task helpers refuse the others.
TASKS = (
    "grounded_caption",  # <grounding>An image of
    "detailed_caption",  # <grounding>Describe this image in detail:
    "caption",  # An image of (plain, beam 5)
    "rec",  # <grounding><phrase>{expression}</phrase>
    "phrase_grounding",  # <grounding>{caption before it} <phrase>{phrase}</phrase>
    "reg",  # <phrase> It</phrase><object>{box}</object> is
    "grounded_vqa",  # <grounding> Question: {q} Answer:
    "vqa",  # Question: {q} Answer:
)
# REC prompts with no fitting object (answered `</s>`) or two (both boxes in one `<object>`): a model trained
# on them says so in kosmos2_tasks, and `locate` then reads "not found" and "another one" from its REC answer
QUERY_TASKS = ("rec_absent", "rec_ambiguous")
TASKS_KEY = "kosmos2_tasks"
BOX_UNITS = ("pixels", "normalized")  # describe_region's units

# `locate`'s decisions (docs/TRUST.md): fitted for the built-in default model on the synthetic world's
# calibration split, 500 queries of each kind (`kosmos2 eval synthetic --trust`, best balanced accuracy);
# recalibrate for another checkpoint and set `predictor.found_threshold` / `ambiguous_threshold`.
MATCH_THRESHOLD = 0.2713  # found when the best candidate's match >= this
SECOND_MATCH_THRESHOLD = 0.4671  # ambiguous when found and the second best's match >= this
FOUND_THRESHOLD = 0.162  # found when found_score >= this
AMBIGUOUS_THRESHOLD = 0.099  # ambiguous when found and ambiguity_score >= this
# the threshold of each signal locate may decide by; a predictor's found_threshold / ambiguous_threshold
# override them. "object" / "another" (models trained on absent / ambiguous queries) have none fitted of
# their own: they share the found / ambiguous thresholds of the question signals
THRESHOLDS = {
    "exists": FOUND_THRESHOLD,
    "object": FOUND_THRESHOLD,
    "second_ratio": AMBIGUOUS_THRESHOLD,
    "another": AMBIGUOUS_THRESHOLD,
    "match": MATCH_THRESHOLD,
    "second_match": SECOND_MATCH_THRESHOLD,
}
CANDIDATE_BEAMS = 16  # upper-left cells tried by the candidate search (at least 2 x candidates)
CANDIDATE_IOU = 0.5  # candidates overlapping a better one this much are the same object
ZOOM_MARGIN = 1.0  # crop margin on each side, a fraction of the box's width / height (docs/TRUST.md)


def default_model_dir() -> Path:
    """The model used when no path is given: $KOSMOS2_MODEL, else the one shipped in the package."""
    env = os.environ.get(DEFAULT_MODEL_ENV)
    return Path(env) if env else Path(__file__).parent / "assets" / "default"


def generation_defaults(directory: Path, tokenizer) -> GenerationConfig:
    """Decoding defaults: the official settings (SPEC §8), overridden by the checkpoint's
    `generation_config.json` for the options `GenerationConfig` knows (as transformers' `generate` does)."""
    known = {f for f in GenerationConfig.__dataclass_fields__} - {"eos_token_id", "pad_token_id", "seed"}
    path = directory / "generation_config.json"
    given = _read_json(path)
    if not isinstance(given, dict):
        raise ValueError(f"{path}: expected a JSON object of generation settings")
    options = {k: v for k, v in given.items() if k in known}
    base = GenerationConfig(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return GenerationConfig.from_kwargs(base, **options)


def model_tasks(directory: Path) -> frozenset[str] | None:
    """The tasks a model folder says its model was trained for (`kosmos2_tasks` in generation_config.json),
    or None when it does not say."""
    path = directory / "generation_config.json"
    given = _read_json(path)
    if not isinstance(given, dict) or TASKS_KEY not in given:
        return None
    tasks = given[TASKS_KEY]
    names = TASKS + QUERY_TASKS
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t in names for t in tasks):
        raise ValueError(
            f"{path}: {TASKS_KEY} must be a list of task names from {list(names)}, got {tasks!r}"
        )
    return frozenset(tasks)


def _read_json(path: Path) -> Any:
    """The JSON in `path` ({} when there is no file), or a ValueError naming the file."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


@dataclass
class EntityResult:
    """A phrase of the output and its boxes: normalised (x1, y1, x2, y2) and in original-image pixels."""

    phrase: str
    span: tuple[int, int]  # character span of the phrase in the result's caption
    boxes: list[grounding.Box]
    pixel_boxes: list[grounding.Box]
    # per box: the geometric mean of p(upper-left token) and p(lower-right token | upper-left), the model's
    # own probabilities of the two location tokens it wrote; None for a box the prompt gave (docs/TRUST.md)
    scores: list[float | None] = field(default_factory=list)
    # exp(mean log p) of the phrase's tokens when the model wrote the phrase; None when the prompt did
    phrase_score: float | None = None


@dataclass
class GroundingResult:
    """What one (image, prompt) gives.

    text: the generated continuation, markup kept. caption / entities: the prompt text plus the continuation,
    parsed (SPEC §4): the caption with every tag removed, each entity's span indexing it.
    """

    prompt: str
    text: str
    caption: str
    entities: list[EntityResult]
    image_size: tuple[int, int]  # (width, height) of the original image
    token_ids: list[int] = field(default_factory=list, repr=False)

    @property
    def answer(self) -> str:
        """The continuation without markup (VQA answers, region descriptions)."""
        return grounding.parse(self.text).caption

    def boxes_for(self, phrase: str) -> list[grounding.Box]:
        """Normalised boxes of the first entity whose phrase is `phrase` (stripped); [] if none."""
        key = phrase.strip()
        return next((e.boxes for e in self.entities if e.phrase.strip() == key and e.boxes), [])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("token_ids")
        return d

    def to_supervision(self) -> Any:
        """The boxes as a `supervision.Detections`: xyxy in pixels of the original image, one row per box in
        output order; class_id numbers the distinct phrases in order of first appearance and
        data["class_name"] holds each row's phrase; confidence is the box's score (NaN where the prompt
        gave the box). Needs `pip install 'kosmos2[detections]'`."""
        try:
            import supervision as sv
        except ImportError as e:
            raise ImportError(
                "GroundingResult.to_supervision() needs the supervision package: "
                "pip install 'kosmos2[detections]'"
            ) from e
        import numpy as np

        rows = [
            (e.phrase, box, e.scores[i] if i < len(e.scores) else None)
            for e in self.entities
            for i, box in enumerate(e.pixel_boxes)
        ]
        names = list(dict.fromkeys(phrase for phrase, _, _ in rows))
        return sv.Detections(
            xyxy=np.array([box for _, box, _ in rows], dtype=np.float32).reshape(-1, 4),
            confidence=np.array([np.nan if c is None else c for _, _, c in rows], dtype=np.float32),
            class_id=np.array([names.index(phrase) for phrase, _, _ in rows], dtype=int),
            data={"class_name": np.array([phrase for phrase, _, _ in rows], dtype=str)},
        )


@dataclass
class Candidate:
    """A box `locate` could answer with: normalised and in pixels, with its score (see EntityResult)."""

    box: grounding.Box
    pixel_box: grounding.Box
    score: float  # sqrt(p(ul) * p(lr | ul)) after `<object>`, as EntityResult.scores
    logp_ul: float
    logp_lr: float
    # how well the box fits the expression by the model's own answers about it (kosmos2.verify), for a
    # model with box questions; None otherwise
    match: float | None = None


def _add_distinct(distinct: list[Candidate], candidate: Candidate) -> None:
    """Append `candidate` unless it overlaps one already there with IoU >= CANDIDATE_IOU (the same object)."""
    if all(grounding.iou(candidate.box, d.box) < CANDIDATE_IOU for d in distinct):
        distinct.append(candidate)


def _checked_order(search: list[Candidate], c: Any, W: int, H: int) -> list[Candidate]:
    """Candidates of a checked expression (kosmos2.verify): its boxes in the check's order (score x
    location score), then the rest of the search's distinct boxes (match None)."""
    out: list[Candidate] = []
    for k in c.order:
        box, box_score = c.boxes[k], c.box_scores[k]
        score = math.nan if box_score is None else box_score
        cand = Candidate(box, grounding.box_to_pixels(box, W, H), score, math.nan, math.nan, c.scores[k])
        _add_distinct(out, cand)
    for cand in search:
        _add_distinct(out, cand)
    return out


@dataclass
class LocateResult(GroundingResult):
    """A REC result (`Predictor.locate`): the greedy answer as before, plus what to trust about it.

    found: the expression fits something in the image (found_score >= the predictor's found_threshold).
    ambiguous: it was found and fits more than one object (ambiguity_score >= ambiguous_threshold): ask
    the user which one, among `candidates`. candidates: distinct boxes (no two overlap with IoU >=
    CANDIDATE_IOU), best first; the first is the greedy answer whenever greedy decoding wrote a valid box.
    How the scores are computed: docs/TRUST.md.
    """

    expression: str = ""
    found: bool | None = None
    ambiguous: bool | None = None
    # the signal behind `found`: signals["object"] for a model trained on absent queries (rec_absent in its
    # kosmos2_tasks), else signals["exists"]; None (and found, ambiguous None) when it has neither
    found_score: float | None = None
    # the signal behind `ambiguous`: signals["another"] for a model trained on ambiguous queries
    # (rec_ambiguous), else signals["second_ratio"]
    ambiguity_score: float | None = None
    candidates: list[Candidate] = field(default_factory=list)
    # every signal computed, by name (docs/TRUST.md): "exists" p(" yes") / (p(" yes") + p(" no")) to "Is
    # there <expression>?" (models trained for plain VQA); "object" p(<object> | prompt), the REC answer
    # going on to a box rather than ending; "second_ratio" score of the second candidate / score of the
    # first (0 with one); "another" (models trained on ambiguous queries) p(delimiter) / (p(delimiter) +
    # p(</object>)) after the first candidate's box: the answer going on to a second box
    signals: dict[str, float] = field(default_factory=dict)

    @property
    def box(self) -> grounding.Box | None:
        """The answer's normalised box (the first box generated for the expression), None if none."""
        boxes = self.boxes_for(self.expression)
        return boxes[0] if boxes else None

    @property
    def pixel_box(self) -> grounding.Box | None:
        box = self.box
        return None if box is None else grounding.box_to_pixels(box, *self.image_size)


@dataclass
class ZoomResult:
    """What `Predictor.zoom` found and what the task said about the crop.

    located: the `locate` result on the whole image. crop_box: the crop in pixels of the original image
    (None when nothing was found). crop: the cropped image. result: the task's output on the crop; a
    GroundingResult's boxes are mapped back into the original image (`pixel_boxes`, `boxes`).
    """

    located: LocateResult
    crop_box: grounding.Box | None
    crop: Any
    result: Any


@dataclass
class StreamEvent:
    """One event of `Predictor.stream` (and of the server's streams, which use the same `StreamDecoder`).

    kind "text":   `text` is the next readable piece of the caption (markup removed). Joined in order, the
                   pieces equal the final `result.caption`; the first is the prompt's own text, if any.
    kind "entity": `entity` has just closed (its `</object>` arrived); its span indexes the caption, whose
                   text up to the span's end has already been sent.
    kind "done":   the last event; `result` is the whole `GroundingResult`, equal to what `ground` returns.
    """

    kind: str
    text: str = ""
    entity: EntityResult | None = None
    result: GroundingResult | None = None

    def __str__(self) -> str:  # `print(event, end="")` prints the readable text
        return self.text


class StreamDecoder:
    """Generated token ids in, `StreamEvent`s out: `start()`, then `feed(id, logprob)` per token (without
    `</s>`), then `finish()`. Each step re-parses prompt + continuation with `grounding.parse`, so the pieces
    and entities are exactly those of the final result. Given every token's log-probability (the model's
    plain distribution, as `token_logprobs`), entities carry their scores as they close; otherwise the
    scores come with the "done" result."""

    def __init__(self, predictor: Predictor, prompt: str, size: tuple[int, int]):
        self.predictor, self.prompt, self.size = predictor, prompt, size
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self._prompt_ids = predictor.tokenizer.encode(prompt.strip())
        prompt_parsed = grounding.parse(predictor.tokenizer.decode(self._prompt_ids))
        self._prompt_boxes = sum(len(e.boxes) for e in prompt_parsed.entities)
        self._sent = ""  # caption text sent so far
        self._entities = 0  # entities sent so far

    def start(self) -> list[StreamEvent]:
        """The prompt's readable text (and any entity the prompt closes by itself)."""
        return self._events()

    def feed(self, token_id: int, logprob: float | None = None) -> list[StreamEvent]:
        self.ids.append(int(token_id))
        if logprob is not None:
            self.logprobs.append(float(logprob))
        return self._events()

    def finish(self, logprobs: list[float] | None = None) -> list[StreamEvent]:
        """What is left (held-back text) and the "done" event with the whole result (scored with
        `logprobs`, else with those fed, when the predictor scores)."""
        if logprobs is not None:
            self.logprobs = list(logprobs)
        result = self.predictor._result(self.prompt, self.ids, self.size, self._scored())
        events = self._events(final=True)
        return [*events, StreamEvent("done", result=result)]

    def _scored(self) -> list[float] | None:
        complete = len(self.logprobs) == len(self.ids)
        return self.logprobs if self.predictor.scores and complete else None

    def _events(self, final: bool = False) -> list[StreamEvent]:
        text = self.predictor.tokenizer.decode(self._prompt_ids + self.ids)
        if text.endswith("\ufffd") and not final:  # wait for a whole UTF-8 character
            return []
        parsed = grounding.parse(text)
        events = []
        if parsed.caption.startswith(self._sent) and len(parsed.caption) > len(self._sent):
            events.append(StreamEvent("text", text=parsed.caption[len(self._sent) :]))
            self._sent = parsed.caption
        if len(parsed.entities) > self._entities:
            W, H = self.size
            entities = [
                EntityResult(e.phrase, e.span, e.boxes, [grounding.box_to_pixels(b, W, H) for b in e.boxes])
                for e in parsed.entities
            ]
            scored = self._scored()
            if scored is not None and self.ids:
                self.predictor._attach_scores(entities, self._prompt_boxes, self.ids, scored)
            events += [StreamEvent("entity", entity=e) for e in entities[self._entities :]]
            self._entities = len(entities)
        return events


def _as_list(x: Any) -> tuple[list[Any], bool]:
    if isinstance(x, (list, tuple)) and not (
        len(x) == 4 and all(isinstance(v, (int, float)) for v in x)  # a box, not a batch
    ):
        return list(x), True
    return [x], False


class Predictor:
    """A loaded model + tokenizer + decoding defaults; stateless between calls."""

    def __init__(
        self,
        model,
        tokenizer,
        generation: GenerationConfig | None = None,
        batch_size: int = 8,
        tasks: Sequence[str] | None = None,
        scores: bool = True,
    ):
        """scores: give every generated box and phrase a score (one teacher-forced pass per batch after
        generation; `EntityResult.scores`). `found_threshold` / `ambiguous_threshold`: `locate`'s
        decisions."""
        self.model = model.eval()
        self.scores = scores
        # None: THRESHOLDS' value for the signal `locate` decides by
        self.found_threshold: float | None = None
        self.ambiguous_threshold: float | None = None
        # questions the model answers about a box, with which `locate` checks its answers (kosmos2.verify);
        # from_pretrained sets the synthetic world's for a model that states it was trained on them
        self.box_questions = None
        self.tokenizer = tokenizer
        self.generation = generation or GenerationConfig(
            eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id
        )
        self.batch_size = batch_size
        cfg = model.config
        self.image_resolution = cfg.vision.image_size
        self.num_image_tokens = cfg.latent_query_num
        self.grid = grounding.GRID
        # the tasks the model was trained for (None: not stated, every task is tried); see TASKS
        self.tasks: frozenset[str] | None = None if tasks is None else frozenset(tasks)
        self.source = "this model"  # named in messages; from_pretrained sets the directory

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str] | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 8,
    ) -> Predictor:
        """Load a Hugging Face-layout checkpoint directory (weights, config and tokenizer files).

        path None: $KOSMOS2_MODEL if set, else the built-in default model shipped with the package.
        dtype: "float32", "bfloat16" (prepacked linear layers), "int8" (weight-only, per-channel scales;
        an int8 checkpoint loads as saved, a float one is quantised on load), "int8-dynamic" (the same int8
        weights, activations quantised per row: FBGEMM's faster kernel), or torch.float32 /
        torch.bfloat16; None: float32, or int8 for an int8 checkpoint (`kosmos2.quantize`).
        """
        from kosmos2.checkpoint import load_pretrained, quantization_config
        from kosmos2.quantize import dtype_name, prepare_model
        from kosmos2.tokenizer import Kosmos2Tokenizer

        directory = Path(path) if path is not None else default_model_dir()
        from_env = path is None and bool(os.environ.get(DEFAULT_MODEL_ENV))
        if from_env:  # every problem of this directory is reported as one of the variable
            try:
                return cls.from_pretrained(directory, dtype=dtype, device=device, batch_size=batch_size)
            except (OSError, ValueError) as e:
                message = f"${DEFAULT_MODEL_ENV}={str(directory)!r}: {e}"
                try:
                    named = type(e)(message)
                except TypeError:  # an exception type with other constructor arguments (JSONDecodeError)
                    named = OSError(message) if isinstance(e, OSError) else ValueError(message)
                raise named from e
        if not directory.is_dir():
            hint = (
                "pass the directory of a Kosmos-2 checkpoint in the Hugging Face layout"
                if path is not None
                else f"the built-in default model is missing from the installation; set ${DEFAULT_MODEL_ENV} "
                "or pass a checkpoint directory"
            )
            what = "is a file, not a directory" if directory.exists() else "does not exist"
            raise FileNotFoundError(f"model directory {str(directory)!r} {what}: {hint}")
        _check_device(device)
        stored = "int8" if quantization_config(directory) is not None else "float32"
        name = dtype_name(dtype) or stored
        if stored == "int8" and name not in ("int8", "int8-dynamic"):
            raise ValueError(
                f"{directory} is an int8 checkpoint: load it with dtype='int8' or 'int8-dynamic', "
                f"not {name!r}"
            )
        load_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(name)
        model = prepare_model(load_pretrained(directory, dtype=load_dtype, device=device), name)
        tokenizer = Kosmos2Tokenizer.from_pretrained(directory)
        if tokenizer.vocab_size > model.config.text.vocab_size:
            raise ValueError(
                f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding "
                f"only {model.config.text.vocab_size}; the tokenizer files do not belong to these weights"
            )
        predictor = cls(
            model, tokenizer, generation_defaults(directory, tokenizer), batch_size, model_tasks(directory)
        )
        predictor.source = str(directory)
        predictor.box_questions = _box_questions(tokenizer, predictor.tasks)
        return predictor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def supports(self, task: str) -> bool:
        """Whether the model was trained for `task` (one of TASKS, or QUERY_TASKS); True when the model does
        not say (for QUERY_TASKS: False, the official weights were not trained on them)."""
        if task in QUERY_TASKS:
            return self.tasks is not None and task in self.tasks
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; the tasks are {list(TASKS + QUERY_TASKS)}")
        return self.tasks is None or task in self.tasks

    def check_task(self, task: str) -> None:
        """Raise UnsupportedTaskError if the model states its tasks and `task` is not among them."""
        if not self.supports(task):
            raise UnsupportedTaskError(
                f"{self.source} was not trained for {task} (its generation_config.json lists {TASKS_KEY}: "
                f"{', '.join(t for t in TASKS if t in self.tasks)}); its output would be meaningless. Use a "
                f"model trained for it (the official weights know every task), or call ground() with the "
                f"prompt yourself to try anyway"
            )

    # -- building blocks ----------------------------------------------------------------------------------

    def encode_images(self, images: Sequence[Any]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Images (any source `load_image` takes) -> image embeddings [B, 64, D] and original sizes."""
        pil = [load_image(im) for im in images]
        pixels = preprocess(pil, size=self.image_resolution).to(self.device)
        return encode_images(self.model, pixels), [image_size(im) for im in pil]

    def _options(self, defaults: dict[str, Any], options: dict[str, Any]) -> GenerationConfig:
        return GenerationConfig.from_kwargs(self.generation, **{**defaults, **options})

    def _result(
        self, prompt: str, new_ids: list[int], size: tuple[int, int], logprobs: list[float] | None = None
    ) -> GroundingResult:
        text = self.tokenizer.decode(new_ids)
        # parse prompt + continuation as one text: a prompt's <phrase> gets its box from the continuation
        prompt_ids = self.tokenizer.encode(prompt.strip())
        parsed = grounding.parse(self.tokenizer.decode(prompt_ids + new_ids))
        W, H = size
        entities = [
            EntityResult(e.phrase, e.span, e.boxes, [grounding.box_to_pixels(b, W, H) for b in e.boxes])
            for e in parsed.entities
        ]
        if logprobs is not None:
            prompt_boxes = sum(
                len(e.boxes) for e in grounding.parse(self.tokenizer.decode(prompt_ids)).entities
            )
            self._attach_scores(entities, prompt_boxes, new_ids, logprobs)
        return GroundingResult(prompt, text, parsed.caption, entities, size, new_ids)

    def _attach_scores(
        self, entities: list[EntityResult], prompt_boxes: int, ids: list[int], logprobs: list[float]
    ) -> None:
        """Give each generated box its score and each generated phrase its phrase score.

        The generated boxes are read off the token ids as `grounding.parse` reads them (two location tokens
        between `<object>` / delimiter / `</object>`, corners in order) and matched in order to the parsed
        entities' boxes after the `prompt_boxes` the prompt held.
        """
        tok = self.tokenizer
        offset, cells = tok.patch_index_offset, self.grid * self.grid
        tag = {name: tok.token_to_id(name) for name in grounding.TAG_TOKENS}
        boxes: list[tuple[grounding.Box, float]] = []
        phrases: list[tuple[str, float]] = []
        group: list[int] | None = None
        phrase_at: int | None = None
        for i, t in enumerate(ids):
            if t in (tag[grounding.OBJECT_START], tag[grounding.DELIMITER], tag[grounding.OBJECT_END]):
                if group is not None and len(group) == 2:
                    ul, lr = (ids[j] - offset for j in group)
                    try:
                        box = grounding.tokens_to_box(ul, lr, self.grid)
                        boxes.append((box, math.exp((logprobs[group[0]] + logprobs[group[1]]) / 2)))
                    except ValueError:
                        pass
                group = [] if t != tag[grounding.OBJECT_END] else None
            elif group is not None and offset <= t < offset + cells:
                group.append(i)
            elif group is not None:
                group = None
            if t == tag[grounding.PHRASE_START]:
                phrase_at = i + 1
            elif t == tag[grounding.PHRASE_END] and phrase_at is not None and i > phrase_at:
                mean = sum(logprobs[phrase_at:i]) / (i - phrase_at)
                phrases.append((tok.decode(ids[phrase_at:i]).strip(), math.exp(mean)))
                phrase_at = None
        k = seen = 0
        for e in entities:
            e.scores = []
            for box in e.boxes:
                score = None
                if seen >= prompt_boxes and k < len(boxes) and boxes[k][0] == box:
                    score = boxes[k][1]
                    k += 1
                e.scores.append(score)
                seen += 1
        k = 0
        for e in entities:
            if k < len(phrases) and phrases[k][0] == e.phrase:
                e.phrase_score = phrases[k][1]
                k += 1

    # -- the one entry point ------------------------------------------------------------------------------

    def ground(
        self, images: Any, prompts: str | Sequence[str] = PROMPT_BRIEF, **options: Any
    ) -> GroundingResult | list[GroundingResult]:
        """Generate for one image (returns a result) or a list of images (returns a list, run in batches).

        prompts: one prompt for every image, or one per image. options: max_new_tokens, do_sample,
        temperature, top_p, top_k, num_beams, no_repeat_ngram_size, length_penalty, seed.
        """
        return self._run(images, prompts, {}, options)

    def _run(
        self,
        images: Any,
        prompts: Any,
        defaults: dict[str, Any],
        options: dict[str, Any],
        after: Callable[[list[GroundingResult], torch.Tensor, dict[str, torch.Tensor]], None] | None = None,
    ) -> GroundingResult | list[GroundingResult]:

        image_list, batched = _as_list(images)
        prompt_list, prompts_batched = (
            ([prompts], False) if isinstance(prompts, str) else (list(prompts), True)
        )
        if prompts_batched and not batched:
            image_list = image_list * len(prompt_list)  # several prompts about one image
            batched = True
        if len(prompt_list) == 1:
            prompt_list = prompt_list * len(image_list)
        if len(prompt_list) != len(image_list):
            raise ValueError(
                f"got {len(image_list)} images but {len(prompt_list)} prompts: give one or one each"
            )
        for p in prompt_list:
            if not isinstance(p, str):
                raise TypeError(f"prompts must be str, got {type(p).__name__}")
            grounding.check_prompt(p, self.grid, self.tokenizer.token_to_id)  # PromptError: what and where
        cfg = self._options(defaults, options)
        results: list[GroundingResult] = []
        for start in range(0, len(image_list), self.batch_size):
            chunk_images = image_list[start : start + self.batch_size]
            chunk_prompts = prompt_list[start : start + self.batch_size]
            embeds, sizes = self._encode_unique(chunk_images)
            batch = self.tokenizer.batch_encode(chunk_prompts, num_image_tokens=self.num_image_tokens)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            new = generate(
                self.model, batch["input_ids"], batch["attention_mask"], embeds, batch["image_mask"], cfg
            )
            logprobs: list[Any] = [None] * len(new)
            if self.scores:
                logprobs = token_logprobs(
                    self.model, batch["input_ids"], batch["attention_mask"], embeds, batch["image_mask"], new
                )
            chunk = [
                self._result(p, n, s, lp)
                for p, n, s, lp in zip(chunk_prompts, new, sizes, logprobs, strict=True)
            ]
            if after is not None:
                after(chunk, embeds, batch)
            results += chunk
        return results if batched else results[0]

    def _encode_unique(self, images: list[Any]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Encode each distinct image object once (several prompts about one image share its embedding)."""
        order: dict[int, int] = {}
        unique = []
        for im in images:
            if id(im) not in order:
                order[id(im)] = len(unique)
                unique.append(im)
        embeds, sizes = self.encode_images(unique)
        index = [order[id(im)] for im in images]
        return embeds[index], [sizes[i] for i in index]

    def stream(self, image: Any, prompt: str = PROMPT_BRIEF, **options: Any) -> Iterator[StreamEvent]:
        """Generate for one image, yielding `StreamEvent`s as the text grows (greedy or sampling).

        "text" events carry readable pieces (markup removed) whose concatenation is the result's caption (the
        first piece is the prompt's own text, if it has any); an "entity" event comes when a phrase's
        `</object>` arrives (its scores come with the result); the last event, "done", carries the whole
        `GroundingResult`, equal to what `ground` gives:

            for event in p.stream("photo.jpg"):
                print(event.text, end="", flush=True)
        """
        grounding.check_prompt(prompt, self.grid, self.tokenizer.token_to_id)
        cfg = self._options({}, options)
        embeds, sizes = self.encode_images([image])
        batch = self.tokenizer.batch_encode([prompt], num_image_tokens=self.num_image_tokens)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        decoder = StreamDecoder(self, prompt, sizes[0])
        yield from decoder.start()
        for tokens, _finished in stream(
            self.model, batch["input_ids"], batch["attention_mask"], embeds, batch["image_mask"], cfg
        ):
            t = int(tokens[0])
            if t == cfg.eos_token_id:
                break
            yield from decoder.feed(t)
        logprobs = None
        if self.scores:  # the same teacher-forced pass as `ground`: the done result equals its result
            args = (batch["input_ids"], batch["attention_mask"], embeds, batch["image_mask"], [decoder.ids])
            logprobs = token_logprobs(self.model, *args)[0]
        yield from decoder.finish(logprobs)

    @torch.no_grad()
    def logits(self, image: Any, text: str) -> torch.Tensor:
        """Teacher-forced logits [T, vocab] of the prompt layout `<s><image>[64]</image>text` (scoring)."""
        embeds, _ = self.encode_images([image])
        ids, mask = self.tokenizer.encode_prompt(text, num_image_tokens=self.num_image_tokens)
        logits, _ = self.model(
            torch.tensor([ids], device=self.device),
            image_embeds=embeds,
            image_mask=torch.tensor([mask], device=self.device),
        )
        return logits[0].float()

    # -- task helpers (SPEC §1) ------------------------------------------------------------------------------

    def caption(self, images: Any, detailed: bool = False, grounded: bool = True, **options: Any):
        """Brief or detailed caption, grounded (greedy) or plain (beam 5, as the official evaluation)."""
        self.check_task("caption" if not grounded else "detailed_caption" if detailed else "grounded_caption")
        if not grounded:
            return self._run(images, PROMPT_PLAIN, {"num_beams": 5}, options)
        prompt = PROMPT_DETAILED if detailed else PROMPT_BRIEF
        return self._run(images, prompt, {"max_new_tokens": 128} if detailed else {}, options)

    def locate(
        self,
        images: Any,
        expressions: str | Sequence[str],
        candidates: int = 2,
        check: bool = True,
        **options: Any,
    ) -> LocateResult | list[LocateResult]:
        """Referring expression comprehension: `<grounding><phrase>{expression}</phrase>`; the answer is the
        first generated box (`result.box`, `result.boxes_for(expression)[0]`), greedy as before.

        Each result also says whether to trust it (LocateResult): `found`, `ambiguous`, their scores, and up
        to `candidates` distinct scored boxes (a search over the two location tokens after `<object>`:
        the likeliest upper-left cells, each completed by its likeliest valid lower-right cell). Costs, per
        batch, one pass to score the answer, one prefill + one step for the candidates and one prefill for
        the found question. How each score is computed: docs/TRUST.md.

        check: for a model with box questions (`self.box_questions`: the built-in default model) and an
        expression made of their answers, check the answer and find the other objects the expression may
        mean with the model's own answers about boxes (`kosmos2.verify`): `found` and `ambiguous` then read
        `signals["match"]` / `signals["second_match"]` and the candidates come in the check's order. It
        costs a few short REC decodes and one prefill per (box, question): about 3x a plain `locate` call.
        """
        self.check_task("rec")
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise ValueError(f"candidates must be a positive number of boxes, got {candidates!r}")
        exprs = [expressions] if isinstance(expressions, str) else list(expressions)
        for e in exprs:
            if not isinstance(e, str):
                raise TypeError(f"expressions must be str, got {type(e).__name__}")
        prompts = [
            f"{grounding.GROUNDING}{grounding.PHRASE_START}{e.strip()}{grounding.PHRASE_END}" for e in exprs
        ]
        beams = max(CANDIDATE_BEAMS, 4 * candidates)

        def trust(chunk: list[GroundingResult], embeds: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
            tok = self.tokenizer
            image_mask = batch["image_mask"]
            object_logp, found = location_candidates(
                self.model,
                batch["input_ids"],
                batch["attention_mask"],
                embeds,
                image_mask,
                tok.token_to_id(grounding.OBJECT_START),
                tok.patch_index_offset,
                self.grid,
                beams,
            )
            # the found question is plain VQA: a model not trained for it gives no "exists" signal
            exists = (
                self._exists(embeds, [_question_words(r.prompt) for r in chunk])
                if self.supports("vqa")
                else [None] * len(chunk)
            )
            # a model trained on ambiguous queries says whether a second box follows the first candidate's
            another = (
                self._another(embeds, [r.prompt for r in chunk], [found[i][0] for i in range(len(chunk))])
                if self.supports("rec_ambiguous")
                else [None] * len(chunk)
            )
            checked = (
                verify.check(self, chunk, embeds, [_question_words(r.prompt, article=False) for r in chunk])
                if check and self.box_questions is not None
                else [None] * len(chunk)
            )
            for i, r in enumerate(chunk):
                W, H = r.image_size
                distinct: list[Candidate] = []
                for j, c in enumerate(found[i]):
                    box = grounding.tokens_to_box(c.ul, c.lr, self.grid)
                    pixels = grounding.box_to_pixels(box, W, H)
                    _add_distinct(
                        distinct, Candidate(box, pixels, math.exp(c.logp / 2), c.logp_ul, c.logp_lr)
                    )
                    if j == 0 and self.supports("rec_ambiguous"):
                        # the answer's own further boxes come next: what it wrote after the delimiter (their
                        # location tokens follow a box, not `<object>`: no logp_ul / logp_lr of that search)
                        for e in r.entities[:1]:
                            for k in range(1, len(e.boxes)):
                                score = e.scores[k] if k < len(e.scores) and e.scores[k] is not None else 0.0
                                other = Candidate(e.boxes[k], e.pixel_boxes[k], score, math.nan, math.nan)
                                _add_distinct(distinct, other)
                ratio = distinct[1].score / distinct[0].score if len(distinct) > 1 else 0.0
                signals = {"second_ratio": ratio, "object": math.exp(object_logp[i])}
                if exists[i] is not None:
                    signals["exists"] = exists[i]
                if another[i] is not None:
                    signals["another"] = another[i]
                if checked[i] is not None:
                    # the answer checked with the model's own answers about boxes (kosmos2.verify)
                    c = checked[i]
                    signals["match"], signals["second_match"] = c.found, c.ambiguity
                    distinct = _checked_order(distinct, c, W, H)
                    found_name, ambiguity_name = "match", "second_match"
                else:
                    found_name = "object" if self.supports("rec_absent") else "exists"
                    ambiguity_name = "another" if self.supports("rec_ambiguous") else "second_ratio"
                found_score = signals.get(found_name)
                ambiguity = signals[ambiguity_name]
                found_at = self._threshold(self.found_threshold, found_name)
                ambiguous_at = self._threshold(self.ambiguous_threshold, ambiguity_name)
                is_found = None if found_score is None else found_score >= found_at
                chunk[i] = LocateResult(
                    **{f: getattr(r, f) for f in GroundingResult.__dataclass_fields__},
                    expression=_question_words(r.prompt, article=False),
                    found=is_found,
                    ambiguous=None if is_found is None else is_found and ambiguity >= ambiguous_at,
                    found_score=found_score,
                    ambiguity_score=ambiguity,
                    candidates=distinct[:candidates],
                    signals=signals,
                )

        return self._run(
            images,
            prompts[0] if isinstance(expressions, str) else prompts,
            {"max_new_tokens": 24},
            options,
            after=trust,
        )

    def zoom(
        self,
        image: Any,
        expression: str,
        then: str | Callable[[Any], Any] = "describe",
        question: str | None = None,
        margin: float = ZOOM_MARGIN,
        force: bool = False,
        **options: Any,
    ) -> ZoomResult:
        """Crop-and-ask: locate `expression`, crop around its box with a margin, run a task on the crop.

        then: "describe" (box -> description of the object in the crop), "caption" (grounded caption of
        the crop), "vqa" / "grounded_vqa" (`question` about the crop), or a callable taking the crop (a PIL
        image) and returning anything, e.g. `lambda im: pytesseract.image_to_string(im)` for OCR.
        margin: added on each side as a fraction of the box's width and height (clipped to the image).
        force: crop even when `locate` says the expression is not found (by default the task is skipped and
        `result` is None: ask the user instead). Boxes of a GroundingResult from the crop are mapped back to
        the original image. options: generation options for the task on the crop.
        """
        tasks = ("describe", "caption", "vqa", "grounded_vqa")
        if not callable(then) and then not in tasks:
            raise ValueError(f"then={then!r}: give one of {tasks} or a callable taking the cropped image")
        if then in ("vqa", "grounded_vqa") and not (isinstance(question, str) and question.strip()):
            raise ValueError(f"then={then!r} needs question='...' (what to ask about the crop)")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin <= 10:
            raise ValueError(
                f"margin must be a number in [0, 10] (a fraction of the box size), got {margin!r}"
            )
        picture = load_image(image)
        W, H = image_size(picture)
        located = self.locate(picture, expression)
        box = located.pixel_box
        if box is None or (located.found is False and not force):
            return ZoomResult(located, None, None, None)
        x1, y1, x2, y2 = box
        mw, mh = margin * (x2 - x1), margin * (y2 - y1)
        left, top = max(0, math.floor(x1 - mw)), max(0, math.floor(y1 - mh))
        right, bottom = min(W, math.ceil(x2 + mw)), min(H, math.ceil(y2 + mh))
        crop = picture.crop((left, top, right, bottom))
        if callable(then):
            result = then(crop)
        elif then == "describe":
            inside = (x1 - left, y1 - top, x2 - left, y2 - top)
            result = self.describe_region(crop, inside, **options)
        elif then == "caption":
            result = self.caption(crop, **options)
        else:
            result = self.vqa(crop, question, grounded=then == "grounded_vqa", **options)
        if isinstance(result, GroundingResult):
            result = _uncrop(result, (left, top), (W, H))
        return ZoomResult(located, (float(left), float(top), float(right), float(bottom)), crop, result)

    @staticmethod
    def _threshold(chosen: float | None, signal: str) -> float:
        return THRESHOLDS[signal] if chosen is None else chosen

    @torch.no_grad()
    def _exists(self, embeds: torch.Tensor, things: list[str]) -> list[float]:
        """p(" yes") / (p(" yes") + p(" no")) as the answer to `Question: Is there {thing}? Answer:`."""
        tok = self.tokenizer
        logp = self._next_logp(embeds, [f"Question: Is there {t}? Answer:" for t in things])
        yes, no = tok.encode("yes")[0], tok.encode("no")[0]
        return torch.sigmoid(logp[:, yes] - logp[:, no]).tolist()

    def _another(self, embeds: torch.Tensor, prompts: list[str], firsts: list[Any]) -> list[float]:
        """p(delimiter) / (p(delimiter) + p(</object>)) after `{prompt}<object>{ul}{lr}` (each row's first
        candidate): whether the REC answer goes on to a second box."""
        tok = self.tokenizer
        texts = [
            f"{p}{grounding.OBJECT_START}{grounding.patch_token(c.ul)}{grounding.patch_token(c.lr)}"
            for p, c in zip(prompts, firsts, strict=True)
        ]
        logp = self._next_logp(embeds, texts)
        more, end = tok.token_to_id(grounding.DELIMITER), tok.token_to_id(grounding.OBJECT_END)
        return torch.sigmoid(logp[:, more] - logp[:, end]).tolist()

    def _next_logp(self, embeds: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """log p(next token | image, prompt) for each prompt [B,V] (one prefill)."""
        tok = self.tokenizer
        batch = {
            k: v.to(self.device)
            for k, v in tok.batch_encode(prompts, num_image_tokens=self.num_image_tokens).items()
        }
        logits, _ = prefill(
            self.model,
            batch["input_ids"],
            batch["attention_mask"],
            embeds,
            batch["image_mask"],
            batch["input_ids"].shape[1] + 1,
        )
        self.model.clear_cache()
        return torch.log_softmax(logits, dim=-1)

    def ground_phrases(
        self, image: Any, caption: str, phrases: Sequence[str | tuple[int, int]], **options: Any
    ):
        """Phrase grounding (Flickr30k Entities protocol).

        For each phrase of `caption` (a string, found from the left, or a (start, end) character span) the
        prompt is `<grounding>{caption before it} <phrase>{phrase}</phrase>`; returns one list of normalised
        boxes per phrase (empty when the model gave none).
        """
        self.check_task("phrase_grounding")
        prompts, names = [], []
        for ph in phrases:
            if isinstance(ph, str):
                start = caption.find(ph)
                if start < 0:
                    raise ValueError(f"phrase {ph!r} does not occur in the caption {caption!r}")
                end = start + len(ph)
            else:
                start, end = ph
                if not 0 <= start < end <= len(caption):
                    raise ValueError(
                        f"span {ph!r} is not a non-empty span of the caption ({len(caption)} chars)"
                    )
            name = caption[start:end].strip()
            prompts.append(
                f"{grounding.GROUNDING}{caption[:start].strip()} "
                f"{grounding.PHRASE_START}{name}{grounding.PHRASE_END}"
            )
            names.append(name)
        if not prompts:
            return []
        results = self._run([image] * len(prompts), prompts, {"max_new_tokens": 24}, options)
        return [r.boxes_for(n) for r, n in zip(results, names, strict=True)]

    def describe_region(
        self,
        images: Any,
        box: Sequence[float],
        units: str = "pixels",
        normalized: bool | None = None,
        **options: Any,
    ):
        """Box in, text out: `<phrase> It</phrase><object>{box}</object> is` (SPEC §1).

        box: (x1, y1, x2, y2). units: "pixels" (the default) for pixels of the original image, as
        supervision's `Detections.xyxy`, detectors and this predictor's `pixel_boxes` give them; "normalized"
        for coordinates in [0, 1], as transformers' `Kosmos2Processor(bboxes=...)` and `EntityResult.boxes`
        take them. `normalized=True/False` is the older spelling of units. A box outside the image, empty or
        inverted is refused in the units given; a pixel box whose coordinates are all <= 1 (less than a pixel
        wide: almost certainly normalised) gets a warning.
        """
        self.check_task("reg")
        if normalized is not None:
            units = "normalized" if normalized else "pixels"
        if units not in BOX_UNITS:
            raise ValueError(f"units={units!r}: say how the box is measured, one of {BOX_UNITS}")
        image_list, batched = _as_list(images)
        image_list = [load_image(im) for im in image_list]  # decoded once: its size and its pixels
        prompts = [
            f"{grounding.PHRASE_START} It{grounding.PHRASE_END}"
            f"{grounding.object_markup([_region(box, units, image_size(im))])} is"
            for im in image_list
        ]
        return self._run(
            image_list if batched else image_list[0], prompts if batched else prompts[0], {}, options
        )

    def vqa(self, images: Any, question: str, grounded: bool = False, **options: Any):
        """`Question: {q} Answer:` (or `<grounding> Question: ...`), greedy; `result.answer` is the answer."""
        self.check_task("grounded_vqa" if grounded else "vqa")
        prompt = (
            f"{grounding.GROUNDING} Question: {question.strip()} Answer:"
            if grounded
            else (f"Question: {question.strip()} Answer:")
        )
        return self._run(images, prompt, {"max_new_tokens": 24}, options)


def _region(box: Sequence[float], units: str, size: tuple[int, int]) -> grounding.Box:
    """`describe_region`'s box checked in the caller's units, then normalised."""
    W, H = size
    try:
        x1, y1, x2, y2 = grounding._finite_box(box)
    except ValueError as e:
        raise ValueError(f"describe_region: {e}") from None
    shown = f"({x1:g}, {y1:g}, {x2:g}, {y2:g})"
    if not (x2 > x1 and y2 > y1):
        raise ValueError(
            f"box {shown} ({units}) is empty or inverted: need x2 > x1 and y2 > y1, corners "
            "(x1, y1, x2, y2), not (x, y, width, height)"
        )
    if units == "normalized":
        tol = grounding.BOX_TOLERANCE
        if not all(-tol <= v <= 1 + tol for v in (x1, y1, x2, y2)):
            raise ValueError(
                f"box {shown} has coordinates outside [0, 1], but units='normalized'; for a box in pixels of "
                f"the {W}x{H} image pass units='pixels'"
            )
        return x1, y1, x2, y2
    tx, ty = grounding.BOX_TOLERANCE * W, grounding.BOX_TOLERANCE * H  # pixel rounding of a detector
    outside = [
        f"{n} = {v:g} {'<' if v < low else '>'} {low if v < low else high}"
        for n, v, low, high in (("x1", x1, -tx, W + tx), ("y1", y1, -ty, H + ty), ("x2", x2, -tx, W + tx))
        + (("y2", y2, -ty, H + ty),)
        if not low <= v <= high
    ]
    if outside:
        raise ValueError(
            f"box {shown} (pixels) reaches outside the {W}x{H} image ({', '.join(outside)}); pass a box "
            "inside the image, in pixels of the original image"
        )
    if max(x1, y1, x2, y2) <= 1.0 and min(W, H) > 4:
        warnings.warn(
            f"box {shown} is read as pixels (units='pixels'), but every coordinate is <= 1: a box under one "
            f"pixel on the {W}x{H} image; if it is normalised to [0, 1], pass units='normalized'",
            UserWarning,
            stacklevel=3,
        )
    return grounding.box_to_normalized((x1, y1, x2, y2), W, H)


def _check_device(device: torch.device | str) -> None:
    """Refuse a device this machine lacks with a message, before any weights move."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"device {device!r} is not a torch device ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r}: CUDA is not available on this machine; use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _box_questions(tokenizer: Any, tasks: frozenset[str] | None) -> verify.BoxQuestions | None:
    """The synthetic world's box questions for a model that states it answers questions about boxes and
    REC (`kosmos2_tasks`) and whose vocabulary has every answer as one token; None otherwise."""
    if tasks is None or not {"grounded_vqa", "rec"} <= tasks:
        return None
    q = verify.synthetic_questions()
    pieces = [tokenizer.encode(w) for answers in q.answers.values() for w in answers] + [
        tokenizer.encode(q.noun)
    ]
    if any(len(p) != 1 or p[0] == tokenizer.unk_id for p in pieces):
        return None
    return q


def _question_words(prompt: str, article: bool = True) -> str:
    """The expression of a REC prompt; with `article`, led by "a"/"an" in place of "the" ("the red
    circle" -> "a red circle") for the found question."""
    words = grounding.parse(prompt).caption.strip()
    if not article:
        return words
    lower = words.lower()
    for lead in ("the ", "a ", "an "):
        if lower.startswith(lead):
            words = words[len(lead) :]
            break
    else:
        return words
    return ("an " if words[:1].lower() in "aeiou" and words else "a ") + words


def _uncrop(result: GroundingResult, offset: tuple[int, int], size: tuple[int, int]) -> GroundingResult:
    """A result on a crop with its boxes moved into the original image (pixels and normalised)."""
    from dataclasses import replace

    dx, dy = offset
    W, H = size
    entities = []
    for e in result.entities:
        pixels = [(x1 + dx, y1 + dy, x2 + dx, y2 + dy) for x1, y1, x2, y2 in e.pixel_boxes]
        boxes = [grounding.box_to_normalized(b, W, H) for b in pixels]
        entities.append(replace(e, boxes=boxes, pixel_boxes=pixels))
    return replace(result, entities=entities, image_size=(W, H))
