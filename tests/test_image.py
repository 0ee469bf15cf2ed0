"""Tests for kosmos2/image.py: loading rules, bad input, preprocessing against transformers, drawing, example.

Expected values come from transformers' image processor (the reference, built locally with the Kosmos-2
settings), from arithmetic worked out by hand, or from Pillow's own conversions; never from kosmos2 itself.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kosmos2.image import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MAX_PIXELS,
    ImageError,
    draw_boxes,
    image_size,
    load_image,
    preprocess,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MEAN = np.asarray(CLIP_MEAN, dtype=np.float64)
STD = np.asarray(CLIP_STD, dtype=np.float64)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rgb_of(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (8-bit grey) but which carries no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------------------------------
# Sources


def test_sources_all_give_the_same_rgb_image(tmp_path):
    image = random_image(30, 20)
    data = encode(image)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    expected = np.asarray(image)
    for source in (
        str(path),
        path,
        data,
        bytearray(data),
        memoryview(data),
        io.BytesIO(data),
        image,
        expected,
    ):
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (30, 20)
        np.testing.assert_array_equal(rgb_of(out), expected)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(rgb_of(load_image(f)), expected)


def test_load_image_returns_a_new_image_and_leaves_the_input_alone():
    image = random_image(8, 8, "RGBA")
    before = np.asarray(image).copy()
    out = load_image(image)
    assert out is not image and image.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(image), before)
    rgb = random_image(8, 8)
    assert load_image(rgb) is not rgb


# ----------------------------------------------------------------------------------------------------
# Mode conversions, worked out by hand


def test_mode_1_is_black_and_white():
    image = Image.new("1", (2, 1))
    image.putpixel((1, 0), 1)
    np.testing.assert_array_equal(rgb_of(load_image(image)), [[[0, 0, 0], [255, 255, 255]]])


def test_mode_la_is_composited_onto_white():
    # out = a/255·L + (1 − a/255)·255:  (100, 0) → 255;  (100, 255) → 100;  (0, 128) → 127;  (200, 51) → 244
    image = Image.new("LA", (4, 1))
    for x, value in enumerate([(100, 0), (100, 255), (0, 128), (200, 51)]):
        image.putpixel((x, 0), value)
    out = rgb_of(load_image(image))
    np.testing.assert_array_equal(out[0, :, 0], [255, 100, 127, 244])
    assert (out == out[..., :1]).all()  # grey stays grey


def test_rgba_is_composited_onto_white():
    # (255, 0, 0) at alpha 51 (20%): R = 255, G = B = 0.8·255 = 204;  fully transparent black → white
    array = np.array([[[255, 0, 0, 51], [0, 0, 0, 0], [10, 20, 30, 255]]], dtype=np.uint8)
    np.testing.assert_array_equal(
        rgb_of(load_image(Image.fromarray(array, "RGBA"))), [[[255, 204, 204], [255, 255, 255], [10, 20, 30]]]
    )
    np.testing.assert_array_equal(
        rgb_of(load_image(array)), [[[255, 204, 204], [255, 255, 255], [10, 20, 30]]]
    )


def test_premultiplied_rgba_is_composited_onto_white():
    # premultiplied (50, 0, 0) at alpha 128: over white = c + 255·(1 − 128/255) = c + 127
    image = Image.new("RGBa", (1, 1), (50, 0, 0, 128))
    r, g, b = rgb_of(load_image(image))[0, 0].astype(int)
    assert abs(r - 177) <= 1 and abs(g - 127) <= 1 and abs(b - 127) <= 1


def test_transparency_entries_of_palette_and_rgb_images_become_white():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    np.testing.assert_array_equal(rgb_of(load_image(palette)), [[[255, 255, 255], [0, 0, 255]]])

    rgb = Image.fromarray(np.array([[[255, 0, 0], [0, 255, 0]]], dtype=np.uint8))
    rgb.info["transparency"] = (255, 0, 0)
    np.testing.assert_array_equal(rgb_of(load_image(rgb)), [[[255, 255, 255], [0, 255, 0]]])


def test_cmyk_uses_the_ink_formula():
    # R = (255 − C)(255 − K)/255 and likewise G from M, B from Y
    cases = {(0, 255, 0, 0): (255, 0, 255), (255, 0, 0, 0): (0, 255, 255), (0, 0, 0, 128): (127, 127, 127)}
    for cmyk, expected in cases.items():
        assert tuple(rgb_of(load_image(Image.new("CMYK", (1, 1), cmyk)))[0, 0]) == expected


def test_16_bit_grey_is_scaled_not_clipped():
    # v / 257 rounded: 0 → 0, 128·257 → 128, 65535 → 255, 1000 → 3.89 → 4
    values = np.array([[0, 128 * 257, 65535, 1000]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    np.testing.assert_array_equal(rgb_of(load_image(image))[0, :, 0], [0, 128, 255, 4])
    # and through a real 16-bit PNG file
    np.testing.assert_array_equal(rgb_of(load_image(encode(image)))[0, :, 1], [0, 128, 255, 4])


def test_32_bit_modes():
    integers = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.int32))
    assert integers.mode == "I"
    np.testing.assert_array_equal(rgb_of(load_image(integers))[0, :, 2], [0, 1, 255])
    floats = Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32))
    assert floats.mode == "F"
    np.testing.assert_array_equal(rgb_of(load_image(floats))[0, :, 0], [0, 64, 255])  # 63.75 → 64
    with pytest.raises(ImageError, match=r"PIL image \(mode I.*0-65535"):
        load_image(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)))
    with pytest.raises(ImageError, match=r"PIL image \(mode F.*\[0, 1\]"):
        load_image(Image.fromarray(np.array([[0.0, 2.0]], dtype=np.float32)))


def test_numpy_layouts():
    grey = np.array([[0, 128]], dtype=np.uint8)
    for array in (grey, grey[..., None]):
        np.testing.assert_array_equal(rgb_of(load_image(array)), [[[0, 0, 0], [128, 128, 128]]])
    colour = np.array([[[1, 2, 3]]], dtype=np.uint8)
    np.testing.assert_array_equal(rgb_of(load_image(colour)), colour)


def test_numpy_float_arrays_in_0_1_round_to_8_bits():
    pixels = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for dtype in (np.float16, np.float32, np.float64):
        floats = pixels.astype(dtype) / dtype(255)
        np.testing.assert_array_equal(rgb_of(load_image(floats)), pixels)


def test_exif_orientation_is_applied_by_default():
    # 40 wide x 20 high, bottom-left pixel green; orientation 6 means "rotate 90° clockwise to display",
    # which turns it into 20 x 40 with that pixel at the top-left.
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.putpixel((0, 19), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(image, "PNG", exif=exif)
    upright = load_image(data)
    assert upright.size == (20, 40)
    assert upright.getpixel((0, 0)) == (0, 255, 0)
    assert image_size(upright) == (20, 40)
    raw = load_image(data, exif_orientation=False)
    assert raw.size == (40, 20) and raw.getpixel((0, 19)) == (0, 255, 0)
    with Image.open(io.BytesIO(data)) as opened:  # a PIL image carrying the tag is treated the same way
        assert load_image(opened).size == (20, 40)


def test_animated_images_use_the_first_frame():
    frames = [Image.new("RGB", (6, 4), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    for fmt, kwargs in [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})]:
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kwargs)
        with Image.open(io.BytesIO(data)) as opened:
            assert getattr(opened, "n_frames", 1) == 3, fmt
        out = load_image(data)
        assert out.size == (6, 4)
        assert out.getpixel((3, 2)) == (255, 0, 0), fmt


def test_image_size():
    assert image_size(Image.new("RGB", (7, 3))) == (7, 3)
    assert image_size(np.zeros((3, 7, 3), dtype=np.uint8)) == (7, 3)
    with pytest.raises(ImageError, match="str"):
        image_size("a.png")


# ----------------------------------------------------------------------------------------------------
# Bad input: always ImageError, naming the input


def test_missing_path_directory_and_url(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match=r"nope\.jpg.*no such file"):
        load_image(missing)
    with pytest.raises(ImageError, match="directory"):
        load_image(str(tmp_path))
    with pytest.raises(ImageError, match=r"https://example\.org/a\.png.*not downloaded"):
        load_image("https://example.org/a.png")


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("a dog and a cat\n")
    with pytest.raises(ImageError, match=r"notes\.txt.*not a recognised image format"):
        load_image(path)
    with pytest.raises(ImageError, match=r"bytes \(16 bytes\).*not a recognised image format"):
        load_image(b"a dog and a cat\n")


def test_empty_file_and_bytes(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png.*empty"):
        load_image(path)
    with pytest.raises(ImageError, match=r"bytes \(0 bytes\).*empty"):
        load_image(b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF"])
def test_truncated_files(tmp_path, fmt):
    data = encode(random_image(64, 64), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=rf"cut\.{fmt.lower()}.*(truncated|corrupt)"):
        load_image(path)
    with pytest.raises(ImageError, match=rf"bytes \({len(data) // 2} bytes\)"):
        load_image(data[: len(data) // 2])


def test_corrupt_png_data():
    data = bytearray(encode(random_image(64, 64)))
    middle = len(data) // 2
    data[middle : middle + 64] = b"\xff" * 64
    with pytest.raises(ImageError, match=r"bytes \(\d+ bytes\).*corrupt"):
        load_image(bytes(data))


def test_header_without_pixels_is_truncated():
    with pytest.raises(ImageError, match=r"bytes \(\d+ bytes\).*truncated"):
        load_image(png_header_only(8, 8))


def test_zero_sized_images():
    with pytest.raises(ImageError, match=r"PIL image \(mode RGB, 0x5\).*no pixels"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match=r"numpy array \(shape \(0, 4, 3\).*no pixels"):
        load_image(np.zeros((0, 4, 3), dtype=np.uint8))


def test_pixel_limit_is_configurable():
    data = encode(random_image(20, 10))
    with pytest.raises(ImageError, match=r"bytes \(\d+ bytes\).*20x10 = 200 pixels exceeds the limit of 199"):
        load_image(data, max_pixels=199)
    with pytest.raises(ImageError, match=r"max_pixels= in Python, --max-pixels N on the command line"):
        load_image(data, max_pixels=199)  # the advice names both ways of raising the limit
    assert load_image(data, max_pixels=200).size == (20, 10)
    with pytest.raises(ImageError, match="PIL image.*exceeds"):
        load_image(random_image(20, 10), max_pixels=100)
    with pytest.raises(ImageError, match="numpy array.*exceeds"):
        load_image(np.zeros((10, 20, 3), dtype=np.uint8), max_pixels=100)
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(data, max_pixels=0)
    assert load_image(data, max_pixels=None).size == (20, 10)


def test_decompression_bombs_are_refused_before_decoding_without_pillow_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning (e.g. Pillow's DecompressionBombWarning) fails the test
        # Declared 12000 x 10000 = 120 megapixels: over our default limit, over Pillow's warning threshold.
        big = png_header_only(12_000, 10_000)
        with pytest.raises(ImageError, match=r"bytes \(\d+ bytes\).*12000x10000.*exceeds the limit"):
            load_image(big)
        # 600 megapixels: over twice Pillow's limit, so Pillow refuses it on opening; still an ImageError.
        bomb = png_header_only(30_000, 20_000)
        for max_pixels in (DEFAULT_MAX_PIXELS, None):
            with pytest.raises(
                ImageError, match=r"bytes \(\d+ bytes\).*decompression bomb.*MAX_IMAGE_PIXELS"
            ):
                load_image(bomb, max_pixels=max_pixels)
        # Over Pillow's warning threshold but under our limit: no warning leaks (then: no pixel data).
        over_warning = png_header_only(10_000, 9_000)
        assert 10_000 * 9_000 > Image.MAX_IMAGE_PIXELS and 10_000 * 9_000 <= DEFAULT_MAX_PIXELS
        with pytest.raises(ImageError, match="truncated"):
            load_image(over_warning)


def test_text_mode_file_objects(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(encode(random_image(4, 4)))
    with open(path) as f, pytest.raises(ImageError, match=r"x\.png.*text mode.*'rb'"):
        load_image(f)
    with pytest.raises(ImageError, match="text mode"):
        load_image(io.StringIO("abc"))


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((4, 4), dtype=np.uint16), "dtype uint16 is not accepted"),
        (np.zeros((4, 4), dtype=np.int64), "dtype int64 is not accepted"),
        (np.zeros((4, 4), dtype=bool), "dtype bool is not accepted"),
        (np.full((4, 4), 2.0), r"float values must lie in \[0, 1\], found \[2, 2\].*astype\(np.uint8\)"),
        (np.full((4, 4), np.nan), "NaN"),
        (np.zeros((3, 8, 9), dtype=np.uint8), "channels-first"),
        (np.zeros((2, 8, 9, 3), dtype=np.uint8), "batch"),
        (np.zeros((8, 9, 2), dtype=np.uint8), "expected H x W"),
        (np.zeros(5, dtype=np.uint8), "expected H x W"),
    ],
)
def test_bad_numpy_arrays(array, message):
    with pytest.raises(ImageError, match=rf"numpy array \(shape {re.escape(str(array.shape))}.*{message}"):
        load_image(array)


def test_unsupported_source_types():
    with pytest.raises(ImageError, match=r"torch\.Tensor.*permute"):
        load_image(torch.zeros(3, 4, 4))
    with pytest.raises(ImageError, match=r"builtins\.int: not an image source"):
        load_image(5)
    with pytest.raises(ImageError, match=r"builtins\.list: not an image source"):
        load_image([1, 2, 3])


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)


# ----------------------------------------------------------------------------------------------------
# Preprocessing: by hand


def test_constant_image_normalises_to_the_clip_formula():
    # Resampling a constant image gives the same constant, so every output pixel is (v/255 − mean)/std.
    out = preprocess(Image.new("RGB", (100, 37), (255, 0, 128)))
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    expected = (np.array([255, 0, 128]) / 255 - MEAN) / STD
    for c in range(3):
        assert torch.allclose(out[0, c], torch.full((224, 224), float(expected[c])), atol=1e-6)


def test_image_already_at_size_is_only_normalised():
    image = random_image(224, 224, seed=3)
    expected = (np.asarray(image) / 255.0 - MEAN) / STD  # (224, 224, 3)
    out = preprocess(image)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_resize_is_straight_not_cropped():
    # 400 x 100: left quarter red, the rest blue. A straight resize keeps the red quarter in columns 0-55;
    # a short-side resize with a centre crop would show only blue.
    array = np.zeros((100, 400, 3), dtype=np.uint8)
    array[:, :100] = (255, 0, 0)
    array[:, 100:] = (0, 0, 255)
    out = preprocess(array)[0]
    red = torch.tensor((np.array([255, 0, 0]) / 255 - MEAN) / STD, dtype=torch.float32)
    blue = torch.tensor((np.array([0, 0, 255]) / 255 - MEAN) / STD, dtype=torch.float32)
    assert torch.allclose(out[:, :, :50], red[:, None, None].expand(3, 224, 50), atol=1e-6)
    assert torch.allclose(out[:, :, 62:], blue[:, None, None].expand(3, 224, 162), atol=1e-6)


def test_preprocess_batches_sizes_and_errors():
    a, b = random_image(30, 40, seed=1), random_image(50, 20, seed=2)
    batch = preprocess([a, b], size=32)
    assert batch.shape == (2, 3, 32, 32)
    assert torch.equal(batch[0], preprocess(a, size=32)[0])
    assert torch.equal(batch[1], preprocess((b,), size=32)[0])
    with pytest.raises(ImageError, match="at least one image"):
        preprocess([])
    with pytest.raises(ValueError, match="size"):
        preprocess(a, size=0)
    with pytest.raises(ImageError, match=r"nope\.png"):
        preprocess([a, "nope.png"])


# ----------------------------------------------------------------------------------------------------
# Preprocessing: against transformers (the image processor Kosmos2Processor uses)


def kosmos2_image_processor():
    """transformers' CLIP image processor with the settings of microsoft/kosmos-2-patch14-224's
    preprocessor_config.json (use_square_size: resize to 224x224; the 224 centre crop is then a no-op)."""
    transformers = pytest.importorskip("transformers")
    settings = dict(
        size={"shortest_edge": 224},
        use_square_size=True,
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        resample=3,  # PIL bicubic
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )
    # 5.x: the Pillow backend (the default torchvision backend is not installed here); 4.x: the numpy/PIL one.
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = cls(**settings)
    assert (processor.size["height"], processor.size["width"]) == (224, 224)
    return processor, int(transformers.__version__.split(".")[0])


def reference_cases() -> dict[str, Image.Image]:
    rgb = random_image(150, 97, seed=10)
    return {
        "RGB": rgb,
        "L": random_image(200, 300, "L", seed=11),
        "RGBA": random_image(64, 64, "RGBA", seed=12),
        "P": rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=50),
        "wide": random_image(640, 120, seed=13),
        "tall": random_image(90, 500, seed=14),
        "upscaled": random_image(20, 13, seed=15),
    }


@pytest.mark.reference
@pytest.mark.parametrize("case", list(reference_cases()))
def test_pixel_values_match_transformers(case):
    processor, major = kosmos2_image_processor()
    if case == "RGBA" and major < 5:
        pytest.skip("transformers 4.x drops alpha; kosmos2 composites onto white like 5.x")
    image = reference_cases()[case]
    expected = processor(image, return_tensors="pt")["pixel_values"]
    out = preprocess(image)
    assert out.shape == expected.shape == (1, 3, 224, 224)
    assert (out - expected).abs().max().item() <= 1e-6


@pytest.mark.reference
def test_batch_matches_transformers():
    processor, _ = kosmos2_image_processor()
    images = [reference_cases()[k] for k in ("RGB", "L", "wide")]
    expected = processor(images, return_tensors="pt")["pixel_values"]
    assert (preprocess(images) - expected).abs().max().item() <= 1e-6


# ----------------------------------------------------------------------------------------------------
# Drawing


@dataclass
class FakeEntityResult:  # the attributes draw_boxes reads from predictor results
    phrase: str
    pixel_boxes: list = field(default_factory=list)


@dataclass
class FakeEntity:  # grounding.Entity: boxes normalised to [0, 1]
    phrase: str
    boxes: list = field(default_factory=list)


def is_white(pixel) -> bool:
    return tuple(pixel) == (255, 255, 255)


def test_draw_boxes_writes_png_atomically(tmp_path):
    image = Image.new("RGB", (200, 100), "white")
    out = tmp_path / "drawn.png"
    out.write_bytes(b"old")  # an existing file is replaced
    drawn = draw_boxes(image, [(20, 30, 60, 90)], out_path=out)
    assert sorted(os.listdir(tmp_path)) == ["drawn.png"]  # no temporary file left behind
    with Image.open(out) as written:
        assert written.format == "PNG" and written.size == (200, 100)
        assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(drawn))
    assert not is_white(drawn.getpixel((20, 60)))  # left edge of the box
    assert is_white(drawn.getpixel((40, 60)))  # inside
    assert is_white(drawn.getpixel((100, 60)))  # outside
    assert is_white(image.getpixel((20, 60)))  # the input is untouched


@pytest.mark.parametrize(
    "name, fmt", [("x.jpg", "JPEG"), ("x.JPEG", "JPEG"), ("x.webp", "WEBP"), ("x.bmp", "BMP")]
)
def test_draw_boxes_writes_any_format_pillow_writes(tmp_path, name, fmt):
    image = Image.new("RGB", (200, 100), "white")
    drawn = draw_boxes(image, [(20, 30, 60, 90)], out_path=tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == [name]
    with Image.open(tmp_path / name) as written:
        assert written.format == fmt and written.size == (200, 100)
        # lossy formats: the box edge is still far from white
        assert sum(written.convert("RGB").getpixel((20, 60))) < 600 and is_white(drawn.getpixel((40, 60)))


def test_draw_boxes_entities_and_labels():
    image = Image.new("RGB", (200, 100), "white")
    entities = [
        FakeEntityResult("a dog", [(10, 40, 50, 90), (120, 40, 190, 90)]),
        FakeEntity("a cat", [(0.5, 0.1, 0.6, 0.3)]),
    ]
    drawn = draw_boxes(image, entities)
    left_dog, right_dog = drawn.getpixel((10, 70)), drawn.getpixel((120, 70))
    assert not is_white(left_dog) and left_dog == right_dog  # one colour per entity
    cat = drawn.getpixel((100, 20))  # left edge of the normalised box, scaled to pixels: x = 0.5·200
    assert not is_white(cat) and cat != left_dog
    unlabelled = draw_boxes(image, entities, labels=["", ""])
    # the label tab above the first dog box (rows 40 - tab height ... 39) is drawn only with a label
    assert not is_white(drawn.getpixel((14, 36))) and is_white(unlabelled.getpixel((14, 36)))


def test_draw_boxes_bad_arguments(tmp_path):
    image = Image.new("RGB", (20, 10))
    with pytest.raises(ValueError, match="labels has 2 entries for 1"):
        draw_boxes(image, [(0, 0, 5, 5)], labels=["a", "b"])
    with pytest.raises(ValueError, match="item 0: a box must be 4"):
        draw_boxes(image, [(0, 0, 5)])
    with pytest.raises(ImageError, match=r"x\.xyz.*not an image format Pillow writes.*\.png"):
        draw_boxes(image, [], out_path=tmp_path / "x.xyz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        draw_boxes(image, [], out_path=tmp_path / "missing" / "x.png")
    with pytest.raises(ImageError, match=r"nope\.png"):
        draw_boxes(tmp_path / "nope.png", [])


# ----------------------------------------------------------------------------------------------------
# The README's example image


def load_example_script():
    spec = importlib.util.spec_from_file_location("make_example", EXAMPLES / "make_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_scene_is_committed_small_and_reproducible():
    path = EXAMPLES / "scene.png"
    assert path.stat().st_size < 50_000
    committed = load_image(path)
    script = load_example_script()
    assert committed.size == (script.WIDTH, script.HEIGHT)
    regenerated = np.asarray(script.make_scene(), dtype=np.int16)
    # Pillow's drawing can shift an edge pixel between versions; the scene itself must be the same.
    assert np.abs(regenerated - np.asarray(committed, dtype=np.int16)).mean() < 0.5
    boxes = script.object_boxes()
    x1, y1, x2, y2 = boxes["red ball"]
    r, g, b = committed.getpixel((int((x1 + x2) / 2), int((y1 + y2) / 2)))
    assert r > 150 and g < 80 and b < 80  # the ball's centre is red
    x1, y1, x2, y2 = boxes["blue box"]
    r, g, b = committed.getpixel((int(x1 + 20), int(y2 - 20)))
    assert b > 150 and r < 80  # the box's front face is blue


def test_shapes_example_is_committed_and_reproducible():
    """examples/shapes.png, the README's main example, is the scene examples/make_shapes.py picks."""
    spec = importlib.util.spec_from_file_location("make_shapes", EXAMPLES / "make_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = EXAMPLES / "shapes.png"
    assert path.stat().st_size < 150_000
    committed = load_image(path)
    scene = module.example_scene()
    assert committed.size == (scene.width, scene.height)
    assert len(scene.objects) == 3 and len({o.colour for o in scene.objects}) == 3
    from kosmos2.data.synthetic import render

    regenerated = np.asarray(render(scene), dtype=np.int16)
    assert np.abs(regenerated - np.asarray(committed, dtype=np.int16)).mean() < 0.5
    for o in scene.objects:  # each object's centre has its colour's hue: the fill, not the background
        x1, y1, x2, y2 = o.box
        pixel = committed.getpixel((int((x1 + x2) / 2), int((y1 + y2) / 2)))
        assert max(abs(a - b) for a, b in zip(pixel, o.rgb, strict=True)) < 40
