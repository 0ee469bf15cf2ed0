"""Flickr30k Entities: official XML/Sentences files and MDETR's json; ANY-box R@k by hand; phrase types."""

from __future__ import annotations

import json

import pytest
from _eval_fixtures import (
    FLICKR_EXPECTED,
    FLICKR_OUTPUTS,
    ScriptedPredictor,
    write_entities,
    write_flickr_images,
    write_mdetr_flickr,
)

from kosmos2.eval import flickr30k, report


@pytest.fixture()
def data(tmp_path):
    return {
        "entities": write_entities(tmp_path / "flickr30k_entities"),
        "mdetr": write_mdetr_flickr(tmp_path / "mdetr_annotations"),
        "images": write_flickr_images(tmp_path / "flickr30k-images"),
        "tmp": tmp_path,
    }


def test_sentence_markup_as_released() -> None:
    # a line of the dataset's own README (1000092795.txt)
    s = flickr30k.parse_sentence(
        "[/EN#1/people Two young , White males] are outside near [/EN#4/scene many bushes] ."
    )
    assert s.text == "Two young , White males are outside near many bushes ."
    a, b = s.phrases
    assert (a.phrase_id, a.text, a.types, a.first_word_index, a.span) == (
        "1",
        "Two young , White males",
        ("people",),
        0,
        (0, 23),
    )
    assert (b.phrase_id, b.text, b.first_word_index) == ("4", "many bushes", 8)
    assert s.text[b.span[0] : b.span[1]] == "many bushes"
    multi = flickr30k.parse_sentence("A street with [/EN#5/bodyparts/other his hand] .")
    assert multi.phrases[0].types == ("bodyparts", "other")
    with pytest.raises(ValueError, match="f.txt line 3: phrase '5' is not closed"):
        flickr30k.parse_sentence("with [/EN#5/bodyparts his hand .", "f.txt line 3")


def test_annotation_xml(data) -> None:
    ann = flickr30k.read_annotation(data["entities"] / "Annotations" / "111.xml")
    assert (ann.filename, ann.width, ann.height) == ("111.jpg", 64, 64)
    assert ann.boxes == {"1": [(0, 0, 10, 10), (30, 30, 60, 60)], "2": [(0, 0, 4, 2)], "5": [(0, 0, 4, 2)]}
    assert ann.scene == {"4"} and ann.nobox == {"3", "4"}


def test_phrases_without_boxes_are_not_queried(data) -> None:
    val = flickr30k.load_split("val", entities_dir=data["entities"])
    assert [(e.phrase, e.types, len(e.truth)) for e in val] == [
        ("Two men", ("people",), 2),
        ("red hats", ("clothing",), 1),
        ("his hand", ("bodyparts", "other"), 1),
    ]
    assert val[0].id == "flickr30k/111/0/0-7" and val[0].size == (64, 64)
    assert (
        flickr30k.grounding_prompt(val[1].caption, val[1].span)
        == "<grounding>Two men in  <phrase>red hats</phrase>"
    )
    test = flickr30k.load_split("test", entities_dir=data["entities"])
    assert [e.phrase for e in test] == ["A dog", "a ball"]  # "the park" (scene, no box) left out


def test_the_three_sources_agree(data) -> None:
    ents = flickr30k.load_split("val", entities_dir=data["entities"])
    both = flickr30k.load_split("val", entities_dir=data["entities"], mdetr_dir=data["mdetr"])
    mdetr = flickr30k.load_split("val", mdetr_dir=data["mdetr"])
    assert ents == both
    assert [(e.id, e.caption, e.span, e.truth, e.size) for e in mdetr] == [
        (e.id, e.caption, e.span, e.truth, e.size) for e in ents
    ]
    assert all(e.types == () for e in mdetr)  # MDETR's file carries no phrase types


@pytest.mark.parametrize("source", ["entities", "mdetr", "both"])
def test_recall_equals_hand_values(data, source) -> None:
    dirs = {
        "entities": (data["entities"], None),
        "mdetr": (None, data["mdetr"]),
        "both": (data["entities"], data["mdetr"]),
    }[source]
    examples = [e for split in ("val", "test") for e in flickr30k.load_split(split, *dirs)]
    fake = ScriptedPredictor(FLICKR_OUTPUTS)
    out = data["tmp"] / source
    result = flickr30k.evaluate_grounding(
        fake, examples, data["images"], out, model_id="fake", progress=False
    )
    assert sorted(fake.prompts_seen) == sorted(FLICKR_OUTPUTS)
    for split, table in FLICKR_EXPECTED.items():
        got = result["results"][split]["recall"]
        groups = table if source != "mdetr" else {"all": table["all"]}
        assert set(got) == set(groups)
        for group, (n, r1, r5, r10) in groups.items():
            assert got[group]["count"] == n
            assert [got[group][k] for k in ("R@1", "R@5", "R@10")] == pytest.approx([r1, r5, r10], abs=1e-12)
        assert result["results"][split]["undecodable"] == 1
    assert result["results"]["test"]["paper"] == {"R@1": 78.7, "R@5": 80.1, "R@10": 80.1}
    records = {r["phrase"]: r for r in map(json.loads, (out / "records.jsonl").read_text().splitlines())}
    assert records["red hats"]["ious"]["1"] == 0.5
    assert records["A dog"]["predicted"] == [[66.0, 33.0, 126.0, 63.0]]  # scaled by 128 x 64
    md = (out / "report.md").read_text()
    assert "| val | 3 | 33.33 | 66.67 | 66.67 | 77.80 | 79.20 | 79.30 | 1 |" in md
    if source != "mdetr":
        assert "| people | 1 | 0.00 | 100.00 | 100.00 |" in md


def test_captioning_scores_the_words_after_the_prompt(data) -> None:
    pytest.importorskip("pycocoevalcap")
    from kosmos2.eval import text_metrics

    images = flickr30k.load_captions(data["entities"], "val") | flickr30k.load_captions(
        data["entities"], "test"
    )
    assert images["111"][3] == ["Two men in red hats stand near nothing .", "A street with his hand ."]
    fake = ScriptedPredictor({"An image of": " two men in hats."})
    result = flickr30k.evaluate_captions(
        fake,
        images,
        data["images"],
        data["tmp"] / "cap",
        model_id="fake",
        progress=False,
        metrics_names=("CIDEr",),
        generation={"num_beams": 5},
    )
    expected = text_metrics.caption_metrics(
        {"111": "two men in hats.", "222": "two men in hats."},
        {"111": images["111"][3], "222": images["222"][3]},
        ("CIDEr",),
    )
    assert result["results"]["scores"] == expected["scores"]
    # the protocol's decoding, every option explicit (beam 5 for captions, no-repeat-ngram 3; SPEC §1, §8)
    assert fake.calls[0][2] == {
        "max_new_tokens": 64,
        "num_beams": 5,
        "do_sample": False,
        "no_repeat_ngram_size": 3,
        "length_penalty": 1.0,
    }


def test_mismatched_files_are_reported(data, tmp_path) -> None:
    other = write_entities(tmp_path / "other")
    (other / "Sentences" / "111.txt").write_text("[/EN#1/people Someone] waves .\n")
    with pytest.raises(ValueError, match="do not match"):
        flickr30k.load_split("val", entities_dir=other, mdetr_dir=data["mdetr"])
    with pytest.raises(FileNotFoundError, match="point --entities-dir"):
        flickr30k.load_split("val", entities_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="splits are train, val, test"):
        flickr30k.load_split("dev", entities_dir=data["entities"])


def test_tiles_state_recall_at_each_k_and_plots_are_per_split(data) -> None:
    examples = [e for split in ("val", "test") for e in flickr30k.load_split(split, data["entities"], None)]
    out = data["tmp"] / "labels"
    flickr30k.evaluate_grounding(
        ScriptedPredictor(FLICKR_OUTPUTS), examples, data["images"], out, model_id="f", progress=False
    )
    records = {r["phrase"]: r for r in map(json.loads, (out / "records.jsonl").read_text().splitlines())}
    # "Two men": the first box misses both true boxes (IoU 0), the second hits one (0.871): an R@5 hit that
    # a first-box label would call a miss (fixture comments)
    assert (
        flickr30k.recall_verdict(records["Two men"], "val: ") == "val: R@1 miss, R@5 hit, R@10 hit (IoU 0.00)"
    )
    assert flickr30k.recall_verdict(records["red hats"]) == "R@1 hit, R@5 hit, R@10 hit (IoU 0.50)"
    assert flickr30k.recall_verdict(records["his hand"]) == "no box, R@k miss"
    if report.have_matplotlib():
        plots = sorted(p.name for p in out.glob("*.png") if p.name != "samples.png")
        assert plots == [
            "by_type_test.png",
            "by_type_val.png",
            "iou_hist_test.png",
            "iou_hist_val.png",
            "threshold_test_iou.png",  # accuracy against the IoU threshold, per split (docs/TRUST.md)
            "threshold_val_iou.png",
        ]
        md = (out / "report.md").read_text()
        assert "(iou_hist_val.png)" in md and "(by_type_test.png)" in md and "iou_hist.png" not in md
