"""Image input for Kosmos-2: load and validate, preprocess to pixel values, draw boxes (SPEC §5).

    source ──load_image──► RGB PIL image (original size) ──preprocess──► FloatTensor[B, 3, 224, 224]
                                  │
                                  └── image_size() gives (width, height) for turning boxes into pixels

Preprocessing is what the released checkpoint saw at evaluation: resize straight to 224×224 (no crop, the
aspect ratio is not kept) with Pillow's bicubic filter on 8-bit RGB, scale to [0, 1], normalise with the CLIP
mean and std. It matches the image processor that transformers' `Kosmos2Processor` uses when torchvision is
absent (`CLIPImageProcessorPil` with `use_square_size=True`, resample 3), which resizes with Pillow as the
original demo did.

Decisions a user should know about, all made in `load_image`:

- Transparency is composited onto a white background (what transformers 5.x does, and what an image viewer
  shows). transformers 4.x and the original demo drop the alpha channel instead, which exposes whatever colour
  is stored under transparent pixels (often black). This applies to every mode with an alpha band (RGBA, LA,
  PA, premultiplied RGBa/La) and to palette, grey and RGB images with a transparency entry.
- EXIF orientation is applied (`ImageOps.exif_transpose`), so a phone photo is seen upright and boxes come
  back in the coordinates of the image as viewers display it. The reference implementations ignore the tag;
  pass `exif_orientation=False` to reproduce them exactly. An unreadable EXIF block is ignored.
- Animated images (GIF, WebP, APNG) use their first frame. A PIL image passed in is used at its current frame.
- Other modes become RGB by their meaning, not by clipping: 1 → black/white; L, P, CMYK, YCbCr, HSV by
  Pillow's conversion; 16-bit grey (I;16*) and 32-bit integer (I) images are read as 0…65535 and scaled to
  8 bits (v / 257, rounded; Pillow's own conversion would clip them to 255); 32-bit float (F) images are read
  as 0…1. Integer values outside 0…65535 and float values outside 0…1 are refused, not clipped.
- numpy arrays: H×W, H×W×1 (grey), H×W×3 (RGB), H×W×4 (RGBA); dtype uint8 (0…255) or float16/32/64 in
  [0, 1] (scaled by 255 and rounded to 8 bits). Other dtypes, channels-first and batched arrays are refused
  with a hint.
- Images with more than `max_pixels` pixels (default `DEFAULT_MAX_PIXELS`, 100 megapixels) are refused before
  they are decoded (decompression bombs). Pillow's own limit still applies on top: it refuses files over twice
  `PIL.Image.MAX_IMAGE_PIXELS` (about 179 megapixels); raise that value to go beyond it.

Every bad input raises `ImageError` (a `ValueError`), whose message names the input, says what is wrong and
what to do. torch is imported only by `preprocess`.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from kosmos2.errors import UserError
from kosmos2.fileio import atomic_write

if TYPE_CHECKING:
    import torch

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MAX_PIXELS",
    "ImageError",
    "ImageSource",
    "draw_boxes",
    "image_size",
    "load_image",
    "preprocess",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_PIXELS = 100_000_000

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image | np.ndarray


class ImageError(UserError, ValueError):
    """An image cannot be used: missing, unreadable, corrupt, empty, too large or of an unsupported kind."""


# ------------------------------------------------------------------------------------------------------------
# Loading


def load_image(
    source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS, *, exif_orientation: bool = True
) -> Image.Image:
    """Return `source` as a new RGB PIL image at its original size (see the module docstring for the rules).

    source: a file path (str or os.PathLike), the encoded file as bytes, a binary file object, a PIL image
    or a numpy array. max_pixels: refuse images with more pixels than this (None: no limit of ours).
    exif_orientation: apply the EXIF orientation tag. Raises ImageError for every bad input.
    """
    if max_pixels is not None and (
        isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1
    ):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")

    if isinstance(source, Image.Image):
        name = f"PIL image (mode {source.mode}, {source.width}x{source.height})"
        _check_size(source.size, name, max_pixels)
        try:
            source.load()  # a lazily opened image decodes here; a truncated file fails here
        except Exception as e:
            raise ImageError(
                f"{name}: could not be decoded ({e}); the file it came from is corrupt or truncated"
            ) from e
        return _to_rgb(source, name, exif_orientation)

    if isinstance(source, np.ndarray):
        name = f"numpy array (shape {source.shape}, dtype {source.dtype})"
        image = _array_to_image(source, name)
        _check_size(image.size, name, max_pixels)
        return _to_rgb(image, name, exif_orientation=False)  # arrays carry no EXIF

    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return _decode(io.BytesIO(data), f"bytes ({len(data)} bytes)", max_pixels, exif_orientation)

    if isinstance(source, (str, os.PathLike)):
        return _decode_path(source, max_pixels, exif_orientation)

    if hasattr(source, "read"):
        name = f"file object {getattr(source, 'name', type(source).__name__)!r}"
        if isinstance(source, io.TextIOBase):
            raise ImageError(f"{name}: opened in text mode; open image files with mode 'rb'")
        try:
            data = source.read()
        except Exception as e:
            raise ImageError(
                f"{name}: reading failed ({e}); pass an open binary file, a path or bytes"
            ) from e
        if isinstance(data, str):
            raise ImageError(f"{name}: opened in text mode; open image files with mode 'rb'")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ImageError(
                f"{name}: read() returned {type(data).__name__}, not bytes; pass a binary file object"
            )
        return _decode(io.BytesIO(bytes(data)), name, max_pixels, exif_orientation)

    kind = f"{type(source).__module__}.{type(source).__qualname__}"
    if kind.startswith("torch."):
        raise ImageError(
            f"{kind}: tensors are not accepted as images (their layout and range are ambiguous); pass "
            "tensor.permute(1, 2, 0).cpu().numpy() for a CxHxW tensor in [0, 1], or a PIL image"
        )
    raise ImageError(
        f"{kind}: not an image source; pass a file path, bytes, a binary file object, a PIL image "
        "or a numpy array"
    )


def _decode_path(path: str | os.PathLike, max_pixels: int | None, exif_orientation: bool) -> Image.Image:
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    name = repr(text)
    if text.startswith(("http://", "https://")):
        raise ImageError(f"{name}: URLs are not downloaded; fetch the file first and pass its local path")
    file = Path(text).expanduser()
    if not file.exists():
        raise ImageError(f"{name}: no such file; check the path")
    if file.is_dir():
        raise ImageError(f"{name}: is a directory, not an image file")
    try:
        f = open(file, "rb")  # closed below; Pillow reads lazily, the header first
    except OSError as e:
        raise ImageError(f"{name}: cannot be read ({e.strerror or e}); check its permissions") from e
    with f:
        return _decode(f, name, max_pixels, exif_orientation)


def _decode(fp: BinaryIO, name: str, max_pixels: int | None, exif_orientation: bool) -> Image.Image:
    """Decode an encoded image from a seekable binary stream; only the first frame of an animation."""
    head = fp.read(16)
    fp.seek(0)
    if not head:
        raise ImageError(f"{name}: empty (0 bytes); the file is not an image or was not fully written")
    # Our own pixel limit replaces Pillow's warning; Pillow's hard error (over twice its limit) is translated.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(fp)  # reads the header only
        except Image.DecompressionBombError as e:
            raise ImageError(
                f"{name}: refused by Pillow as a possible decompression bomb ({e}); downscale the image, or "
                "if you trust it raise the limits: --max-pixels N on the command line; in Python "
                "PIL.Image.MAX_IMAGE_PIXELS (Pillow refuses twice that) and max_pixels"
            ) from e
        except Image.UnidentifiedImageError as e:
            raise ImageError(
                f"{name}: not a recognised image format, or its header is cut short (starts {head[:8]!r}); "
                "pass a PNG, JPEG, GIF, WebP, BMP or TIFF file"
            ) from e
        except Exception as e:
            raise ImageError(
                f"{name}: the image header is corrupt ({e}); re-export or re-download the file"
            ) from e
        with image:
            _check_size(image.size, name, max_pixels)
            try:
                image.load()  # decodes frame 0; truncated or corrupt data fails here
            except Exception as e:
                raise ImageError(
                    f"{name}: corrupt or truncated {image.format} data ({e}); "
                    "re-export or re-download the file"
                ) from e
            return _to_rgb(image, name, exif_orientation)


def _check_size(size: tuple[int, int], name: str, max_pixels: int | None) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: has no pixels ({w}x{h}); pass a non-empty image")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(
            f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} (a guard against "
            "decompression bombs); downscale the image, or if you trust it raise the limit: max_pixels= in "
            "Python, --max-pixels N on the command line"
        )


def _array_to_image(array: np.ndarray, name: str) -> Image.Image:
    """H×W, H×W×1, H×W×3 or H×W×4 uint8 or [0, 1] float array -> L, RGB or RGBA PIL image."""
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        channels = array.shape[2]
    elif array.ndim == 2:
        channels = 1
    elif array.ndim == 3 and array.shape[0] in (1, 3, 4):
        raise ImageError(f"{name}: looks channels-first; pass array.transpose(1, 2, 0) (H x W x C)")
    elif array.ndim == 4:
        raise ImageError(f"{name}: a batch of images; pass a list of H x W x C arrays instead")
    else:
        raise ImageError(f"{name}: expected H x W, H x W x 1, H x W x 3 or H x W x 4")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"{name}: has no pixels; pass a non-empty image")

    if array.dtype == np.uint8:
        pixels = array
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError(f"{name}: contains NaN or infinity")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            hint = "; for 0-255 data pass array.astype(np.uint8)" if high <= 255.0 and low >= 0.0 else ""
            raise ImageError(f"{name}: float values must lie in [0, 1], found [{low:g}, {high:g}]{hint}")
        # Round to the nearest 8-bit level (a value that came from uint8 / 255 comes back exactly).
        pixels = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise ImageError(
            f"{name}: dtype {array.dtype} is not accepted; pass uint8 (0-255) or float in [0, 1] "
            "(for 16-bit data: (array / 257).round().astype(np.uint8))"
        )

    pixels = np.ascontiguousarray(pixels)
    if channels == 1:
        return Image.fromarray(pixels.reshape(pixels.shape[0], pixels.shape[1]), mode="L")
    return Image.fromarray(pixels, mode="RGB" if channels == 3 else "RGBA")


def _to_rgb(image: Image.Image, name: str, exif_orientation: bool) -> Image.Image:
    """Any-mode PIL image -> a new RGB image: EXIF orientation, transparency over white, 16-bit scaled."""
    if exif_orientation:
        # a broken EXIF block only loses the orientation hint; the pixels are fine
        with contextlib.suppress(Exception):
            image = ImageOps.exif_transpose(image)

    mode = image.mode
    if mode in ("RGBa", "La"):  # premultiplied alpha: undo the premultiplication first
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode.startswith("I;16"):
        image = image.convert("I")  # keeps the 16-bit values (0-65535)
        mode = "I"

    if mode == "I":
        values = np.asarray(image, dtype=np.int64)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ImageError(
                f"{name}: 32-bit integer values must lie in 0-65535 (16-bit), found [{low}, {high}]"
            )
        grey = np.rint(values / 257.0).astype(np.uint8)  # 65535 -> 255, 257·v -> v
        rgb = Image.fromarray(grey, mode="L").convert("RGB")
    elif mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all() or values.min() < 0.0 or values.max() > 1.0:
            raise ImageError(
                f"{name}: float (mode F) values must be finite and lie in [0, 1], found "
                f"[{values.min():g}, {values.max():g}]; rescale the image to [0, 1]"
            )
        grey = np.rint(values * 255.0).astype(np.uint8)
        rgb = Image.fromarray(grey, mode="L").convert("RGB")
    elif "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
    else:
        try:
            rgb = image.convert("RGB")
        except Exception as e:
            raise ImageError(
                f"{name}: mode {mode} cannot be converted to RGB ({e}); save it as RGB first"
            ) from e

    if rgb is image:  # never hand back the caller's own object
        rgb = rgb.copy()
    rgb.info = {}  # metadata (EXIF, ICC, transparency) no longer describes these pixels
    return rgb


def image_size(image: Image.Image | np.ndarray) -> tuple[int, int]:
    """(width, height) of an image, for turning normalised boxes into pixels.

    Call it on the image `load_image` returned: after EXIF orientation that is the size boxes refer to.
    """
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, np.ndarray) and image.ndim in (2, 3):
        return int(image.shape[1]), int(image.shape[0])
    raise ImageError(
        f"{type(image).__name__}: image_size needs a PIL image or an H x W (x C) array; load it first"
    )


# ------------------------------------------------------------------------------------------------------------
# Preprocessing


def preprocess(
    images: ImageSource | Sequence[ImageSource],
    size: int = 224,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """One image or a list of images -> pixel values FloatTensor[B, 3, size, size] (SPEC §5).

    Each image goes through `load_image` (an image it returned passes unchanged), is resized straight to
    size×size with Pillow's bicubic filter on 8-bit RGB, scaled to [0, 1] and normalised with the CLIP
    mean and std.
    """
    import torch

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    batch = list(images) if isinstance(images, (list, tuple)) else [images]
    if not batch:
        raise ImageError("empty list: preprocess needs at least one image")

    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    out = np.empty((len(batch), 3, size, size), dtype=np.float32)
    for i, source in enumerate(batch):
        image = load_image(source, max_pixels=max_pixels)  # a copy; an RGB image from load_image is unchanged
        resized = image.resize((size, size), resample=Image.Resampling.BICUBIC)
        x = np.asarray(resized, dtype=np.uint8)  # (size, size, 3), 8-bit like the reference
        # Scale in float64, normalise in float32: the reference's order of operations (bitwise agreement).
        x = (x.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
        x = (x - mean) / std  # (size, size, 3)
        out[i] = x.transpose(2, 0, 1)  # -> (3, size, size)
    return torch.from_numpy(out)


# ------------------------------------------------------------------------------------------------------------
# Drawing

# Distinct, saturated colours that stay readable with white or black label text.
_PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
    (0, 0, 128),
]


def draw_boxes(
    image: ImageSource,
    entities_or_boxes: Sequence[Any],
    labels: Sequence[str] | None = None,
    out_path: str | os.PathLike | None = None,
) -> Image.Image:
    """Draw coloured, labelled boxes on the original image; write it atomically if out_path is given, in the
    format its extension names (.png, .jpg, .webp, ... any format Pillow writes).

    entities_or_boxes: pixel boxes (x1, y1, x2, y2) on the original image, or entities: objects with
    `pixel_boxes` (pixel coordinates, as the predictor returns) or with `boxes` normalised to [0, 1]
    (`grounding.Entity`); an entity's phrase is its default label and all its boxes share its colour.
    labels: one per item (None: the entity phrases, or none for plain boxes). Returns the drawn RGB image.
    """
    canvas = load_image(image)
    width, height = canvas.size
    items = list(entities_or_boxes)
    if labels is not None and len(labels) != len(items):
        raise ValueError(
            f"labels has {len(labels)} entries for {len(items)} boxes or entities; give one per item"
        )

    groups: list[tuple[list[tuple[float, float, float, float]], str | None]] = []
    for i, item in enumerate(items):
        if hasattr(item, "pixel_boxes"):
            boxes = [_as_box(b, i) for b in item.pixel_boxes]
        elif hasattr(item, "boxes"):  # normalised boxes -> pixels
            boxes = [_scale_box(_as_box(b, i), width, height) for b in item.boxes]
        else:
            boxes = [_as_box(item, i)]
        label = labels[i] if labels is not None else getattr(item, "phrase", None)
        groups.append((boxes, label))

    line = max(2, round(min(width, height) / 150))
    font = ImageFont.load_default(size=max(10, round(min(width, height) / 30)))
    draw = ImageDraw.Draw(canvas)
    for i, (boxes, label) in enumerate(groups):
        colour = _PALETTE[i % len(_PALETTE)]
        for x1, y1, x2, y2 in boxes:
            x1, x2 = sorted((min(max(x1, 0.0), width - 1.0), min(max(x2, 0.0), width - 1.0)))
            y1, y2 = sorted((min(max(y1, 0.0), height - 1.0), min(max(y2, 0.0), height - 1.0)))
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
            if label:
                _draw_label(draw, font, label, colour, x1, y1, width)

    if out_path is not None:
        write_image(canvas, out_path)
    return canvas


def _as_box(value: Any, index: int) -> tuple[float, float, float, float]:
    try:
        box = tuple(float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"item {index}: a box must be 4 numbers (x1, y1, x2, y2), got {value!r}") from e
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise ValueError(f"item {index}: a box must be 4 finite numbers (x1, y1, x2, y2), got {value!r}")
    return box  # type: ignore[return-value]


def _scale_box(
    box: tuple[float, float, float, float], width: int, height: int
) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    return x1 * width, y1 * height, x2 * width, y2 * height


def _draw_label(
    draw: ImageDraw.ImageDraw,
    font: Any,
    text: str,
    colour: tuple[int, int, int],
    x: float,
    y: float,
    width: int,
) -> None:
    """Label in a filled tab above the box's top-left corner (inside the box when there is no room above)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = 2
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    x0 = min(x, max(0.0, width - w))
    y0 = y - h if y - h >= 0 else y
    draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    ink = (0, 0, 0) if luminance > 150 else (255, 255, 255)
    draw.text((x0 + pad - left, y0 + pad - top), text, fill=ink, font=font)


def save_format(path: str | os.PathLike) -> str | None:
    """The Pillow format that writes `path` by its extension ("PNG" for x.png, "JPEG" for x.jpg), or None."""
    name = Image.registered_extensions().get(Path(path).suffix.lower())
    return name if name in Image.SAVE else None


def write_image(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write `image` in the format of `path`'s extension; readers never see a half-written file (temporary
    file + rename). Raises ImageError for an extension Pillow does not write or a format that cannot hold the
    image."""
    path = Path(path)
    fmt = save_format(path)
    if fmt is None:
        raise ImageError(
            f"{str(path)!r}: {path.suffix or 'no extension'} is not an image format Pillow writes; end the "
            "name in .png, .jpg, .webp, .bmp, .tiff or .gif"
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"{str(path)!r}: the folder {str(path.parent)!r} does not exist; create it first"
        )
    try:
        atomic_write(path, lambda f: image.save(f, format=fmt))
    except (OSError, ValueError, KeyError) as e:
        raise ImageError(f"{str(path)!r}: Pillow cannot write this image as {fmt} ({e}); try .png") from e
    return path
