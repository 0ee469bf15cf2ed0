"""The GRIT-20M training reader: crop geometry and box re-projection worked out by hand, the 20% area rule,
the score threshold, containment and multi-box phrases, the grounded/plain mix, webdataset/parquet sources."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from kosmos2.data.grit_reader import (
    GritDataset,
    assign_shards,
    crop_geometry,
    grounded_spans,
    is_grounded,
    iter_parquet,
    iter_webdataset,
    prepare_sample,
    project_box,
    resize_and_crop,
)

CAPTION = "A dog in a field of flowers."


def _record(key="k", ref_exps=(), caption=CAPTION):
    return {
        "key": key,
        "caption": caption,
        "noun_chunks": [list(e) for e in ref_exps],
        "ref_exps": list(ref_exps),
    }


# ------------------------------------------------------------------------------------------------------------
# Geometry by hand


def test_crop_geometry_by_hand():
    # 640x480 -> short side 224: 224 * 640 / 480 = 298.67, truncated to 298; crop left (298 - 224) / 2 = 37
    assert crop_geometry(640, 480, 224) == (298, 224, 37, 0)
    # portrait 100x201 -> 50 x int(100.5) = 100; top (100 - 50) / 2 = 25
    assert crop_geometry(100, 201, 50) == (50, 100, 0, 25)
    # 310x200 -> 155 x 100; (155 - 100) / 2 = 27.5 rounds (half to even) to 28
    assert crop_geometry(310, 200, 100) == (155, 100, 28, 0)
    assert crop_geometry(224, 224, 224) == (224, 224, 0, 0)


def test_project_box_by_hand():
    # 640x480 -> resized 298x224, crop x in [37, 261)
    # (0.5, 0.25, 0.75, 0.75): x 149 - 37 = 112 .. 223.5 - 37 = 186.5; y 56 .. 168
    assert project_box((0.5, 0.25, 0.75, 0.75), 640, 480) == pytest.approx((0.5, 0.25, 186.5 / 224, 0.75))
    # (0, 0, 0.2, 0.5): x -37 .. 22.6, keeps 22.6 / 59.6 = 38% of its area -> clipped to 0 .. 22.6
    assert project_box((0.0, 0.0, 0.2, 0.5), 640, 480) == pytest.approx((0.0, 0.0, 22.6 / 224, 0.5))
    # (0, 0, 0.15, 0.5): x -37 .. 7.7, keeps 7.7 / 44.7 = 17% < 20% -> dropped
    assert project_box((0.0, 0.0, 0.15, 0.5), 640, 480) is None
    # ... unless the rule asks for less
    assert project_box((0.0, 0.0, 0.15, 0.5), 640, 480, min_area_fraction=0.1) == pytest.approx(
        (0.0, 0.0, 7.7 / 224, 0.5)
    )
    # (0, 0, 0.1, 0.5): x -37 .. -7.2, outside the crop
    assert project_box((0.0, 0.0, 0.1, 0.5), 640, 480) is None
    # no area
    assert project_box((0.3, 0.3, 0.3, 0.6), 640, 480) is None
    # portrait 100x201 at 50: resized 50x100, crop y in [25, 75); (0.1, 0.5, 0.9, 0.9): x 5 .. 45;
    # y 50 - 25 = 25 .. 90 - 25 = 65, clipped to 50, keeping (50 - 25) / (65 - 25) = 62.5% of the box
    assert project_box((0.1, 0.5, 0.9, 0.9), 100, 201, 50) == pytest.approx((0.1, 0.5, 0.9, 1.0))


def test_resize_and_crop_keeps_the_centre():
    # left half red, right half blue: the split at x = 320 lands at 149 in the resized image, 112 in the crop
    image = Image.new("RGB", (640, 480), (255, 0, 0))
    image.paste((0, 0, 255), (320, 0, 640, 480))
    crop = resize_and_crop(image, 224)
    assert crop.size == (224, 224)
    assert crop.getpixel((105, 100)) == (255, 0, 0)
    assert crop.getpixel((119, 100)) == (0, 0, 255)


# ------------------------------------------------------------------------------------------------------------
# The record rules


def test_score_threshold_is_strict_and_configurable():
    entries = [
        (0, 5, 0.1, 0.1, 0.4, 0.4, 0.66),
        (9, 16, 0.5, 0.5, 0.9, 0.9, 0.65),
        (20, 27, 0.2, 0.6, 0.3, 0.9, 0.64),
    ]
    record = _record(ref_exps=entries)
    assert [s[:2] for s in grounded_spans(record, 224, 224)] == [(0, 5)]
    assert [s[:2] for s in grounded_spans(record, 224, 224, score_threshold=0.5)] == [
        (0, 5),
        (9, 16),
        (20, 27),
    ]


def test_area_rule_applies_per_box():
    # 640x480: the first box survives the crop, the second keeps 17% of its area
    record = _record(ref_exps=[(0, 5, 0.5, 0.25, 0.75, 0.75, 0.9), (9, 16, 0.0, 0.0, 0.15, 0.5, 0.9)])
    spans = grounded_spans(record, 640, 480)
    assert [s[:2] for s in spans] == [(0, 5)]
    assert spans[0][2] == [pytest.approx((0.5, 0.25, 186.5 / 224, 0.75))]


def test_containment_and_multi_box_phrases_then_markup_by_hand():
    record = _record(
        ref_exps=[
            (0, 27, 0.1, 0.2, 0.5, 0.6, 0.9),  # "A dog in a field of flowers", box 1
            (0, 27, 0.0, 0.5, 1.0, 1.0, 0.8),  # the same span, box 2: one phrase with two boxes
            (20, 27, 0.0, 0.5, 1.0, 1.0, 0.7),  # "flowers": inside the first span, dropped
        ]
    )
    image = Image.new("RGB", (224, 224))  # the crop is the whole image: boxes stay as they are
    sample = prepare_sample(record, image, grounded_fraction=1.0)
    assert sample.grounded and sample.image.size == (224, 224)
    assert [s[:2] for s in sample.phrases] == [(0, 27)]
    # box 1: cells (col 3, row 6) = 195 and (ceil(16 - 1), ceil(19.2 - 1)) = (15, 19) = 623;
    # box 2: (0, 16) = 512 and (31, 31) = 1023
    assert sample.text == (
        "<grounding><phrase>A dog in a field of flowers</phrase><object><patch_index_0195><patch_index_0623>"
        "</delimiter_of_multi_objects/><patch_index_0512><patch_index_1023></object>."
    )
    plain = prepare_sample(record, image, grounded_fraction=0.0)
    assert not plain.grounded and plain.text == CAPTION and plain.phrases == sample.phrases


def test_partial_overlaps_keep_the_first_span():
    record = _record(ref_exps=[(0, 16, 0.1, 0.1, 0.2, 0.2, 0.9), (9, 27, 0.5, 0.5, 0.6, 0.6, 0.9)])
    assert [s[:2] for s in grounded_spans(record, 224, 224)] == [(0, 16)]


def test_no_surviving_phrase_is_fed_plain_and_markup_in_captions_is_refused():
    record = _record(ref_exps=[(0, 5, 0.1, 0.1, 0.4, 0.4, 0.5)])
    sample = prepare_sample(record, Image.new("RGB", (300, 200)), grounded_fraction=1.0)
    assert not sample.grounded and sample.text == CAPTION
    with pytest.raises(ValueError, match="markup token"):
        prepare_sample(_record(caption="a <phrase> trap"), Image.new("RGB", (10, 10)))
    with pytest.raises(ValueError, match="not \\[start, end"):
        grounded_spans(_record(ref_exps=[(0, 5, 0.1)]), 10, 10)


def test_grounded_plain_mix_is_about_half_and_seeded():
    keys = [f"{i:09d}" for i in range(4000)]
    first = [is_grounded(k, seed=3) for k in keys]
    assert 0.47 < sum(first) / len(keys) < 0.53
    assert first == [is_grounded(k, seed=3) for k in keys]  # deterministic
    other_seed = [is_grounded(k, seed=4) for k in keys]
    next_epoch = [is_grounded(k, seed=3, epoch=1) for k in keys]
    for other in (other_seed, next_epoch):
        changed = sum(a != b for a, b in zip(first, other, strict=True)) / len(keys)
        assert 0.4 < changed < 0.6  # independent draws differ half the time
    assert 0.27 < sum(is_grounded(k, fraction=0.3) for k in keys) / len(keys) < 0.33


# ------------------------------------------------------------------------------------------------------------
# Sources


def _png(size, colour=(0, 128, 0)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path, keys, broken=()):
    with tarfile.open(path, "w") as tar:
        for key in keys:
            record = _record(key=key, ref_exps=[(0, 5, 0.1, 0.1, 0.6, 0.6, 0.9)])
            _add(tar, f"{key}.png", b"broken" if key in broken else _png((80, 60)))
            _add(tar, f"{key}.txt", CAPTION.encode())
            _add(tar, f"{key}.json", json.dumps({k: v for k, v in record.items() if k != "caption"}).encode())
    return path


def test_iter_webdataset_reads_records_and_captions(tmp_path):
    shard = _write_shard(tmp_path / "a.tar", ["a1", "a2"])
    samples = list(iter_webdataset(shard))
    assert [r["key"] for r, _ in samples] == ["a1", "a2"]
    assert samples[0][0]["caption"] == CAPTION  # from <key>.txt
    assert Image.open(io.BytesIO(samples[0][1])).size == (80, 60)


def test_iter_parquet_finds_images_by_key(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x1.png").write_bytes(_png((20, 10)))
    table = pa.Table.from_pylist([_record(key="x1"), _record(key="x2")])
    pq.write_table(table, tmp_path / "grit.parquet")
    rows = list(iter_parquet(tmp_path / "grit.parquet", tmp_path / "images"))
    assert [r["key"] for r, _ in rows] == ["x1"]  # x2 has no image: skipped


def test_assign_shards_interleaves_ranks_and_workers():
    paths = ["s0", "s1", "s2", "s3", "s4"]
    assert assign_shards(paths, rank=0, world_size=2, worker=0, num_workers=2) == ["s0", "s4"]
    assert assign_shards(paths, rank=0, world_size=2, worker=1, num_workers=2) == ["s1"]
    assert assign_shards(paths, rank=1, world_size=2, worker=0, num_workers=2) == ["s2"]
    assert assign_shards(paths, rank=1, world_size=2, worker=1, num_workers=2) == ["s3"]


def test_grit_dataset_with_loader_workers_reads_every_sample_once(tmp_path):
    shards = [
        _write_shard(tmp_path / "a.tar", ["a1", "a2"], broken=("a2",)),
        _write_shard(tmp_path / "b.tar", ["b1"]),
        _write_shard(tmp_path / "c.tar", ["c1", "c2"]),
    ]
    dataset = GritDataset(shards, grounded_fraction=1.0, seed=1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, collate_fn=lambda s: s)
    samples = list(loader)
    assert sorted(s.key for s in samples) == ["a1", "b1", "c1", "c2"]  # a2's image is broken: skipped
    for s in samples:
        assert s.grounded and s.image.size == (224, 224)
        assert s.text.startswith("<grounding><phrase>A dog</phrase><object>")
    with pytest.raises(FileNotFoundError):
        GritDataset([tmp_path / "missing.tar"])
