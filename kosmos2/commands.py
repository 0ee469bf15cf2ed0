"""The inference subcommands: `kosmos2 ground`, `kosmos2 info`, `kosmos2 convert`.

Each parses its arguments and calls one typed function (`ground_images`, `describe_checkpoint`,
`convert_checkpoint`) that tests call directly. Heavy imports happen inside the functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from kosmos2 import runtime

TASKS = {
    "brief": "<grounding>An image of",
    "detailed": "<grounding>Describe this image in detail:",
    "caption": "An image of",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ground",
        help="ground images: caption + phrases + boxes",
        description="Generate grounded text for each image; print the caption with its entities and boxes.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--prompt", help="the prompt text (default: '<grounding>An image of')")
    group.add_argument("--task", choices=sorted(TASKS), help="a named task prompt instead of --prompt")
    group.add_argument("--locate", metavar="EXPRESSION", help="referring expression comprehension: find it")
    p.add_argument("--model", help="checkpoint directory (default: the built-in model or $KOSMOS2_MODEL)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image (JSON lines)")
    p.add_argument("--draw", metavar="OUT", help="write the image with its boxes (a .png file, or a folder)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--num-beams", type=int, default=None)
    p.add_argument("--sample", action="store_true", help="sample (top-p 0.9, temperature 0.7 by default)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    runtime.add_runtime_arguments(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=_ground_command)

    p = subparsers.add_parser(
        "draw",
        help="draw the boxes of a grounded text on an image",
        description="Parse grounded markup (model output or hand-written) and draw its boxes on the image.",
    )
    p.add_argument("image", help="image file")
    p.add_argument("text", help="grounded text, e.g. '<phrase>a ball</phrase><object><patch_index_0044>...'")
    p.add_argument("--out", "-o", required=True, help="the PNG to write")
    p.set_defaults(func=lambda a: print(draw_markup(a.image, a.text, a.out)))

    p = subparsers.add_parser("info", help="describe a checkpoint directory")
    p.add_argument("model", nargs="?", help="checkpoint directory (default: the built-in model)")
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
    options: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "num_beams": args.num_beams,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    if args.sample:
        options.update(
            do_sample=True,
            temperature=args.temperature or 0.7,
            top_p=args.top_p or 0.9,
        )
    prompt = TASKS[args.task] if args.task else args.prompt
    ground_images(
        args.images,
        prompt=prompt,
        expression=args.locate,
        model=args.model,
        as_json=args.json,
        draw=args.draw,
        dtype=args.dtype,
        batch_size=args.batch_size,
        options={k: v for k, v in options.items() if v is not None},
        threads=args.threads,
    )
    return 0


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
    threads: int | None = None,
) -> list[Any]:
    """Ground each image, print the results (text or JSON lines), optionally draw the boxes.

    dtype: float32 | bfloat16 | int8 (None: as the checkpoint); threads: None picks
    `kosmos2.runtime.default_threads()`."""
    from kosmos2.image import draw_boxes
    from kosmos2.predictor import PROMPT_BRIEF, Predictor

    out = out or sys.stdout
    for path in images:
        if not Path(path).is_file():
            raise SystemExit(f"kosmos2 ground: {path!r} is not a file; pass paths of image files")
    draw_targets = _draw_targets(images, draw) if draw else []
    runtime.set_threads(threads)
    predictor = Predictor.from_pretrained(model, dtype=dtype, batch_size=batch_size)
    options = options or {}
    results = []
    progress = _Progress(len(images), enabled=len(images) > 1)
    for start in range(0, len(images), batch_size):
        chunk = list(images[start : start + batch_size])
        if expression is not None:
            rs = predictor.locate(chunk, [expression] * len(chunk), **options)
        else:
            rs = predictor.ground(chunk, [prompt or PROMPT_BRIEF] * len(chunk), **options)
        for i, (path, r) in enumerate(zip(chunk, rs, strict=True)):
            if as_json:
                print(json.dumps({"image": str(path), **r.to_dict()}), file=out)
            else:
                print(_format(path, r), file=out)
            if draw_targets:
                draw_boxes(path, r.entities, out_path=draw_targets[start + i])
            results.append(r)
        progress.update(len(chunk))
    progress.close()
    return results


def draw_markup(image: str, text: str, out: str) -> str:
    """Parse grounded `text`, draw its entities' boxes on `image` into `out`; return the printed summary."""
    from types import SimpleNamespace

    from kosmos2 import grounding
    from kosmos2.image import draw_boxes, image_size, load_image

    picture = load_image(image)
    W, H = image_size(picture)
    parsed = grounding.parse(text)
    entities = [
        SimpleNamespace(
            phrase=e.phrase, span=e.span, pixel_boxes=[grounding.box_to_pixels(b, W, H) for b in e.boxes]
        )
        for e in parsed.entities
    ]
    draw_boxes(picture, entities, out_path=out)
    return _format(image, SimpleNamespace(caption=parsed.caption, entities=entities))


def _draw_targets(images: Sequence[str], draw: str) -> list[Path]:
    target = Path(draw)
    if len(images) == 1 and target.suffix.lower() == ".png":
        return [target]
    if target.suffix:
        raise SystemExit(
            f"kosmos2 ground: --draw {draw!r}: with several images give a folder, for one image a .png file"
        )
    target.mkdir(parents=True, exist_ok=True)
    stems = [Path(p).stem for p in images]
    if len(set(stems)) != len(stems):  # two images with the same name in different folders
        return [target / f"{i:05d}-{s}.png" for i, s in enumerate(stems)]
    return [target / f"{s}.png" for s in stems]


def _format(path: str, r: Any) -> str:
    lines = [f"{path}: {r.caption}"]
    for e in r.entities:
        boxes = "; ".join("(" + ", ".join(f"{v:.0f}" for v in b) + ")" for b in e.pixel_boxes)
        lines.append(f"  {e.phrase!r} [{e.span[0]}:{e.span[1]}] -> {boxes}")
    return "\n".join(lines)


class _Progress:
    """A one-line progress bar on stderr (images done / total, rate, ETA)."""

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
    import torch

    from kosmos2.config import Kosmos2Config
    from kosmos2.model import Kosmos2
    from kosmos2.predictor import default_model_dir
    from kosmos2.tokenizer import Kosmos2Tokenizer

    directory = Path(model) if model else default_model_dir()
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise SystemExit(f"kosmos2 info: {str(directory)!r} has no config.json; pass a checkpoint directory")
    config = Kosmos2Config.from_hf_config(json.loads(config_path.read_text()))
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Kosmos2(config).parameters())
    info: dict[str, Any] = {
        "directory": str(directory),
        "parameters": n_params,
        "vision": config.to_dict()["vision"],
        "text": config.to_dict()["text"],
        "latent_query_num": config.latent_query_num,
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
