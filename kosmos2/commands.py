"""The inference subcommands: `kosmos2 ground`, `kosmos2 zoom`, `kosmos2 info`, `kosmos2 convert`.

Each parses its arguments and calls one typed function (`ground_images`, `zoom_image`, `describe_checkpoint`,
`convert_checkpoint`) that tests call directly. Heavy imports happen inside the functions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from kosmos2 import runtime
from kosmos2.errors import UsageError, UserError

# --task NAME -> (prompt, the task's name in kosmos2.predictor.TASKS, which a model may not support)
ZOOM_TASKS = ("describe", "caption", "vqa", "grounded_vqa", "ocr")
OCR_MARGIN = 0.25  # `zoom --then ocr`: tesseract reads a tight crop best (the model's tasks get ZOOM_MARGIN)
TASKS = {
    "brief": ("<grounding>An image of", "grounded_caption"),
    "detailed": ("<grounding>Describe this image in detail:", "detailed_caption"),
    "caption": ("An image of", "caption"),
}
VERB = "kosmos2 ground"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def _float_in(low: float, high: float, low_open: bool = True):
    """An argparse type: a float in (low, high] (or [low, high] with low_open=False)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        inside = (value > low if low_open else value >= low) and value <= high
        if not (math.isfinite(value) and inside):
            bracket = "(" if low_open else "["
            where = f"be > {low:g}" if high == math.inf else f"lie in {bracket}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"{value:g} must {where}")
        return value

    return parse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ground",
        help="ground images: caption + phrases + boxes",
        description="Generate grounded text for each image; print the caption with its entities and boxes. "
        "A bad image is reported (as an error record under --json) and the others still run; the exit "
        "status is then 1.",
        epilog="Exit status: 0 every image done, 1 a bad image, model or task (one line each), 2 a bad "
        "argument (checked before any work). --debug shows tracebacks.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders of images")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--prompt", help="the prompt text (default: '<grounding>An image of')")
    group.add_argument(
        "--task",
        choices=sorted(TASKS),
        help="a named task prompt instead of --prompt: "
        + "; ".join(f"{k}: {v[0]!r}" for k, v in sorted(TASKS.items())),
    )
    group.add_argument("--locate", metavar="EXPRESSION", help="referring expression comprehension: find it")
    p.add_argument("--model", help="checkpoint directory (default: $KOSMOS2_MODEL, else the built-in model)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image (JSON lines)")
    p.add_argument(
        "--draw",
        metavar="OUT",
        help="write each image with its boxes: an image file (.png, .jpg, ...) for one image, else a folder",
    )
    p.add_argument(
        "--coco",
        metavar="OUT.json",
        help="write the boxes as COCO results JSON (image_id, category_id, bbox [x, y, w, h], score), and "
        "beside it OUT.dataset.json (images and categories) unless --coco-gt names the dataset",
    )
    p.add_argument(
        "--coco-gt",
        metavar="INSTANCES.json",
        help="a COCO annotation file: image ids from its file names, category ids from its names",
    )
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=None,
        help="most tokens to generate (default: model's)",
    )
    p.add_argument("--num-beams", type=_positive_int, default=None, help="beam search width (1: greedy)")
    p.add_argument("--sample", action="store_true", help="sample (top-p 0.9, temperature 0.7 by default)")
    p.add_argument(
        "--temperature", type=_float_in(0, math.inf), default=None, help="sampling temperature > 0 (--sample)"
    )
    p.add_argument(
        "--top-p", type=_float_in(0, 1), default=None, help="nucleus sampling mass in (0, 1] (--sample)"
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler, for repeatable --sample runs")
    runtime.add_runtime_arguments(p)
    p.add_argument("--device", default="cpu", help="torch device to run on: cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per forward pass (default: 8)")
    p.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=None,
        help="refuse images with more pixels, a guard against decompression bombs (default: 100,000,000)",
    )
    p.set_defaults(func=_ground_command)

    p = subparsers.add_parser(
        "zoom",
        help="crop-and-ask: locate an expression, crop around it, run a task on the crop",
        description="Locate EXPRESSION, crop around its box with a margin, and describe the crop, caption "
        "it, answer a question about it or read its text with tesseract (--then ocr). Boxes found in the "
        "crop are printed in the original image's pixels.",
    )
    p.add_argument("image", help="image file")
    p.add_argument("expression", help="what to zoom in on, e.g. 'the red sign'")
    p.add_argument("--then", choices=ZOOM_TASKS, default="describe", help="the task on the crop")
    p.add_argument("--question", help="the question for --then vqa / grounded_vqa")
    p.add_argument(
        "--margin",
        type=float,
        default=None,
        help="crop margin per side, a fraction of the box's size (default: 1.0; 0.25 for --then ocr)",
    )
    p.add_argument("--force", action="store_true", help="crop even when the expression is judged not found")
    p.add_argument("--crop", metavar="OUT.png", help="also write the crop")
    p.add_argument("--model", help="checkpoint directory (default: the built-in model or $KOSMOS2_MODEL)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    runtime.add_runtime_arguments(p)
    p.set_defaults(func=_zoom_command)

    p = subparsers.add_parser(
        "draw",
        help="draw the boxes of a grounded text on an image",
        description="Parse grounded markup (model output or hand-written) and draw its boxes on the image. "
        "Exit status 1, and nothing written, when the text has no valid box.",
    )
    p.add_argument("image", help="image file")
    p.add_argument("text", help="grounded text, e.g. '<phrase>a ball</phrase><object><patch_index_0044>...'")
    p.add_argument(
        "--out", "-o", required=True, help="the image to write (.png, .jpg, ...: any Pillow format)"
    )
    p.set_defaults(func=lambda a: print(draw_markup(a.image, a.text, a.out)))

    p = subparsers.add_parser("info", help="describe a checkpoint directory and check its weights")
    p.add_argument(
        "model", nargs="?", help="checkpoint directory (default: $KOSMOS2_MODEL, else the built-in)"
    )
    p.set_defaults(func=lambda a: print(json.dumps(describe_checkpoint(a.model), indent=2)))

    p = subparsers.add_parser(
        "convert",
        help="original release (kosmos-2.pt) -> Hugging Face layout",
        description="Convert the original fairseq/torchscale release into a Hugging Face layout directory.",
    )
    p.add_argument("checkpoint", help="kosmos-2.pt from the original release")
    p.add_argument("out", help="output directory")
    p.add_argument(
        "--sentencepiece", help="the release's sentencepiece.bpe.model, to add the tokenizer files"
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="convert the weights")
    p.add_argument("--preset", default="kosmos-2-patch14-224", help="the architecture of the checkpoint")
    p.add_argument(
        "--trust-pickle", action="store_true", help="allow the fairseq pickle (only for a file you trust)"
    )
    p.set_defaults(func=_convert_command)


# -- ground ----------------------------------------------------------------------------------------


def _ground_command(args: argparse.Namespace) -> int:
    from kosmos2.cli import debug_enabled

    if not args.sample:
        given = [
            n for n, v in (("--temperature", args.temperature), ("--top-p", args.top_p)) if v is not None
        ]
        if given:
            verb = "apply" if len(given) > 1 else "applies"
            raise UsageError(f"{' and '.join(given)} {verb} only to sampling; add --sample")
    elif args.num_beams is not None and args.num_beams > 1:
        raise UsageError(f"--sample with --num-beams {args.num_beams}: beam search does not sample; pick one")
    options: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "num_beams": args.num_beams,
        "seed": args.seed,
    }
    if args.sample:
        options.update(
            do_sample=True,
            temperature=0.7 if args.temperature is None else args.temperature,
            top_p=0.9 if args.top_p is None else args.top_p,
        )
    task = None
    prompt = args.prompt
    if args.task:
        prompt, task = TASKS[args.task]
    results = ground_images(
        args.images,
        prompt=prompt,
        expression=args.locate,
        model=args.model,
        as_json=args.json,
        draw=args.draw,
        dtype=args.dtype,
        batch_size=args.batch_size,
        options={k: v for k, v in options.items() if v is not None},
        device=args.device,
        max_pixels=args.max_pixels,
        task=task,
        task_flag=f"--task {args.task}" if args.task else None,
        debug=debug_enabled(args),
        coco=args.coco,
        coco_gt=args.coco_gt,
        threads=args.threads,
    )
    return 1 if any(isinstance(r, Failure) for r in results) else 0


@dataclass
class Failure:
    """An input that gave no result: its name as given and the one-line reason."""

    image: str
    error: str
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, str]:
        return {"image": self.image, "error": self.error}


def ground_images(
    images: Sequence[str],
    prompt: str | None = None,
    expression: str | None = None,
    model: str | None = None,
    as_json: bool = False,
    draw: str | None = None,
    dtype: str | None = None,
    batch_size: int = 8,
    options: dict[str, Any] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    device: str = "cpu",
    max_pixels: int | None = None,
    task: str | None = None,
    task_flag: str | None = None,
    debug: bool = False,
    coco: str | None = None,
    coco_gt: str | None = None,
    threads: int | None = None,
) -> list[Any]:
    """Ground each image (a folder stands for the images in it); print the results (text or JSON lines),
    optionally draw the boxes (labelled with their scores) and write COCO results JSON (`write_coco`).
    Returns one GroundingResult or Failure per image, in order.

    Every argument is checked before the model loads (prompt markup, --draw's folder); then a bad image is
    reported by name (on `err`, and as {"image", "error"} under as_json) and the others still run.
    task: the predictor's task name when a named task was asked for, refused if the model was not trained
    for it. dtype: float32 | bfloat16 | int8 (None: as the checkpoint); threads: None picks
    `kosmos2.runtime.default_threads()`.
    """
    from kosmos2 import grounding
    from kosmos2.image import DEFAULT_MAX_PIXELS, ImageError, draw_boxes, load_image
    from kosmos2.predictor import PROMPT_BRIEF, Predictor, _check_device

    out, err = out or sys.stdout, err or sys.stderr
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    _allow_pixels(max_pixels)
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be 1 or more")
    if expression is not None:
        _check_expression(expression)
        task, task_flag = "rec", task_flag or "--locate"
    elif prompt is None:
        prompt = PROMPT_BRIEF
    elif not prompt.strip():
        raise UsageError(
            f"--prompt {prompt!r} is empty; leave --prompt out for {PROMPT_BRIEF!r}, or give text"
        )
    else:
        try:
            grounding.check_prompt(prompt)
        except ValueError as e:
            raise UsageError(f"--prompt: {e}") from None
    _check_device(device)
    gt = read_coco_gt(coco_gt) if coco_gt else None
    inputs = expand_inputs(images)
    names = [name for name, _ in inputs]
    draw_targets = _draw_targets(names, draw) if draw else []
    failures = {i: Failure(name, problem) for i, (name, problem) in enumerate(inputs) if problem}
    results: list[Any] = []

    def report(failure: Failure) -> None:
        if debug and failure.exception is not None:
            traceback.print_exception(failure.exception, file=err)
        print(f"{VERB}: {failure.error}", file=err, flush=True)
        if as_json:
            print(json.dumps(failure.to_dict()), file=out, flush=True)
        results.append(failure)

    predictor = None
    if len(failures) < len(inputs):  # something to run: load the model (its errors end the command)
        runtime.set_threads(threads)
        predictor = Predictor.from_pretrained(model, dtype=dtype, device=device, batch_size=batch_size)
        if task is not None:
            try:
                predictor.check_task(task)
            except ValueError as e:
                raise type(e)(f"{task_flag}: {e}") from None
    progress = _Progress(len(inputs), enabled=len(inputs) > 1 and err.isatty())
    for start in range(0, len(inputs), batch_size):
        loaded: dict[int, Any] = {}
        for i in range(start, min(start + batch_size, len(inputs))):
            if i not in failures:
                try:
                    loaded[i] = load_image(inputs[i][0], max_pixels=max_pixels)
                except ImageError as e:
                    failures[i] = Failure(inputs[i][0], str(e), e)
        if loaded:
            pictures = list(loaded.values())
            if expression is not None:
                rs = predictor.locate(pictures, [expression] * len(pictures), **(options or {}))
            else:
                rs = predictor.ground(pictures, [prompt] * len(pictures), **(options or {}))
            done = dict(zip(loaded, rs, strict=True))
        else:
            done = {}
        for i in range(start, min(start + batch_size, len(inputs))):
            if i in failures:
                report(failures[i])
                continue
            path, r = names[i], done[i]
            if as_json:
                print(json.dumps({"image": path, **r.to_dict()}), file=out)
            else:
                print(_format(path, r), file=out)
            if draw_targets:
                try:
                    draw_boxes(loaded[i], r.entities, labels=_score_labels(r), out_path=draw_targets[i])
                except (OSError, ValueError) as e:
                    report(Failure(path, f"{path!r}: drawing to {str(draw_targets[i])!r} failed: {e}", e))
                    continue
            results.append(r)
        progress.update(min(batch_size, len(inputs) - start))
    progress.close()
    if coco:
        done = [(name, r) for name, r in zip(names, results, strict=True) if not isinstance(r, Failure)]
        write_coco([n for n, _ in done], [r for _, r in done], coco, gt)
    bad = sum(isinstance(r, Failure) for r in results)
    if bad and len(inputs) > 1:
        print(f"{VERB}: {bad} of {len(inputs)} images failed (named above)", file=err, flush=True)
    return results


def _score_labels(r: Any) -> list[str]:
    """Draw labels: the phrase and its boxes' scores ("a red ball 0.93")."""
    labels = []
    for e in r.entities:
        scores = [f"{s:.2f}" for s in getattr(e, "scores", []) if s is not None]
        labels.append(f"{e.phrase} {'/'.join(scores)}" if scores else e.phrase)
    return labels


def coco_results(
    images: Sequence[str], results: Sequence[Any], gt: dict[str, Any] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """COCO detection results for grounded results: one {"image_id", "category_id", "bbox": [x, y, w, h]
    in pixels, "score"} per box, and the dataset they refer to ({"images", "categories", "annotations": []},
    loadable by pycocotools' COCO, so that `COCO(dataset).loadRes(results)` works).

    Without `gt`, images are numbered 1.. in the given order and categories 1.. by first appearance of each
    phrase. With `gt` (a COCO annotation dict), image ids come from its file names (an image's base name)
    and category ids from its category names (matched after lower-casing and dropping a leading article);
    boxes whose phrase names no category are left out. A box without a score gets 1.0.
    """
    if gt is None:
        dataset: dict[str, Any] = {"images": [], "categories": [], "annotations": []}
        for n, (path, r) in enumerate(zip(images, results, strict=True), 1):
            w, h = r.image_size
            dataset["images"].append({"id": n, "file_name": Path(path).name, "width": w, "height": h})
        image_ids = list(range(1, len(images) + 1))
        names: dict[str, int] = {}
        for r in results:
            for e in r.entities:
                if e.pixel_boxes and e.phrase not in names:
                    names[e.phrase] = len(names) + 1
        dataset["categories"] = [{"id": i, "name": n} for n, i in names.items()]
        category = names.get
    else:
        dataset = gt
        by_file = {Path(im["file_name"]).name: im["id"] for im in gt.get("images", [])}
        missing = [p for p in images if Path(p).name not in by_file]
        if missing:
            raise UserError(
                f"--coco-gt has no image named {Path(missing[0]).name!r}; give the annotation file these "
                "images belong to"
            )
        image_ids = [by_file[Path(p).name] for p in images]
        by_name = {_category_key(c["name"]): c["id"] for c in gt.get("categories", [])}

        def category(phrase: str) -> int | None:
            return by_name.get(_category_key(phrase))

    rows = []
    for image_id, r in zip(image_ids, results, strict=True):
        for e in r.entities:
            cid = category(e.phrase)
            if cid is None:
                continue
            scores = list(getattr(e, "scores", []) or [])
            for j, (x1, y1, x2, y2) in enumerate(e.pixel_boxes):
                score = scores[j] if j < len(scores) and scores[j] is not None else 1.0
                rows.append(
                    {
                        "image_id": image_id,
                        "category_id": cid,
                        "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                        "score": round(float(score), 5),
                    }
                )
    return rows, dataset


def _category_key(name: str) -> str:
    words = name.lower().split()
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


def read_coco_gt(path: str) -> dict[str, Any]:
    """A COCO annotation file (images and categories), checked before any work."""
    try:
        gt = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"--coco-gt {path!r} is not a readable COCO JSON file ({e})") from None
    if not (
        isinstance(gt, dict) and isinstance(gt.get("images"), list) and isinstance(gt.get("categories"), list)
    ):
        raise UsageError(f"--coco-gt {path!r} needs 'images' and 'categories' lists (a COCO annotation file)")
    return gt


def write_coco(
    images: Sequence[str], results: Sequence[Any], out: str, gt: dict[str, Any] | str | None = None
) -> Path:
    """Write `coco_results` to `out` (and, without a ground-truth file, the dataset to OUT.dataset.json),
    each atomically. gt: a COCO annotation dict or the path of one."""
    from kosmos2.fileio import atomic_write_text

    if isinstance(gt, str):
        gt = read_coco_gt(gt)
    rows, dataset = coco_results(images, results, gt)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(rows) + "\n")
    if gt is None:
        atomic_write_text(target.with_suffix(".dataset.json"), json.dumps(dataset, indent=1) + "\n")
    return target


# -- zoom ----------------------------------------------------------------------------------------


def _zoom_command(args: argparse.Namespace) -> int:
    zoom_image(
        args.image,
        args.expression,
        then=args.then,
        question=args.question,
        margin=args.margin,
        force=args.force,
        crop=args.crop,
        model=args.model,
        as_json=args.json,
        dtype=args.dtype,
        threads=args.threads,
    )
    return 0


def zoom_image(
    image: str,
    expression: str,
    then: str = "describe",
    question: str | None = None,
    margin: float | None = None,
    force: bool = False,
    crop: str | None = None,
    model: str | None = None,
    as_json: bool = False,
    out: TextIO | None = None,
    dtype: str | None = None,
    threads: int | None = None,
) -> Any:
    """`Predictor.zoom` on one image file; prints what was found and the task's answer (or JSON)."""
    from kosmos2.predictor import ZOOM_MARGIN, GroundingResult, Predictor

    out = out or sys.stdout
    if not Path(image).is_file():
        raise UserError(f"{image!r} is not a file; pass the path of an image file")
    if then in ("vqa", "grounded_vqa") and not question:
        raise UsageError(f"--then {then} needs --question 'what to ask about the crop'")
    task: Any = then
    if then == "ocr":
        try:
            import pytesseract
        except ImportError:
            raise UserError("--then ocr needs pytesseract and tesseract: pip install pytesseract") from None

        def task(im: Any) -> str:
            return pytesseract.image_to_string(im).strip()

    runtime.set_threads(threads)
    predictor = Predictor.from_pretrained(model, dtype=dtype)
    z = predictor.zoom(
        image,
        expression,
        then=task,
        question=question,
        margin=(OCR_MARGIN if then == "ocr" else ZOOM_MARGIN) if margin is None else margin,
        force=force,
    )
    if crop and z.crop is not None:
        from kosmos2.fileio import atomic_write

        atomic_write(crop, lambda f: z.crop.save(f, format="PNG"))
    loc = z.located
    answer = z.result.answer if isinstance(z.result, GroundingResult) else z.result
    if as_json:
        record = {
            "image": image,
            "expression": expression,
            "found": loc.found,
            "found_score": loc.found_score,
            "ambiguous": loc.ambiguous,
            "box": loc.pixel_box,
            "crop_box": z.crop_box,
            "then": then,
            "answer": answer,
            "result": z.result.to_dict() if isinstance(z.result, GroundingResult) else None,
        }
        print(json.dumps(record, default=str), file=out)
        return z
    box = "none" if loc.pixel_box is None else "(" + ", ".join(f"{v:.0f}" for v in loc.pixel_box) + ")"
    print(f"{image}: {expression!r} -> {box}, found {loc.found} (score {loc.found_score:.2f})", file=out)
    if z.crop_box is None:
        print("  not cropped: the expression was judged not found (--force crops anyway)", file=out)
        return z
    print(f"  crop ({', '.join(f'{v:.0f}' for v in z.crop_box)}), {then}: {answer}", file=out)
    if isinstance(z.result, GroundingResult) and then == "caption":
        print(_format(image, z.result), file=out)
    return z


def _allow_pixels(max_pixels: int) -> None:
    """--max-pixels above Pillow's own hard limit (twice PIL.Image.MAX_IMAGE_PIXELS) raises that limit too:
    in a command-line process the user's limit is the one that counts."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels // 2 + 1


def expand_inputs(images: Sequence[str]) -> list[tuple[str, str | None]]:
    """(name, problem) for each image to run: a folder becomes the image files in it (by extension, sorted,
    hidden files skipped; not recursive); a folder without images is a problem. Other paths are left to
    `load_image`, which names what is wrong with them."""
    from PIL import Image

    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    inputs: list[tuple[str, str | None]] = []
    for name in images:
        path = Path(name)
        if not path.is_dir():
            inputs.append((str(name), None))
            continue
        found = sorted(
            str(f)
            for f in path.iterdir()
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in readable
        )
        if not found:
            inputs.append((str(name), f"{str(name)!r}: a folder with no image files (.png, .jpg, ...) in it"))
        inputs += [(f, None) for f in found]
    return inputs


def _check_expression(expression: str) -> None:
    from kosmos2 import grounding

    if not expression.strip():
        raise UsageError(f"--locate {expression!r} is empty; give the words of the thing to find")
    found = grounding.markup_problems(f"<grounding><phrase>{expression}</phrase>")
    tags = [m.group(0) for m in grounding._TAGLIKE_RE.finditer(expression)]
    kosmos = [t for t in tags if t in grounding.TAG_TOKENS or grounding._patch_index(t) is not None]
    if kosmos or found:
        what = f"contains the markup {kosmos[0]!r}" if kosmos else found[0][1]
        raise UsageError(f"--locate {expression!r}: {what}; give plain words (the phrase tags are added)")


def draw_markup(image: str, text: str, out: str) -> str:
    """Parse grounded `text`, draw its entities' boxes on `image` into `out` (any format Pillow writes);
    return the printed summary. Raises UserError, writing nothing, when the text holds no valid box; warns
    about markup problems when it holds some."""
    import warnings
    from types import SimpleNamespace

    from kosmos2 import grounding
    from kosmos2.image import image_size, load_image, save_format, write_image

    if save_format(out) is None:
        raise UsageError(
            f"--out {out!r}: not an image format Pillow writes; end it in .png, .jpg, .webp, ..."
        )
    if not Path(out).resolve().parent.is_dir():
        raise UsageError(
            f"--out {out!r}: the folder {str(Path(out).parent)!r} does not exist; create it first"
        )
    picture = load_image(image)
    W, H = image_size(picture)
    parsed = grounding.parse(text)
    problems = grounding.markup_problems(text, prompt=False)
    entities = [
        SimpleNamespace(
            phrase=e.phrase, span=e.span, pixel_boxes=[grounding.box_to_pixels(b, W, H) for b in e.boxes]
        )
        for e in parsed.entities
    ]
    shown = text if len(text) <= 80 else text[:77] + "..."
    if not entities:
        why = (
            f"at character {problems[0][0]}: {problems[0][1]}"
            if problems
            else "it has no <phrase>…</phrase><object><patch_index_…><patch_index_…></object> markup"
        )
        raise UserError(f"{shown!r} has no valid box to draw ({why}); nothing was written")
    for at, message in problems:
        warnings.warn(f"skipped at character {at}: {message}", UserWarning, stacklevel=2)
    from kosmos2.image import draw_boxes

    write_image(draw_boxes(picture, entities), out)
    return _format(image, SimpleNamespace(caption=parsed.caption, entities=entities))


def _draw_targets(images: Sequence[str], draw: str) -> list[Path]:
    """Where --draw writes each image; checked (and a target folder created) before any work."""
    from kosmos2.image import save_format

    target = Path(draw)
    if target.suffix and not target.is_dir():
        if save_format(target) is None:
            raise UsageError(
                f"--draw {draw!r}: {target.suffix} is not an image format Pillow writes; give a .png or "
                ".jpg file (one image) or a folder"
            )
        if len(images) != 1:
            raise UsageError(f"--draw {draw!r}: {len(images)} images need a folder, not one file")
        _check_folder(target.parent, draw)
        return [target]
    if target.exists() and not target.is_dir():
        raise UsageError(f"--draw {draw!r} is a file; give a folder for several images")
    _check_folder(target.parent, draw)
    target.mkdir(exist_ok=True)
    stems = [Path(p).stem for p in images]
    if len(set(stems)) != len(stems):  # two images with the same name in different folders
        return [target / f"{i:05d}-{s}.png" for i, s in enumerate(stems)]
    return [target / f"{s}.png" for s in stems]


def _check_folder(folder: Path, draw: str) -> None:
    import os

    folder = folder if str(folder) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"--draw {draw!r}: the folder {str(folder)!r} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--draw {draw!r}: the folder {str(folder)!r} is not writable")


def _format(path: str, r: Any) -> str:
    lines = [f"{path}: {r.caption}"]
    for e in r.entities:
        scores = list(getattr(e, "scores", None) or [None] * len(e.pixel_boxes))
        boxes = "; ".join(
            "(" + ", ".join(f"{v:.0f}" for v in b) + ")" + ("" if s is None else f" score {s:.2f}")
            for b, s in zip(e.pixel_boxes, scores, strict=False)
        )
        lines.append(f"  {e.phrase!r} [{e.span[0]}:{e.span[1]}] -> {boxes}")
    if getattr(r, "found", None) is not None:
        lines.append(
            f"  found {r.found} (score {r.found_score:.2f}), ambiguous {r.ambiguous} "
            f"(score {r.ambiguity_score:.2f}), {len(r.candidates)} candidate(s)"
        )
        for c in r.candidates:  # what to ask about when ambiguous, best first
            match = "" if getattr(c, "match", None) is None else f" match {c.match:.2f}"
            box = ", ".join(f"{v:.0f}" for v in c.pixel_box)
            lines.append(f"    candidate ({box}) score {c.score:.2f}{match}")
    return "\n".join(lines)


class _Progress:
    """A one-line progress bar on stderr (images done / total, rate, ETA); only on a terminal."""

    def __init__(self, total: int, enabled: bool):
        import time

        self.total, self.done, self.enabled, self.start, self._time = total, 0, enabled, time.time(), time
        self._draw()

    def update(self, n: int) -> None:
        self.done += n
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        elapsed = self._time.time() - self.start
        rate = self.done / elapsed if elapsed > 0 and self.done else 0.0
        eta = (self.total - self.done) / rate if rate else 0.0
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        print(
            f"\r[{bar}] {self.done}/{self.total} images  {rate:.2f} img/s  ETA {eta:.0f}s",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


# -- info / convert -------------------------------------------------------------------------------


def describe_checkpoint(model: str | None = None) -> dict[str, Any]:
    """What a checkpoint directory holds: config summary, parameter count, files, tokenizer layout."""
    import os

    import torch

    from kosmos2.checkpoint import check_weights
    from kosmos2.config import Kosmos2Config
    from kosmos2.model import Kosmos2
    from kosmos2.predictor import DEFAULT_MODEL_ENV, default_model_dir
    from kosmos2.tokenizer import Kosmos2Tokenizer

    directory = Path(model) if model else default_model_dir()
    named = (
        str(directory)
        if model or not os.environ.get(DEFAULT_MODEL_ENV)
        else f"${DEFAULT_MODEL_ENV}={directory}"
    )
    if not directory.is_dir():
        what = "is a file" if directory.exists() else "does not exist"
        raise UserError(
            f"{named!r} {what}; pass a checkpoint directory (config.json, model.safetensors, ...)"
        )
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(f"{named!r} has no config.json; pass a checkpoint directory")
    try:
        config = Kosmos2Config.from_hf_config(json.loads(config_path.read_text()))
    except (ValueError, TypeError, KeyError) as e:  # TypeError/KeyError: valid JSON of the wrong shape
        raise UserError(f"{config_path}: not a Kosmos-2 config.json ({type(e).__name__}: {e})") from None
    weights, n_tensors = check_weights(directory, config)  # every tensor present, of the config's shape
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Kosmos2(config).parameters())
    info: dict[str, Any] = {
        "directory": str(directory),
        "parameters": n_params,
        "vision": config.to_dict()["vision"],
        "text": config.to_dict()["text"],
        "latent_query_num": config.latent_query_num,
        "weights": f"{weights}: {n_tensors} tensors, shapes match config.json",
        "files": sorted(f"{p.name} ({p.stat().st_size:,} bytes)" for p in directory.iterdir() if p.is_file()),
    }
    try:
        tok = Kosmos2Tokenizer.from_pretrained(directory)
        info["tokenizer"] = {
            "vocab_size": tok.vocab_size,
            "image_start_id": tok.image_start_id,
            "patch_index_offset": tok.patch_index_offset,
        }
    except (FileNotFoundError, ValueError) as e:
        info["tokenizer"] = f"not loadable: {e}"
    else:
        if tok.vocab_size > config.text.vocab_size:
            raise UserError(
                f"{named!r}: the tokenizer has {tok.vocab_size} tokens but config.json's vocab_size is "
                f"{config.text.vocab_size}; the tokenizer files do not belong to these weights"
            )
    return info


def _convert_command(args: argparse.Namespace) -> int:
    convert_checkpoint(
        args.checkpoint, args.out, args.sentencepiece, args.dtype, args.trust_pickle, args.preset
    )
    print(f"wrote {args.out}")
    return 0


def convert_checkpoint(
    checkpoint: str,
    out: str,
    sentencepiece: str | None = None,
    dtype: str | None = None,
    trust_pickle: bool = False,
    preset: str = "kosmos-2-patch14-224",
) -> Path:
    """Original release -> Hugging Face layout directory (+ tokenizer files from the SentencePiece model)."""
    import shutil

    import torch

    from kosmos2.checkpoint import convert_original
    from kosmos2.config import Kosmos2Config
    from kosmos2.tokenizer import Kosmos2Tokenizer

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}
    config = Kosmos2Config.from_preset(preset)
    convert_original(checkpoint, out, config=config, dtype=dtypes[dtype], trust_pickle=trust_pickle)
    if sentencepiece:
        shutil.copy(sentencepiece, Path(out) / "sentencepiece.bpe.model")
        Kosmos2Tokenizer.from_pretrained(out).save_pretrained(out)
    return Path(out)
