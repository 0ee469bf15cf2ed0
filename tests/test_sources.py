"""kosmos2.data.sources: each annotation format on a small fixture in its real layout, with the expected
samples worked out by hand, and bad records counted by file and record.

Box arithmetic (SPEC §4, 32×32 grid; on a 64×64 image a cell is 2×2 pixels): ul = floor(y1/2)·32 +
floor(x1/2), lr = ceil(y2/2 − 1)·32 + ceil(x2/2 − 1) in pixels. So
    (0, 0, 16, 16)  -> 0, 7·32+7 = 231          (32, 0, 64, 16)  -> 16, 7·32+31 = 255
    (32, 40, 64, 64) -> 20·32+16 = 656, 1023     (0, 0, 4, 2)     -> 0, 0·32+1 = 1
    (10, 10, 30, 30) -> 5·32+5 = 165, 14·32+14 = 462     (40, 40, 64, 64) -> 660, 1023
    (0, 0, 10, 10)  -> 0, 4·32+4 = 132          (30, 30, 60, 60) -> 15·32+15 = 495, 29·32+29 = 957
    (0, 0, 32, 32) on the 224 crop of GRIT (normalised 0..0.5) -> 0, 15·32+15 = 495
"""

from __future__ import annotations

import io
import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _eval_fixtures import (
    write_coco_images,
    write_entities,
    write_flickr_images,
    write_mdetr_refcoco,
    write_refer,
)
from PIL import Image

from kosmos2.data import grit_reader
from kosmos2.data.sources import (
    Report,
    draw,
    held_out,
    load_sources,
    parse_spec,
    position_word,
)

D = "</delimiter_of_multi_objects/>"


def P(i: int) -> str:
    return f"<patch_index_{i:04d}>"


def O(*pairs: tuple[int, int]) -> str:  # noqa: E743 - markup written by hand, not through grounding
    return "<object>" + D.join(P(a) + P(b) for a, b in pairs) + "</object>"


def _png(path, size=(64, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path)
    return path


def _read(spec: str):
    report = Report()
    data = load_sources(parse_spec(spec), report)
    return [s for part in data.train for s in part], report


def _triples(samples):
    return [(s.task, s.prompt, s.target) for s in samples]


# ------------------------------------------------------------------------------------------------------------
# COCO


def _coco(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 64, "height": 64},
            {"id": 2, "file_name": "missing.png", "width": 64, "height": 64},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [0, 0, 16, 16], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [32, 0, 32, 16], "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 2, "bbox": [32, 40, 32, 24], "iscrowd": 0},
            {
                "id": 13,
                "image_id": 1,
                "category_id": 1,
                "bbox": [0, 0, 64, 64],
                "iscrowd": 1,
            },  # crowd: skipped
            {"id": 14, "image_id": 1, "category_id": 1, "bbox": [60, 60, 10, 10], "iscrowd": 0},  # outside
            {"id": 15, "image_id": 1, "category_id": 99, "bbox": [0, 0, 8, 8], "iscrowd": 0},  # no category
            {"id": 16, "image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 5], "iscrowd": 0},  # no area
            {"id": 17, "image_id": 2, "category_id": 1, "bbox": [0, 0, 8, 8], "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(data))
    return f"coco:{tmp_path / 'instances.json'}:images={tmp_path / 'imgs'}"


def test_coco_captions_rec_and_reg_by_hand(tmp_path):
    samples, report = _read(_coco(tmp_path))
    reg = "<phrase> It</phrase>{} is"
    assert _triples(samples) == [
        (
            "caption",
            "<grounding>An image of",
            f" <phrase>dog</phrase>{O((0, 231))} and <phrase>cat</phrase>{O((16, 255), (656, 1023))}.",
        ),
        ("rec", "<grounding><phrase>the dog</phrase>", O((0, 231))),
        ("reg", reg.format(O((0, 231))), "the dog"),
        # two cats, one above the other (centres 8 and 52 px: 0.69 of the height apart): named by position
        ("rec", "<grounding><phrase>the cat at the top</phrase>", O((16, 255))),
        ("reg", reg.format(O((16, 255))), "the cat at the top"),
        ("rec", "<grounding><phrase>the cat at the bottom</phrase>", O((656, 1023))),
        ("reg", reg.format(O((656, 1023))), "the cat at the bottom"),
    ]
    assert samples[0].truth == (
        ("dog", ((0.0, 0.0, 0.25, 0.25),)),
        ("cat", ((0.5, 0.0, 1.0, 0.25), (0.5, 0.625, 1.0, 1.0))),
    )
    assert report.total == 4  # outside, unknown category, no area, missing image; the crowd box is not bad
    reasons = {item["record"]: item["reason"] for item in report.items}
    assert "outside the 64x64 image" in reasons["annotation id 14"]
    assert "empty phrase" in reasons["annotation id 15"]
    assert "no area" in reasons["annotation id 16"]
    assert "not found" in reasons["image id 2"]
    assert all(item["file"].endswith("instances.json") for item in report.items)


def test_coco_tasks_option_and_ambiguous_objects(tmp_path):
    spec = _coco(tmp_path) + ":tasks=rec"
    samples, _ = _read(spec)
    assert [s.task for s in samples] == ["rec"] * 3
    # three objects of one category side by side with nothing singling out the middle one: left, right only
    boxes = [(0.0, 0.4, 0.2, 0.6), (0.4, 0.4, 0.6, 0.6), (0.8, 0.4, 1.0, 0.6)]
    assert [position_word(i, boxes) for i in range(3)] == ["on the left", None, "on the right"]
    assert position_word(0, [(0.0, 0.0, 0.2, 0.2), (0.1, 0.0, 0.3, 0.2)]) is None  # 0.1 apart: too close


# ------------------------------------------------------------------------------------------------------------
# RefCOCO (refer pickles, MDETR json) from the evaluation fixtures


def test_refer_pickles_rec_by_hand(tmp_path):
    root = write_refer(tmp_path / "refer")
    images = write_coco_images(tmp_path / "coco")
    refs = root / "refcoco" / "refs(unc).p"
    with open(refs, "rb") as f:
        data = pickle.load(f)
    data.append({"ref_id": 99, "ann_id": 424242, "image_id": 581857, "split": "val", "sentences": []})
    with open(refs, "wb") as f:
        pickle.dump(data, f, protocol=2)
    samples, report = _read(f"refer:{refs}:split=val:images={images}")
    assert _triples(samples) == [
        ("rec", "<grounding><phrase>the left dog</phrase>", O((0, 1))),
        ("rec", "<grounding><phrase>the tall man</phrase>", O((165, 462))),
        ("rec", "<grounding><phrase>the blue car</phrase>", O((660, 1023))),
    ]
    assert samples[0].image.endswith("train2014/COCO_train2014_000000581857.jpg")
    assert report.total == 1 and report.items[0]["record"] == "ref_id 99"


def test_mdetr_refcoco_rec_and_reg_by_hand(tmp_path):
    folder = write_mdetr_refcoco(tmp_path / "mdetr")
    images = write_coco_images(tmp_path / "coco")
    samples, report = _read(f"mdetr:{folder / 'finetune_refcoco_val.json'}:images={images}:tasks=rec+reg")
    assert _triples(samples)[:2] == [
        ("rec", "<grounding><phrase>the left dog</phrase>", O((0, 1))),
        ("reg", f"<phrase> It</phrase>{O((0, 1))} is", "the left dog"),
    ]
    assert [s.target for s in samples if s.task == "rec"] == [O((0, 1)), O((165, 462)), O((660, 1023))]
    assert report.total == 0


# ------------------------------------------------------------------------------------------------------------
# Flickr30k Entities


def test_flickr_entities_captions_and_phrases_by_hand(tmp_path):
    root = write_entities(tmp_path / "entities")
    images = write_flickr_images(tmp_path / "flickr30k-images")
    samples, report = _read(f"flickr:{root}:split=val:images={images}:tasks=caption+phrase")
    assert _triples(samples) == [
        (
            "caption",
            "<grounding>",
            f"<phrase>Two men</phrase>{O((0, 132), (495, 957))} in <phrase>red hats</phrase>{O((0, 1))} "
            "stand near nothing .",
        ),
        ("phrase", "<grounding> <phrase>Two men</phrase>", O((0, 132), (495, 957))),
        ("phrase", "<grounding>Two men in  <phrase>red hats</phrase>", O((0, 1))),
        ("caption", "<grounding>", f"A street with <phrase>his hand</phrase>{O((0, 1))} ."),
        ("phrase", "<grounding>A street with  <phrase>his hand</phrase>", O((0, 1))),
    ]
    assert report.total == 0


def test_flickr_bad_box_and_missing_image_are_reported(tmp_path):
    root = write_entities(tmp_path / "entities")
    images = write_flickr_images(tmp_path / "flickr30k-images")
    xml = root / "Annotations" / "111.xml"
    xml.write_text(xml.read_text().replace("<xmax>60</xmax>", "<xmax>90</xmax>"))  # beyond the 64 px width
    samples, report = _read(f"flickr:{root}:split=val:images={images}")
    # entity 1 lost its boxes: "Two men" stays plain text, "red hats" is still grounded
    assert samples[0].target == f"Two men in <phrase>red hats</phrase>{O((0, 1))} stand near nothing ."
    assert report.items[0]["record"] == "image 111 entity 1" and "outside" in report.items[0]["reason"]
    (images / "111.jpg").unlink()
    with pytest.raises(ValueError, match="no usable training samples"):
        _read(f"flickr:{root}:split=val:images={images}")


# ------------------------------------------------------------------------------------------------------------
# ODVG


def test_odvg_detection_and_grounding_by_hand(tmp_path):
    _png(tmp_path / "a.png")
    lines = [
        {"filename": "a.png", "height": 64, "width": 64,
         "detection": {"instances": [{"bbox": [0, 0, 16, 16], "label": 0, "category": "dog"}]}},
        {"filename": "a.png", "height": 64, "width": 64,
         "grounding": {"caption": "a dog chases a ball",
                       "regions": [{"bbox": [0, 0, 16, 16], "phrase": "a dog"},
                                   {"bbox": [32, 0, 64, 16], "phrase": "a ball"}]}},
        {"filename": "a.png", "height": 64, "width": 64,
         "grounding": {"caption": "a dog", "regions": [{"bbox": [0, 0, 16, 16], "phrase": "a cat"}]}},
        {"filename": "gone.png", "height": 64, "width": 64, "detection": {"instances": []}},
    ]  # fmt: skip
    path = tmp_path / "odvg.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    samples, report = _read(f"odvg:{path}:tasks=caption+rec")
    assert _triples(samples) == [
        ("caption", "<grounding>An image of", f" <phrase>dog</phrase>{O((0, 231))}."),
        ("rec", "<grounding><phrase>the dog</phrase>", O((0, 231))),
        (
            "caption",
            "<grounding>",
            f"<phrase>a dog</phrase>{O((0, 231))} chases <phrase>a ball</phrase>{O((16, 255))}",
        ),
        ("rec", "<grounding><phrase>a dog</phrase>", O((0, 231))),
        ("rec", "<grounding><phrase>a ball</phrase>", O((16, 255))),
    ]
    bad = {item["record"]: item["reason"] for item in report.items}
    assert set(bad) == {"line 3", "line 4", "line 5"}
    assert "'a cat' is not in the caption" in bad["line 3"]
    assert "not found" in bad["line 4"] and "not valid JSON" in bad["line 5"]


# ------------------------------------------------------------------------------------------------------------
# Plain JSONL


def test_jsonl_markup_and_phrase_records_by_hand(tmp_path):
    _png(tmp_path / "a.png")
    lines = [
        {"image": "a.png", "text": f"<grounding>An image of<phrase> a dog</phrase>{O((0, 231))}"},
        {"image": "a.png", "caption": "a dog and a cat",
         "phrases": [{"text": "a dog", "boxes": [[0, 0, 16, 16]]},
                     {"text": "a cat", "boxes": [[32, 0, 64, 16]]}]},
        {"image": "a.png", "caption": "a cat", "normalized": True, "box_format": "xywh",
         "phrases": [{"text": "a cat", "boxes": [[0.5, 0.0, 0.5, 0.25]]}]},
        # bad records, one reason each
        {"image": "a.png", "caption": "a dog", "phrases": [{"text": "a cat", "boxes": [[0, 0, 8, 8]]}]},
        {"image": "a.png", "caption": "a dog", "phrases": [{"text": " ", "boxes": [[0, 0, 8, 8]]}]},
        {"image": "a.png", "caption": "a dog", "phrases": [{"text": "a dog", "boxes": [[0, 0, 100, 10]]}]},
        {"image": "b.png", "text": "a dog"},
        {"image": "a.png", "text": "<phrase>a dog</phrase><object><patch_index_0000></object>"},
    ]  # fmt: skip
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    samples, report = _read(f"jsonl:{path}:tasks=caption")
    assert _triples(samples) == [
        ("text", "<grounding>", f"An image of<phrase> a dog</phrase>{O((0, 231))}"),
        (
            "caption",
            "<grounding>",
            f"<phrase>a dog</phrase>{O((0, 231))} and <phrase>a cat</phrase>{O((16, 255))}",
        ),
        ("caption", "<grounding>", f"<phrase>a cat</phrase>{O((16, 255))}"),
    ]
    bad = {item["record"]: item["reason"] for item in report.items}
    assert "'a cat' is not in the caption" in bad["line 4"]
    assert "empty phrase" in bad["line 5"]
    assert "outside the 64x64 image" in bad["line 6"]
    assert "not found" in bad["line 7"]
    assert "malformed markup" in bad["line 8"]
    assert report.total == 5


# ------------------------------------------------------------------------------------------------------------
# GRIT: parquet with images by key, through grit_reader


def test_grit_parquet_samples_by_hand(tmp_path):
    images = tmp_path / "images"
    _png(images / "g0.png")
    _png(images / "g1.png")
    caption = "a dog on grass"
    rows = [
        {"key": k, "caption": caption, "noun_chunks": [[0, 5, 0, 0, 0.5, 0.5, 0.9]],
         "ref_exps": [[0, 5, 0.0, 0.0, 0.5, 0.5, 0.9]]}
        for k in ("g0", "g1", "g2")
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "grit.parquet")
    samples, report = _read(f"grit:{tmp_path / 'grit.parquet'}:images={images}")
    assert len(samples) == 2
    for key, s in zip(("g0", "g1"), samples, strict=True):
        if grit_reader.is_grounded(key):  # the reader's seeded coin: about half are fed grounded
            assert (s.prompt, s.target) == ("<grounding>", f"<phrase>a dog</phrase>{O((0, 495))} on grass")
        else:
            assert (s.prompt, s.target) == ("", caption)
        assert Image.open(io.BytesIO(s.image)).size == (224, 224)
    assert report.total == 1 and report.items[0]["record"] == "key g2"


# ------------------------------------------------------------------------------------------------------------
# --data specs, mixtures, held-out split


def test_parse_spec_kinds_options_weights(tmp_path):
    coco = _coco(tmp_path)
    (tmp_path / "x.jsonl").write_text("")
    sources = parse_spec(f"{coco}*2,jsonl:{tmp_path / 'x.jsonl'}")
    assert [(s.kind, s.weight) for s in sources] == [("coco", 2.0), ("jsonl", 1.0)]
    assert sources[0].images == tmp_path / "imgs" and sources[0].tasks == ("caption", "rec", "reg")
    assert parse_spec([coco, f"jsonl:{tmp_path / 'x.jsonl'}*0.5"])[1].weight == 0.5  # a repeated --data
    for bad, message in (
        ("voc:/x", "start with one of"),
        (f"{coco}:colour=red", "unknown option"),
        (f"{coco}:tasks=rec+dance", "unknown task"),
        (f"{coco}*0", "weight must be positive"),
        ("coco:/nowhere/instances.json", "not found"),
    ):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            parse_spec(bad)


def test_draw_follows_weights_and_is_a_pure_function_of_the_index():
    a, b = [f"a{i}" for i in range(10)], [f"b{i}" for i in range(3)]
    draws = [draw([a, b], [3, 1], 1, i) for i in range(4000)]
    share = sum(x.startswith("a") for x in draws) / len(draws)
    assert 0.72 < share < 0.78  # 3:1
    assert [draw([a, b], [3, 1], 1, i) for i in range(500, 600)] == draws[500:600]  # resumable anywhere
    single = [draw([a], [1], 1, i) for i in range(30)]
    assert sorted(single[:10]) == sorted(a) and sorted(single[10:20]) == sorted(a)  # each pass: all, once
    assert single[:10] != single[10:20]  # reshuffled per pass
    with pytest.raises(ValueError, match="no training samples"):
        draw([[], []], [1, 1], 0, 0)


def test_held_out_split_is_by_image_and_stable(tmp_path):
    groups = [f"img{i}.png" for i in range(2000)]
    chosen = [g for g in groups if held_out(g, 0.1)]
    assert 150 < len(chosen) < 250 and chosen == [g for g in groups if held_out(g, 0.1)]
    spec = _coco(tmp_path)
    everything = load_sources(parse_spec(spec), holdout=1.0)
    assert everything.heldout and not any(everything.train)  # an image's samples all go to one side
    nothing = load_sources(parse_spec(spec), holdout=0.0)
    assert not nothing.heldout and len({s.group for s in nothing.train[0]}) == 1


def test_the_held_out_split_does_not_depend_on_the_data_sets_folder():
    # the split must not move when the same images sit in another folder (or pytest's tmp dir changes)
    from kosmos2.data.sources import held_out

    names = [f"img{i:03d}.png" for i in range(400)]
    here = [held_out(f"/data/a/{n}", 0.25) for n in names]
    there = [held_out(f"/mnt/copy/b/{n}", 0.25) for n in names]
    assert here == there and 60 < sum(here) < 140  # about a quarter of 400
