"""RefCOCO/+/g: both real annotation formats, the official REC protocol, metrics equal to hand values."""

from __future__ import annotations

import json
import pickle

import pytest
from _eval_fixtures import (
    REC_EXPECTED,
    REC_OUTPUTS,
    ScriptedPredictor,
    obj,
    write_coco_images,
    write_mdetr_refcoco,
    write_refer,
)

from kosmos2.eval import refcoco


@pytest.fixture()
def data(tmp_path):
    return {
        "refer": write_refer(tmp_path / "refer" / "data"),
        "mdetr": write_mdetr_refcoco(tmp_path / "mdetr_annotations"),
        "images": write_coco_images(tmp_path / "coco"),
        "tmp": tmp_path,
    }


def test_both_formats_load_the_same_expressions(data) -> None:
    for split, n in (("val", 3), ("testA", 3)):
        a = refcoco.load_split("refcoco", split, refer_dir=data["refer"])
        b = refcoco.load_split("refcoco", split, mdetr_dir=data["mdetr"])
        assert len(a) == len(b) == n
        for x, y in zip(a, b, strict=True):
            assert (x.file_name, x.size, x.expression, x.box, x.object_id) == (
                y.file_name,
                y.size,
                y.expression,
                y.box,
                y.object_id,
            )
    e = refcoco.load_split("refcoco", "val", refer_dir=data["refer"])[2]
    assert e.expression == "the blue car" and e.box == (40.0, 40.0, 64.0, 64.0)
    assert e.file_name == "COCO_train2014_000000581857.jpg" and e.id == "refcoco/val/2"
    assert refcoco.rec_prompt(e.expression) == "<grounding><phrase>the blue car</phrase>"


@pytest.mark.parametrize("source", ["refer", "mdetr"])
def test_rec_metrics_equal_hand_values(data, source) -> None:
    kwargs = {"refer_dir": data["refer"]} if source == "refer" else {"mdetr_dir": data["mdetr"]}
    examples = [e for split in ("val", "testA") for e in refcoco.load_split("refcoco", split, **kwargs)]
    fake = ScriptedPredictor(REC_OUTPUTS)
    out = data["tmp"] / f"out_{source}"
    result = refcoco.evaluate_rec(
        fake, examples, data["images"], out, model_id="fake", batch_size=4, progress=False
    )
    for split, expected in REC_EXPECTED.items():
        got = result["results"]["refcoco"][split]
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-12), (split, key)
    assert result["results"]["refcoco"]["val"]["paper_acc_first"] == 52.32
    assert sorted(fake.prompts_seen) == sorted(REC_OUTPUTS)  # the official prompt, train split left out
    assert [len(p) for p, _, _ in fake.calls] == [4, 2]
    assert all(size == (64, 64) for _, sizes, _ in fake.calls for size in sizes)

    records = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    left_dog = next(r for r in records if r["expression"] == "the left dog")
    assert left_dog["predicted"] == [[0.0, 0.0, 2.0, 2.0]] and left_dog["iou_first"] == 0.5
    assert left_dog["correct_first"] is True
    metrics_json = json.loads((out / "metrics.json").read_text())
    assert metrics_json["results"]["refcoco"]["testA"]["acc_mean"] == pytest.approx(200 / 3)
    md = (out / "report.md").read_text()
    assert "| refcoco | val | 3 | 33.33 | 52.32 | 66.67 | 33.33 | 1 |" in md
    assert (out / "samples.png").is_file()


def test_rerun_reuses_the_cache(data) -> None:
    examples = refcoco.load_split("refcoco", "val", mdetr_dir=data["mdetr"])
    out = data["tmp"] / "out"
    first = refcoco.evaluate_rec(
        ScriptedPredictor(REC_OUTPUTS), examples[:2], data["images"], out, model_id="fake", progress=False
    )
    assert first["run"] == {"queries": 2, "from_cache": 0, "computed": 2}
    fake = ScriptedPredictor(REC_OUTPUTS)
    again = refcoco.evaluate_rec(fake, examples, data["images"], out, model_id="fake", progress=False)
    assert again["run"] == {"queries": 3, "from_cache": 2, "computed": 1}
    assert fake.prompts_seen == ["<grounding><phrase>the blue car</phrase>"]


def test_loading_errors_are_clear(data, tmp_path) -> None:
    with pytest.raises(ValueError, match="evaluation splits val, testA, testB, not 'test'"):
        refcoco.load_split("refcoco", "test", refer_dir=data["refer"])
    with pytest.raises(ValueError, match="exactly one annotation source"):
        refcoco.load_split("refcoco", "val")
    with pytest.raises(FileNotFoundError, match=r"refs\(umd\).p"):
        refcoco.load_split("refcocog", "val", refer_dir=data["refer"])
    with pytest.raises(FileNotFoundError, match="finetune_refcoco\\+_val.json"):
        refcoco.load_split("refcoco+", "val", mdetr_dir=data["mdetr"])
    with pytest.raises(ValueError, match="unknown dataset"):
        refcoco.dataset_name("refclef")
    # a pickle that would import code is refused
    evil = tmp_path / "evil" / "refcoco"
    evil.mkdir(parents=True)
    (evil / "refs(unc).p").write_bytes(pickle.dumps([{"split": "val", "x": pickle.Pickler}]))
    (evil / "instances.json").write_text("{}")
    with pytest.raises(ValueError, match="refusing to load"):
        refcoco.load_split("refcoco", "val", refer_dir=tmp_path / "evil")
    examples = refcoco.load_split("refcoco", "val", refer_dir=data["refer"])
    with pytest.raises(FileNotFoundError, match="Point --images"):
        refcoco.rec_queries(examples, tmp_path / "nowhere")


def test_reg_prompt_and_scores(data) -> None:
    pytest.importorskip("pycocoevalcap")
    from kosmos2.eval import text_metrics

    examples = refcoco.load_split("refcoco", "val", refer_dir=data["refer"])
    # (0,0,4,2) on 64x64 = (0, 0, 0.0625, 0.03125): cells col 0..ceil(2-1)=1, row 0..ceil(1-1)=0 -> 0, 1
    prompt = refcoco.reg_prompt(examples[0].box, examples[0].size)
    assert prompt == "<phrase> It</phrase><object><patch_index_0000><patch_index_0001></object> is"
    outputs = {
        refcoco.reg_prompt(e.box, e.size): f" {words}"
        for e, words in zip(examples, ["the left dog", "a man", "blue car on the right"], strict=True)
    }
    result = refcoco.evaluate_reg(
        ScriptedPredictor(outputs),
        examples,
        data["images"],
        data["tmp"] / "reg",
        model_id="fake",
        progress=False,
        metrics_names=("CIDEr", "BLEU-4"),
    )
    expected = text_metrics.caption_metrics(
        {
            "refcoco/val/object1001": "the left dog",
            "refcoco/val/object1002": "a man",
            "refcoco/val/object1003": "blue car on the right",
        },
        {
            "refcoco/val/object1001": ["the left dog"],
            "refcoco/val/object1002": ["the tall man"],
            "refcoco/val/object1003": ["the blue car"],
        },
        ("CIDEr", "BLEU-4"),
    )
    assert result["results"]["scores"] == expected["scores"]
    assert "CIDEr" in (data["tmp"] / "reg" / "report.md").read_text()


def test_rec_tiles_state_the_official_verdict(data) -> None:
    examples = refcoco.load_split("refcoco", "val", refer_dir=data["refer"])
    out = data["tmp"] / "verdicts"
    refcoco.evaluate_rec(ScriptedPredictor(REC_OUTPUTS), examples, data["images"], out, model_id="f")
    records = {r["expression"]: r for r in map(json.loads, (out / "records.jsonl").read_text().splitlines())}
    # the left dog: first box IoU 0.5 exactly (a hit); the tall man: a lone location token, no box
    assert refcoco.rec_verdict(records["the left dog"], "val: ") == "val: first box IoU 0.50, hit"
    assert refcoco.rec_verdict(records["the tall man"], "val: ") == "val: no box, miss"


def _rotated_jpeg(path, orientation: int = 6):
    """A JPEG stored 320×240, left half red and right half blue, whose EXIF tag says "rotate 90° to show"."""
    from PIL import Image

    image = Image.new("RGB", (320, 240), (220, 20, 20))
    image.paste((20, 20, 220), (160, 0, 320, 240))
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path


def _near(pixel, colour, tolerance: int = 40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour, strict=True))


def test_exif_tagged_images_are_evaluated_as_stored(tmp_path) -> None:
    from PIL import Image

    from kosmos2.eval import report
    from kosmos2.image import load_image

    (tmp_path / "coco").mkdir()
    path = _rotated_jpeg(tmp_path / "coco" / "rotated.jpg")
    assert load_image(path).size == (240, 320)  # a viewer (and the predictor's default) would rotate it
    example = refcoco.RefExample(
        id="refcoco/val/rot",
        dataset="refcoco",
        split="val",
        file_name="rotated.jpg",
        size=(320, 240),  # the annotation's: the stored frame
        expression="the red half",
        box=(0.0, 0.0, 160.0, 90.0),
        object_id="1",
    )
    # cells (0, 0) and (11, 15) of the 32×32 grid, different rows and columns: centres (0.5/32, 0.5/32) and
    # (15.5/32, 11.5/32); on 320×240 that is (5, 3.75, 155, 86.25); IoU with (0, 0, 160, 90) is
    # 150 × 82.5 / (160 × 90) = 0.859375
    fake = ScriptedPredictor({"<grounding><phrase>the red half</phrase>": obj((0, 11 * 32 + 15))})
    out = tmp_path / "out"
    result = refcoco.evaluate_rec(fake, [example], tmp_path / "coco", out, model_id="f", progress=False)
    assert fake.calls[0][1] == [(320, 240)]  # the predictor saw the stored frame
    (record,) = map(json.loads, (out / "records.jsonl").read_text().splitlines())
    assert record["predicted"] == [[5.0, 3.75, 155.0, 86.25]]
    assert (
        record["iou_first"] == pytest.approx(0.859375)
        and result["results"]["refcoco"]["val"]["acc_first"] == 100
    )

    # the sample sheet draws the stored frame too: 320×240 fitted into 256×256 at scale 0.8 is 256×192,
    # centred 32 px down, below the 22 px legend; red on the left, blue on the right
    sheet = Image.open(out / "samples.png").convert("RGB")
    top = 22 + 32
    assert _near(sheet.getpixel((40, top + 150)), (220, 20, 20))
    assert _near(sheet.getpixel((220, top + 150)), (20, 20, 220))
    assert sheet.getpixel((128, top + 36)) == report.TRUTH_COLOUR  # right edge of (0, 0, 160, 90) × 0.8
    assert sheet.getpixel((124, top + 36)) == report.PREDICTED_COLOUR  # right edge of 155 × 0.8, thick
