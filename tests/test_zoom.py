"""Crop-and-ask: Predictor.zoom and `kosmos2 zoom` on the built-in default model.

The crop is checked against the box and margin rule worked out from the located box; a task's boxes on the
crop against the same task run directly on that crop and shifted by hand; OCR reads text that tesseract
cannot find in the whole picture.
"""

from __future__ import annotations

import io
import json
import math

import pytest
from PIL import ImageDraw, ImageFont

from kosmos2 import grounding
from kosmos2.data import synthetic as world
from kosmos2.predictor import Predictor

SHAPES = (
    "examples/shapes.png"  # 392 x 262: a large blue square, a large orange circle, a large purple diamond
)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_pretrained()


def _expected_crop(box, margin, size):
    x1, y1, x2, y2 = box
    W, H = size
    mw, mh = margin * (x2 - x1), margin * (y2 - y1)
    return (
        max(0, math.floor(x1 - mw)),
        max(0, math.floor(y1 - mh)),
        min(W, math.ceil(x2 + mw)),
        min(H, math.ceil(y2 + mh)),
    )


def test_zoom_crops_the_located_box_with_its_margin(predictor):
    seen = []
    z = predictor.zoom(SHAPES, "the orange circle", then=lambda im: seen.append(im.size) or "ok", margin=0.25)
    assert z.located.found and z.result == "ok"
    left, top, right, bottom = _expected_crop(z.located.pixel_box, 0.25, (392, 262))
    assert z.crop_box == (left, top, right, bottom)
    assert seen == [(right - left, bottom - top)] and z.crop.size == seen[0]


def test_zoom_maps_the_crops_boxes_back_to_the_original_image(predictor):
    z = predictor.zoom(SHAPES, "the orange circle", then="caption")
    left, top = z.crop_box[:2]
    direct = predictor.caption(z.crop)  # the same task on the same crop, boxes in the crop's pixels
    assert z.result.caption == direct.caption and z.result.image_size == (392, 262)
    for mine, theirs in zip(z.result.entities, direct.entities, strict=True):
        shifted = [(x1 + left, y1 + top, x2 + left, y2 + top) for x1, y1, x2, y2 in theirs.pixel_boxes]
        assert [pytest.approx(b) for b in shifted] == mine.pixel_boxes
        normalised = [grounding.box_to_normalized(b, 392, 262) for b in shifted]
        assert [pytest.approx(b) for b in normalised] == mine.boxes
        assert mine.scores == theirs.scores


def test_zoom_describe_asks_about_the_box_inside_the_crop(predictor):
    z = predictor.zoom(SHAPES, "the orange circle", then="describe")
    left, top = z.crop_box[:2]
    x1, y1, x2, y2 = z.located.pixel_box
    direct = predictor.describe_region(z.crop, (x1 - left, y1 - top, x2 - left, y2 - top))
    assert z.result.answer == direct.answer and "circle" in z.result.answer
    # the prompt's box ("It") comes back where it was located, up to the 32-cell grid of the crop
    (bx1, by1, bx2, by2) = z.result.entities[0].pixel_boxes[0]
    cell = max(z.crop.size) / 32
    assert abs(bx1 - x1) <= cell and abs(by2 - y2) <= cell


def test_zoom_vqa_and_not_found(predictor):
    z = predictor.zoom(SHAPES, "the orange circle", then="vqa", question="What color is the circle?")
    assert z.result.answer == predictor.vqa(z.crop, "What color is the circle?").answer
    z = predictor.zoom(SHAPES, "the green star")
    assert z.located.found is False and z.crop is None and z.result is None
    forced = predictor.zoom(SHAPES, "the green star", force=True, then=lambda im: im.size)
    assert forced.crop is not None and forced.result == forced.crop.size


def test_zoom_rejects_bad_arguments(predictor):
    with pytest.raises(ValueError, match="then="):
        predictor.zoom(SHAPES, "the orange circle", then="ocr-ish")
    with pytest.raises(ValueError, match="question"):
        predictor.zoom(SHAPES, "the orange circle", then="vqa")
    with pytest.raises(ValueError, match="margin"):
        predictor.zoom(SHAPES, "the orange circle", margin=-1)


def _scene_with_text():
    """A held-out scene whose large blue square carries the word STOP (OCR misses it in the whole image)."""
    scene = world.make_scene(world.scene_seed("test", 1, "zoomtest", 8), "test")
    square = next(o for o in scene.objects if o.words == "large blue square")
    image = world.render(scene)
    x1, y1, x2, y2 = square.box
    font = ImageFont.load_default(size=int((y2 - y1) / 3))
    ImageDraw.Draw(image).text(((x1 + x2) / 2, (y1 + y2) / 2), "STOP", fill=(0, 0, 0), font=font, anchor="mm")
    return image


def test_zoom_then_ocr_reads_what_the_whole_image_hides(predictor, tmp_path):
    pytesseract = pytest.importorskip("pytesseract")
    image = _scene_with_text()
    assert "STOP" not in pytesseract.image_to_string(image)
    z = predictor.zoom(image, "the large blue square", then=pytesseract.image_to_string, margin=0.25)
    assert "STOP" in z.result
    # the CLI verb (its OCR margin is 0.25 by default)
    from kosmos2.commands import zoom_image

    path = tmp_path / "scene.png"
    image.save(path)
    out = io.StringIO()
    zoom_image(
        str(path), "the large blue square", then="ocr", as_json=True, crop=str(tmp_path / "c.png"), out=out
    )
    record = json.loads(out.getvalue())
    assert record["found"] is True and "STOP" in record["answer"] and (tmp_path / "c.png").is_file()


def test_zoom_cli_errors_are_one_line(tmp_path):
    from kosmos2.cli import main
    from kosmos2.commands import zoom_image
    from kosmos2.errors import UsageError, UserError

    with pytest.raises(UserError, match="is not a file"):
        zoom_image(str(tmp_path / "missing.png"), "the circle")
    with pytest.raises(UsageError, match="--question"):
        zoom_image(SHAPES, "the circle", then="vqa")
    # through the console script: one line naming the verb, exit status 2 for a usage error
    assert main(["zoom", SHAPES, "the circle", "--then", "vqa"]) == 2
