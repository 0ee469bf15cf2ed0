"""Report output: the sample sheet draws boxes where they belong; tables; plots when matplotlib is there."""

from __future__ import annotations

import pytest
from PIL import Image

from kosmos2.eval import report


def test_sample_sheet_draws_true_and_predicted_boxes(tmp_path) -> None:
    image = Image.new("RGB", (128, 64), (255, 255, 255))
    samples = [report.Sample(image, "a thing", [(0, 0, 64, 32)], [(64, 32, 127, 63)], True)]
    path = report.sample_sheet(samples, tmp_path / "s.png", columns=2, tile=256)
    sheet = Image.open(path).convert("RGB")
    assert sheet.size == (512, 22 + 256 + 48)
    # 128x64 fitted into 256x256: scale 2, centred vertically (offset (256-128)/2 = 64) below the 22 px legend
    oy = 22 + 64
    assert sheet.getpixel((0, oy + 10)) == report.TRUTH_COLOUR  # left edge of the true box
    assert sheet.getpixel((128 + 1, oy + 100)) == report.PREDICTED_COLOUR  # left edge of the predicted box
    assert sheet.getpixel((200, oy + 20)) == (255, 255, 255)


def test_pick_samples_mixes_hits_and_misses() -> None:
    items = [report.Sample(None, str(i), [], [], i % 3 == 0) for i in range(12)]
    chosen = report.pick_samples(items, 4)
    assert sum(s.correct for s in chosen) == 2 and len(chosen) == 4
    assert [s.title for s in chosen] == sorted((s.title for s in chosen), key=int)


def test_markdown_table_formats_cells() -> None:
    md = report.markdown_table(["a", "b"], [[1, 2 / 3], ["x|y", None]])
    assert md.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.67 |", "| x\\|y | — |"]


def test_plots_are_written(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    assert report.iou_histogram([0.1, 0.5, 0.9], tmp_path / "h.png", "t").is_file()
    path = report.bar_chart(["a", "b"], {"R@1": [10.0, 50.0]}, tmp_path / "b.png", "t", "x", counts=[3, 4])
    assert Image.open(path).size == (600, 380)


def test_sample_tiles_show_the_metric_verdict(tmp_path) -> None:
    # read back with OCR (tesseract): the tile's first line is the verdict, naming the metric
    pytesseract = pytest.importorskip("pytesseract")
    try:
        pytesseract.get_tesseract_version()
    except pytesseract.TesseractNotFoundError:
        pytest.skip("the tesseract program is not installed")
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    verdict = "val: R@1 miss, R@5 hit, R@10 hit (IoU 0.00)"
    sample = report.Sample(image, "Two men in red hats", [(0, 0, 10, 10)], [(41, 1, 51, 11)], False, verdict)
    sheet = Image.open(report.sample_sheet([sample], tmp_path / "s.png", columns=1)).convert("L")
    caption = sheet.crop((0, 22 + 256, 256, 22 + 256 + 48)).resize((1024, 192), Image.LANCZOS)
    text = " ".join(pytesseract.image_to_string(caption).split())
    assert text.startswith("val: R@1 miss, R@5 hit, R@10 hit") and "Two men" in text
    # without a verdict the tile says plain hit / miss, as before
    plain = report.Sample(image, "Two men", [], [], False)
    sheet = Image.open(report.sample_sheet([plain], tmp_path / "p.png", columns=1)).convert("L")
    caption = sheet.crop((0, 22 + 256, 256, 22 + 256 + 48)).resize((1024, 192), Image.LANCZOS)
    assert " ".join(pytesseract.image_to_string(caption).split()).startswith("miss Two men")


def test_slug_names_files_by_dataset_and_split() -> None:
    assert report.slug("refcoco+", "testA") == "refcoco+_testA"
    assert report.slug("my set/v2", "val") == "my-set-v2_val"
