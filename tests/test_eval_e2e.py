"""End to end through `kosmos2 eval ...` with the real Predictor on a tiny random checkpoint.

A random model's outputs are arbitrary, so these tests check the plumbing the hand-worked tests cannot: real
batched generation, the written reports, resuming from the cache, and that the scored boxes are exactly what
the Predictor returns for the same image and prompt.
"""

from __future__ import annotations

import json

import pytest
from _eval_fixtures import (
    write_coco_images,
    write_entities,
    write_flickr_images,
    write_mdetr_flickr,
    write_mdetr_refcoco,
    write_refer,
)

from kosmos2.cli import main
from kosmos2.eval.runner import PredictionCache
from kosmos2.predictor import Predictor

RUN = ["--max-new-tokens", "6", "--batch-size", "2", "--no-progress", "--samples", "4"]
# The official decoding (SPEC §8; docs/EVAL.md), written out here rather than taken from the code under test.
PROTOCOL = {
    "max_new_tokens": 64,
    "num_beams": 1,
    "do_sample": False,
    "no_repeat_ngram_size": 3,
    "length_penalty": 1.0,
}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_dir):
    return tiny_checkpoint_dir


def _eval(dataset, *options, checkpoint, out):
    """`kosmos2 eval DATASET OPTIONS --checkpoint C --out O` with the small RUN settings; the exit code."""
    return main(["eval", dataset, *options, "--checkpoint", str(checkpoint), "--out", str(out), *RUN])


def _records(out):
    return [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]


def test_refcoco_end_to_end_and_resume(tmp_path, checkpoint, capsys) -> None:
    refer = write_refer(tmp_path / "refer")
    images = write_coco_images(tmp_path / "coco")
    out = tmp_path / "out"
    args = ["--refer-dir", str(refer), "--images", str(images), "--splits", "val", "testA"]
    assert _eval("refcoco", *args, "--limit", "2", checkpoint=checkpoint, out=out) == 0
    first = json.loads((out / "metrics.json").read_text())
    assert first["run"] == {"queries": 4, "from_cache": 0, "computed": 4}
    assert {s: v["count"] for s, v in first["results"]["refcoco"].items()} == {"val": 2, "testA": 2}
    assert _eval("refcoco", *args, checkpoint=checkpoint, out=out) == 0  # reuses the 4 cached predictions
    second = json.loads((out / "metrics.json").read_text())
    assert second["run"] == {"queries": 6, "from_cache": 4, "computed": 2}
    assert len(PredictionCache(out / "predictions.jsonl")) == 6
    assert "refcoco val: Acc@0.5 first" in capsys.readouterr().out
    # one plot of each kind per split, nothing pooled
    plots = sorted(p.name for p in out.glob("*.png") if p.name != "samples.png")
    assert [p for p in plots if not p.startswith("threshold_")] == [
        "by_length_refcoco_testA.png",
        "by_length_refcoco_val.png",
        "iou_hist_refcoco_testA.png",
        "iou_hist_refcoco_val.png",
    ]
    # past one IoU threshold, per dataset and split (a reliability plot too where boxes have scores)
    assert {"threshold_refcoco_testA_iou.png", "threshold_refcoco_val_iou.png"} <= set(plots)
    assert (out / "report.md").is_file() and (out / "samples.png").is_file()

    # the scored boxes are the Predictor's own, for the same image and prompt
    predictor = Predictor.from_pretrained(checkpoint)
    records = _records(out)
    direct = predictor.ground(
        [r["image"] for r in records], [r["prompt"] for r in records], **{**PROTOCOL, "max_new_tokens": 6}
    )
    for r, d in zip(records, direct, strict=True):
        assert r["text"] == d.text
        want = [list(b) for e in d.entities if e.phrase.strip() == r["expression"] for b in e.pixel_boxes]
        assert r["predicted"] == pytest.approx(want)


def test_refcoco_mdetr_and_reg(tmp_path, checkpoint) -> None:
    pytest.importorskip("pycocoevalcap")
    mdetr = write_mdetr_refcoco(tmp_path / "mdetr")
    images = write_coco_images(tmp_path / "coco")
    out = tmp_path / "reg"
    assert (
        _eval(
            "refcoco",
            *("--mdetr-dir", str(mdetr), "--images", str(images), "--splits", "val"),
            *("--task", "reg", "--text-metrics", "CIDEr"),
            checkpoint=checkpoint,
            out=out,
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "reg" and set(m["results"]["scores"]) == {"CIDEr"} and m["run"]["queries"] == 3
    assert all(r["prompt"].startswith("<phrase> It</phrase><object>") for r in _records(out))


def test_flickr30k_end_to_end(tmp_path, checkpoint) -> None:
    entities = write_entities(tmp_path / "flickr30k_entities")
    mdetr = write_mdetr_flickr(tmp_path / "mdetr")
    images = write_flickr_images(tmp_path / "flickr30k-images")
    out = tmp_path / "out"
    assert (
        _eval(
            "flickr30k",
            *("--entities-dir", str(entities), "--mdetr-dir", str(mdetr), "--images", str(images)),
            checkpoint=checkpoint,
            out=out,
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert (
        m["results"]["val"]["recall"]["all"]["count"] == 3
        and m["results"]["test"]["recall"]["all"]["count"] == 2
    )
    assert set(m["results"]["val"]["recall"]) == {"all", "people", "clothing", "bodyparts", "other"}
    plots = sorted(p.name for p in out.glob("*.png") if p.name != "samples.png")
    assert [p for p in plots if not p.startswith("threshold_")] == [
        "by_type_test.png",
        "by_type_val.png",
        "iou_hist_test.png",
        "iou_hist_val.png",
    ]
    assert {"threshold_test_iou.png", "threshold_val_iou.png"} <= set(plots)


def test_flickr30k_captions(tmp_path, checkpoint) -> None:
    pytest.importorskip("pycocoevalcap")
    entities = write_entities(tmp_path / "flickr30k_entities")
    images = write_flickr_images(tmp_path / "flickr30k-images")
    out = tmp_path / "cap"
    assert (
        _eval(
            "flickr30k",
            *("--task", "caption", "--entities-dir", str(entities), "--images", str(images)),
            *("--text-metrics", "CIDEr"),
            checkpoint=checkpoint,
            out=out,
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["generation"] == {**PROTOCOL, "max_new_tokens": 6, "num_beams": 5} and m["run"]["queries"] == 2
    assert m["generation_changed"] == {"max_new_tokens": {"protocol": 64, "used": 6}}


def test_bad_arguments_fail_with_a_message(tmp_path, checkpoint, capsys) -> None:
    rc = main(
        [
            "eval",
            "refcoco",
            "--images",
            str(tmp_path),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "exactly one annotation source" in capsys.readouterr().err
    rc = main(
        [
            "eval",
            "flickr30k",
            "--entities-dir",
            str(tmp_path),
            "--images",
            str(tmp_path),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "val.txt: not found" in capsys.readouterr().err
    refer = write_refer(tmp_path / "refer")
    rc = main(
        [
            "eval",
            "refcoco",
            "--refer-dir",
            str(refer),
            "--splits",
            "val",
            "--images",
            str(tmp_path / "none"),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert rc == 2 and "COCO_train2014_000000581857.jpg' not found" in capsys.readouterr().err


def test_decoding_is_the_protocols_whatever_the_checkpoint_says(tmp_path, checkpoint) -> None:
    # a checkpoint whose generation_config.json asks for sampling without n-gram blocking: evaluation must
    # still decode greedily with no-repeat-ngram 3 (the official settings) and say so in metrics.json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(checkpoint, model)
    (model / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 1.5, "no_repeat_ngram_size": 0, "max_new_tokens": 3})
    )
    refer = write_refer(tmp_path / "refer")
    images = write_coco_images(tmp_path / "coco")
    out = tmp_path / "out"
    args = ["--refer-dir", str(refer), "--images", str(images), "--splits", "val"]
    run = ["--batch-size", "2", "--no-progress", "--samples", "2", "--max-new-tokens", "24"]
    assert main(["eval", "refcoco", *args, "--checkpoint", str(model), "--out", str(out), *run]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["generation"] == {**PROTOCOL, "max_new_tokens": 24}
    assert m["generation_changed"] == {"max_new_tokens": {"protocol": 64, "used": 24}}
    assert "changed from the protocol's" in (out / "report.md").read_text()

    records = _records(out)
    images_, prompts = [r["image"] for r in records], [r["prompt"] for r in records]
    predictor = Predictor.from_pretrained(model)
    greedy = predictor.ground(images_, prompts, **{**PROTOCOL, "max_new_tokens": 24})
    assert [r["text"] for r in records] == [g.text for g in greedy]
    # the check can fail: without the pinning, the checkpoint's settings give other text
    unblocked = predictor.ground(images_, prompts, max_new_tokens=24, do_sample=False, no_repeat_ngram_size=0)
    assert [g.text for g in greedy] != [u.text for u in unblocked]

    # an explicit change is used, recorded and named in the report; the protocol's run stays cached apart
    out2 = tmp_path / "out2"
    flags = ["--no-repeat-ngram-size", "0"]
    assert main(["eval", "refcoco", *args, "--checkpoint", str(model), "--out", str(out2), *run, *flags]) == 0
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["generation"]["no_repeat_ngram_size"] == 0
    assert m2["generation_changed"]["no_repeat_ngram_size"] == {"protocol": 3, "used": 0}
    assert [r["text"] for r in _records(out2)] == [u.text for u in unblocked]
