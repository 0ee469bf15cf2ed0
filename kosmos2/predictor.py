"""The one inference API: `Predictor` turns images and prompts into grounded text with pixel boxes.

    p = Predictor.from_pretrained()                     # the built-in default model (or a checkpoint dir)
    r = p.ground("photo.jpg")                           # "<grounding>An image of" -> GroundingResult
    r.caption, [(e.phrase, e.pixel_boxes) for e in r.entities]
    p.locate("photo.jpg", "the red ball")               # REC: the first generated box is the answer
    p.describe_region("photo.jpg", (10, 20, 200, 180))  # box in, text out

Every task of SPEC §1 is a prompt plus decoding settings; all go through `ground`, which batches lists
(left padding, one image encoding per image) and parses the output with `kosmos2.grounding`. The CLI, the
server, the demo and the evaluation all call this class.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kosmos2 import grounding
from kosmos2.generate import GenerationConfig, encode_images, generate, stream
from kosmos2.image import image_size, load_image, preprocess

DEFAULT_MODEL_ENV = "KOSMOS2_MODEL"  # a checkpoint directory to use when none is given

# prompts of SPEC §1
PROMPT_BRIEF = "<grounding>An image of"
PROMPT_DETAILED = "<grounding>Describe this image in detail:"
PROMPT_PLAIN = "An image of"


def default_model_dir() -> Path:
    """The model used when no path is given: $KOSMOS2_MODEL, else the one shipped in the package."""
    env = os.environ.get(DEFAULT_MODEL_ENV)
    return Path(env) if env else Path(__file__).parent / "assets" / "default"


def generation_defaults(directory: Path, tokenizer) -> GenerationConfig:
    """Decoding defaults: the official settings (SPEC §8), overridden by the checkpoint's
    `generation_config.json` for the options `GenerationConfig` knows (as transformers' `generate` does)."""
    known = {f for f in GenerationConfig.__dataclass_fields__} - {"eos_token_id", "pad_token_id", "seed"}
    path = directory / "generation_config.json"
    given = json.loads(path.read_text()) if path.is_file() else {}
    if not isinstance(given, dict):
        raise ValueError(f"{path}: expected a JSON object of generation settings")
    options = {k: v for k, v in given.items() if k in known}
    base = GenerationConfig(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return GenerationConfig.from_kwargs(base, **options)


@dataclass
class EntityResult:
    """A phrase of the output and its boxes: normalised (x1, y1, x2, y2) and in original-image pixels."""

    phrase: str
    span: tuple[int, int]  # character span of the phrase in the result's caption
    boxes: list[grounding.Box]
    pixel_boxes: list[grounding.Box]


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


def _as_list(x: Any) -> tuple[list[Any], bool]:
    if isinstance(x, (list, tuple)) and not (
        len(x) == 4 and all(isinstance(v, (int, float)) for v in x)  # a box, not a batch
    ):
        return list(x), True
    return [x], False


class Predictor:
    """A loaded model + tokenizer + decoding defaults; stateless between calls."""

    def __init__(self, model, tokenizer, generation: GenerationConfig | None = None, batch_size: int = 8):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.generation = generation or GenerationConfig(
            eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id
        )
        self.batch_size = batch_size
        cfg = model.config
        self.image_resolution = cfg.vision.image_size
        self.num_image_tokens = cfg.latent_query_num
        self.grid = grounding.GRID

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
        dtype: "float32", "bfloat16" (prepacked linear layers) or "int8" (weight-only, per-channel scales;
        an int8 checkpoint loads as saved, a float one is quantised on load), or torch.float32 /
        torch.bfloat16; None: float32, or int8 for an int8 checkpoint (`kosmos2.quantize`).
        """
        from kosmos2.checkpoint import load_pretrained, quantization_config
        from kosmos2.quantize import dtype_name, prepare_model
        from kosmos2.tokenizer import Kosmos2Tokenizer

        directory = Path(path) if path is not None else default_model_dir()
        if not directory.is_dir():
            hint = (
                "pass the directory of a Kosmos-2 checkpoint in the Hugging Face layout"
                if path is not None
                else f"the built-in default model is missing from the installation; set ${DEFAULT_MODEL_ENV} "
                "or pass a checkpoint directory"
            )
            raise FileNotFoundError(f"model directory {str(directory)!r} does not exist: {hint}")
        stored = "int8" if quantization_config(directory) is not None else "float32"
        name = dtype_name(dtype) or stored
        if stored == "int8" and name != "int8":
            raise ValueError(f"{directory} is an int8 checkpoint: load it with dtype='int8', not {name!r}")
        load_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": None}[name]
        model = prepare_model(load_pretrained(directory, dtype=load_dtype, device=device), name)
        tokenizer = Kosmos2Tokenizer.from_pretrained(directory)
        if tokenizer.vocab_size > model.config.text.vocab_size:
            raise ValueError(
                f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding "
                f"only {model.config.text.vocab_size}; the tokenizer files do not belong to these weights"
            )
        return cls(model, tokenizer, generation_defaults(directory, tokenizer), batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- building blocks ----------------------------------------------------------------------------------

    def encode_images(self, images: Sequence[Any]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Images (any source `load_image` takes) -> image embeddings [B, 64, D] and original sizes."""
        pil = [load_image(im) for im in images]
        pixels = preprocess(pil, size=self.image_resolution).to(self.device)
        return encode_images(self.model, pixels), [image_size(im) for im in pil]

    def _options(self, defaults: dict[str, Any], options: dict[str, Any]) -> GenerationConfig:
        return GenerationConfig.from_kwargs(self.generation, **{**defaults, **options})

    def _result(self, prompt: str, new_ids: list[int], size: tuple[int, int]) -> GroundingResult:
        text = self.tokenizer.decode(new_ids)
        # parse prompt + continuation as one text: a prompt's <phrase> gets its box from the continuation
        prompt_ids = self.tokenizer.encode(prompt.strip())
        parsed = grounding.parse(self.tokenizer.decode(prompt_ids + new_ids))
        W, H = size
        entities = [
            EntityResult(e.phrase, e.span, e.boxes, [grounding.box_to_pixels(b, W, H) for b in e.boxes])
            for e in parsed.entities
        ]
        return GroundingResult(prompt, text, parsed.caption, entities, size, new_ids)

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
        self, images: Any, prompts: Any, defaults: dict[str, Any], options: dict[str, Any]
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
            results += [self._result(p, n, s) for p, n, s in zip(chunk_prompts, new, sizes, strict=True)]
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

    def stream(self, image: Any, prompt: str = PROMPT_BRIEF, **options: Any) -> Iterator[str]:
        """Yield the continuation's text piece by piece as it is generated (greedy or sampling)."""
        cfg = self._options({}, options)
        embeds, _ = self.encode_images([image])
        batch = {k: v.to(self.device) for k, v in self.tokenizer.batch_encode([prompt]).items()}
        ids: list[int] = []
        sent = ""
        for tokens, _finished in stream(
            self.model, batch["input_ids"], batch["attention_mask"], embeds, batch["image_mask"], cfg
        ):
            t = int(tokens[0])
            if t == cfg.eos_token_id:
                break
            ids.append(t)
            text = self.tokenizer.decode(ids)
            if len(text) > len(sent) and not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
                yield text[len(sent) :]
                sent = text

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
        if not grounded:
            return self._run(images, PROMPT_PLAIN, {"num_beams": 5}, options)
        prompt = PROMPT_DETAILED if detailed else PROMPT_BRIEF
        return self._run(images, prompt, {"max_new_tokens": 128} if detailed else {}, options)

    def locate(self, images: Any, expressions: str | Sequence[str], **options: Any):
        """Referring expression comprehension: `<grounding><phrase>{expression}</phrase>`; the answer is the
        first generated box (`result.boxes_for(expression)[0]`, or `result.entities[0]`)."""
        exprs = [expressions] if isinstance(expressions, str) else list(expressions)
        prompts = [
            f"{grounding.GROUNDING}{grounding.PHRASE_START}{e.strip()}{grounding.PHRASE_END}" for e in exprs
        ]
        return self._run(
            images, prompts[0] if isinstance(expressions, str) else prompts, {"max_new_tokens": 24}, options
        )

    def ground_phrases(
        self, image: Any, caption: str, phrases: Sequence[str | tuple[int, int]], **options: Any
    ):
        """Phrase grounding (Flickr30k Entities protocol).

        For each phrase of `caption` (a string, found from the left, or a (start, end) character span) the
        prompt is `<grounding>{caption before it} <phrase>{phrase}</phrase>`; returns one list of normalised
        boxes per phrase (empty when the model gave none).
        """
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

    def describe_region(self, images: Any, box: Sequence[float], normalized: bool = False, **options: Any):
        """Box in, text out: `<phrase> It</phrase><object>{box}</object> is` (SPEC §1).

        `box` is (x1, y1, x2, y2) in pixels of the original image, or in [0, 1] with normalized=True.
        """
        image_list, batched = _as_list(images)
        image_list = [load_image(im) for im in image_list]  # decoded once: its size and its pixels
        prompts = []
        for im in image_list:
            b = tuple(float(v) for v in box)
            if not normalized:
                b = grounding.box_to_normalized(b, *image_size(im))
            prompts.append(
                f"{grounding.PHRASE_START} It{grounding.PHRASE_END}{grounding.object_markup([b])} is"
            )
        return self._run(
            image_list if batched else image_list[0], prompts if batched else prompts[0], {}, options
        )

    def vqa(self, images: Any, question: str, grounded: bool = False, **options: Any):
        """`Question: {q} Answer:` (or `<grounding> Question: ...`), greedy; `result.answer` is the answer."""
        prompt = (
            f"{grounding.GROUNDING} Question: {question.strip()} Answer:"
            if grounded
            else (f"Question: {question.strip()} Answer:")
        )
        return self._run(images, prompt, {"max_new_tokens": 24}, options)
