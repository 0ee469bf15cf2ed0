"""GRIT construction (`kosmos2 grit build`): the precomputed path end to end into GRIT-20M parquet, the input
kinds, sharding and resume after SIGKILL, workers, the Ray engine, and a tiny OWLv2 run through the pipeline.

The caption parses these tests rely on are unambiguous for en_core_web_sm 3.8.0 (spaCy 3.8.3):
"A dog in a field of flowers." -> chunks "A dog" [0, 5), "a field" [9, 16), "flowers" [20, 27); expressions
"A dog in a field of flowers" [0, 27), "a field of flowers" [9, 27), "flowers" [20, 27) (the paper's example).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from kosmos2.data import grit
from kosmos2.data.detectors import Detector, PrecomputedDetections
from kosmos2.data.grit import BuildSettings, build, read_records

pytest.importorskip("spacy")

REPO = Path(__file__).resolve().parents[1]

# The released GRIT-20M parquet schema, written out here rather than taken from the code under test: the names
# and types of SPEC §9, in the order of the released files (zzliang/GRIT's dataset card lists its features
# as key, clip_similarity_vitb32, clip_similarity_vitl14, id, url, caption, width, height, noun_chunks,
# ref_exps; issue 34).
RELEASED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("clip_similarity_vitb32", pa.float64()),
        ("clip_similarity_vitl14", pa.float64()),
        ("id", pa.int64()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("noun_chunks", pa.list_(pa.list_(pa.float64()))),
        ("ref_exps", pa.list_(pa.list_(pa.float64()))),
    ]
)


def released_table() -> pa.Table:
    """One record as a released GRIT-20M file holds it (values made up, layout and types as released)."""
    row = {
        "key": "000195616",
        "clip_similarity_vitb32": 0.2958984375,
        "clip_similarity_vitl14": 0.2607421875,
        "id": 1932941052498,
        "url": "https://example.com/released.jpg",
        "caption": "A dog in a field of flowers",
        "width": 640,
        "height": 427,
        "noun_chunks": [[0.0, 5.0, 0.1, 0.2, 0.5, 0.6, 0.81]],
        "ref_exps": [[0.0, 27.0, 0.1, 0.2, 0.5, 0.6, 0.81]],
    }
    return pa.Table.from_pylist([row], schema=RELEASED_SCHEMA)


CAPTIONS = [
    "A dog in a field of flowers.",  # 0: grounded (see the module docstring)
    "A man riding a horse.",  # 1: no detection above 0.65 -> dropped
    "Love and freedom.",  # 2: only abstract chunks -> no chunk -> dropped
    "A cat on a sofa.",  # 3: corrupt image -> dropped
    "A red car parked on the street.",  # 4: url, id and CLIP scores from the input
]


def _image_bytes(size, colour, fmt):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def _make_input(directory: Path, n_extra: int = 0) -> Path:
    """A folder with images and a JSONL listing: the five pairs above, then n_extra copies of pair 0."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "images").mkdir(exist_ok=True)
    rows = []
    files = [
        ("0.jpg", _image_bytes((64, 48), (200, 10, 10), "JPEG")),
        ("1.png", _image_bytes((40, 30), (10, 200, 10), "PNG")),
        ("2.png", _image_bytes((20, 20), (10, 10, 200), "PNG")),
        ("3.jpg", b"this is not an image"),
        ("4.png", _image_bytes((50, 100), (90, 90, 90), "PNG")),
    ]
    for i, (name, data) in enumerate(files):
        (directory / "images" / name).write_bytes(data)
        rows.append({"image": f"images/{name}", "caption": CAPTIONS[i]})
    rows[4].update(
        url="http://example.com/car.png", id=77, clip_similarity_vitb32=0.31, clip_similarity_vitl14=0.27
    )
    for _ in range(n_extra):
        rows.append({"image": "images/0.jpg", "caption": CAPTIONS[0]})
    with open(directory / "pairs.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return directory / "pairs.jsonl"


def _make_detections(path: Path, keys) -> Path:
    """Detections for pair 0 (under each of `keys`: copies of pair 0), pair 4, and a weak one for pair 1."""
    lines = []
    for key in keys:
        lines.append(
            {
                "key": key,
                "detections": [
                    {"phrase": "a dog", "box": [0.1, 0.2, 0.5, 0.6], "score": 0.9},
                    {"phrase": "a dog", "box": [0.6, 0.2, 0.9, 0.6], "score": 0.5},  # below 0.65
                    {"phrase": "flowers", "box": [0.0, 0.5, 1.0, 1.0], "score": 0.7},
                    # same region as "flowers", lower score: removed by NMS across chunks (IoU 0.96)
                    {"phrase": "a field", "box": [0.0, 0.5, 1.0, 0.98], "score": 0.68},
                ],
            }
        )
    lines.append(
        {"key": "000000001", "detections": [{"phrase": "a horse", "box": [0, 0, 1, 1], "score": 0.6}]}
    )
    lines.append(
        {
            "key": "000000004",
            "detections": [
                {"phrase": "the street", "box": [0.0, 0.6, 1.0, 1.0], "score": 0.8},
                {"phrase_index": 0, "box": [0.2, 0.3, 0.6, 0.7], "score": 0.95},  # "A red car"
                {"phrase_index": 0, "box": [0.7, 0.3, 0.9, 0.5], "score": 0.75},  # a second car box
            ],
        }
    )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _settings(tmp_path, listing, detections, **overrides):
    values = dict(
        input=str(listing),
        output=str(tmp_path / "out"),
        detector="precomputed",
        detector_path=str(detections),
        shard_size=1000,
    )
    values.update(overrides)
    return BuildSettings(**values)


@pytest.fixture
def small_input(tmp_path):
    listing = _make_input(tmp_path / "in")
    detections = _make_detections(tmp_path / "det.jsonl", ["000000000"])
    return listing, detections


# ------------------------------------------------------------------------------------------------------------
# The precomputed path end to end


def test_precomputed_build_writes_released_schema_and_values(tmp_path, small_input):
    listing, detections = small_input
    summary = build(_settings(tmp_path, listing, detections), progress=False)
    assert summary.counts == {
        "pairs": 5,
        "records": 2,
        "no_chunks": 1,
        "no_boxes": 1,
        "bad_images": 1,
    }
    table = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert table.schema.equals(RELEASED_SCHEMA, check_metadata=False)
    assert table.column_names == list(RELEASED_SCHEMA.names)
    # released files and ours concatenate as they are (pyarrow requires the same columns in the same order)
    both = pa.concat_tables([released_table(), table])
    assert both.num_rows == 3 and both.column("key").to_pylist()[0] == "000195616"
    records = table.to_pylist()
    assert records == [
        {
            "key": "000000000",
            "id": 0,
            "url": None,
            "caption": "A dog in a field of flowers.",
            "width": 64,
            "height": 48,
            "clip_similarity_vitb32": None,
            "clip_similarity_vitl14": None,
            # [start, end, x1, y1, x2, y2, score]: "A dog" and "flowers"; "a field" lost to NMS, the 0.5 dog
            # box to the threshold
            "noun_chunks": [[0.0, 5.0, 0.1, 0.2, 0.5, 0.6, 0.9], [20.0, 27.0, 0.0, 0.5, 1.0, 1.0, 0.7]],
            # parallel: "A dog in a field of flowers" and "flowers", still nested
            "ref_exps": [[0.0, 27.0, 0.1, 0.2, 0.5, 0.6, 0.9], [20.0, 27.0, 0.0, 0.5, 1.0, 1.0, 0.7]],
        },
        {
            "key": "000000004",
            "id": 77,
            "url": "http://example.com/car.png",
            "caption": "A red car parked on the street.",
            "width": 50,
            "height": 100,
            "clip_similarity_vitb32": 0.31,
            "clip_similarity_vitl14": 0.27,
            # "A red car" [0, 9) has two boxes (best first), "the street" [20, 30)
            "noun_chunks": [
                [0.0, 9.0, 0.2, 0.3, 0.6, 0.7, 0.95],
                [0.0, 9.0, 0.7, 0.3, 0.9, 0.5, 0.75],
                [20.0, 30.0, 0.0, 0.6, 1.0, 1.0, 0.8],
            ],
            # "A red car parked on the street" [0, 30) for the car; the street stays itself
            "ref_exps": [
                [0.0, 30.0, 0.2, 0.3, 0.6, 0.7, 0.95],
                [0.0, 30.0, 0.7, 0.3, 0.9, 0.5, 0.75],
                [20.0, 30.0, 0.0, 0.6, 1.0, 1.0, 0.8],
            ],
        },
    ]
    # spans index the caption
    assert records[1]["caption"][20:30] == "the street"

    # the webdataset shard: the input image file itself, the caption, the record plus the filtered phrases
    with tarfile.open(tmp_path / "out" / "part-00000.tar") as tar:
        names = tar.getnames()
        assert names == [
            "000000000.jpg",
            "000000000.txt",
            "000000000.json",
            "000000004.png",
            "000000004.txt",
            "000000004.json",
        ]
        assert tar.extractfile("000000000.jpg").read() == (listing.parent / "images" / "0.jpg").read_bytes()
        assert tar.extractfile("000000004.txt").read().decode() == CAPTIONS[4]
        meta = json.loads(tar.extractfile("000000000.json").read())
    assert {k: meta[k] for k in records[0]} == records[0]
    # containment: "flowers" lies inside "A dog in a field of flowers" and goes
    assert meta["phrases"] == [[0, 27, [[0.1, 0.2, 0.5, 0.6, 0.9]]]]

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["complete"] is True and list(manifest["shards"]) == ["00000"]


def test_input_kinds_give_the_same_records(tmp_path, small_input):
    listing, detections = small_input
    build(_settings(tmp_path, listing, detections), progress=False)
    expected = read_records(tmp_path / "out")
    images = listing.parent / "images"
    rows = [json.loads(line) for line in listing.read_text().splitlines()]

    # CSV listing
    csv_file = listing.parent / "pairs.csv"
    columns = ["image", "caption", "url", "id", "clip_similarity_vitb32", "clip_similarity_vitl14"]
    import csv

    with open(csv_file, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    # parquet with image bytes (Hugging Face's {bytes, path} struct) and parquet with paths
    full_rows = [{c: r.get(c) for c in columns} for r in rows]  # from_pylist takes its columns from row 0
    table_bytes = pa.Table.from_pylist(
        [
            dict(r, image={"bytes": (listing.parent / r["image"]).read_bytes(), "path": None})
            for r in full_rows
        ]
    )
    (tmp_path / "pq").mkdir()
    pq.write_table(table_bytes, tmp_path / "pq" / "pairs.parquet", row_group_size=2)
    pq.write_table(pa.Table.from_pylist(full_rows), listing.parent / "paths.parquet")
    # webdataset tar: <key>.<image ext>, <key>.txt, <key>.json with the other fields
    (tmp_path / "wds").mkdir()
    with tarfile.open(tmp_path / "wds" / "pairs.tar", "w") as tar:
        for i, r in enumerate(rows):
            key = f"{i:09d}"
            ext = r["image"].rsplit(".", 1)[1]
            tar.add(images / Path(r["image"]).name, arcname=f"{key}.{ext}")
            meta = json.dumps({k: v for k, v in r.items() if k not in ("image", "caption")}).encode()
            for name, data in ((f"{key}.txt", r["caption"].encode()), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    inputs = [csv_file, tmp_path / "pq", listing.parent / "paths.parquet", tmp_path / "wds"]
    for n, source in enumerate(inputs):
        out = tmp_path / f"out{n}"
        build(_settings(tmp_path, source, detections, output=str(out), shard_size=2), progress=False)
        assert read_records(out) == expected, source


def test_shards_resume_and_settings_check(tmp_path, small_input):
    listing, detections = small_input
    settings = _settings(tmp_path, listing, detections, shard_size=2)
    first = build(settings, progress=False)
    assert (first.shards_total, first.shards_run) == (3, 3)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".lock",  # held while a build writes the folder
        "manifest.json",
        "part-00000.parquet",
        "part-00000.tar",
        "part-00001.parquet",
        "part-00001.tar",
        "part-00002.parquet",
        "part-00002.tar",
    ]
    # shard 1 (pairs 2, 3) keeps no record but is written and committed
    assert pq.read_table(tmp_path / "out" / "part-00001.parquet").num_rows == 0
    again = build(settings, progress=False)
    assert (again.shards_run, again.shards_skipped) == (0, 3)
    assert again.counts == first.counts
    with pytest.raises(ValueError, match="nms_iou"):
        build(_settings(tmp_path, listing, detections, shard_size=2, nms_iou=0.7), progress=False)
    # a second build cannot write the folder while one holds it
    shards, files = grit.plan_shards(listing, 2)
    holder = grit.Manifest.open(tmp_path / "out", settings.fingerprint(), files, len(shards))
    try:
        with pytest.raises(ValueError, match="another grit build"):
            build(settings, progress=False)
    finally:
        holder.close()
    assert build(settings, progress=False).shards_skipped == 3


def test_overwrite_starts_a_build_with_other_settings_over(tmp_path, small_input, capsys):
    from kosmos2.cli import main

    listing, detections = small_input
    out = tmp_path / "out"
    command = ["grit", "build", str(listing), str(out), "--detections", str(detections), "--no-progress"]
    assert main([*command, "--shard-size", "2"]) == 0  # 3 shards
    capsys.readouterr()
    (out / "notes.txt").write_text("mine")  # not the build's: stays
    (out / ".part-00007.tar.x1y2.tmp").write_bytes(b"torn")  # a killed run's temporary file
    # other settings: refused, and the message names the remedy
    assert main([*command, "--shard-size", "5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shard_size: 2 then, 5 now" in err and "--overwrite" in err
    assert main([*command, "--shard-size", "5", "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out)["shards"] == 1
    names = sorted(p.name for p in out.iterdir())
    assert names == [".lock", "manifest.json", "notes.txt", "part-00000.parquet", "part-00000.tar"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["shard_size"] == 5 and list(manifest["shards"]) == ["00000"]
    # same records as a fresh build with those settings
    assert main([*command[:3], str(tmp_path / "fresh"), *command[4:], "--shard-size", "5"]) == 0
    assert read_records(out) == read_records(tmp_path / "fresh")
    # shard files without a manifest: the message names the remedy too
    (out / "manifest.json").unlink()
    assert main([*command, "--shard-size", "5"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main([*command, "--shard-size", "5", "--overwrite"]) == 0


def test_help_says_boxes_are_normalised_and_the_default_key(capsys):
    from kosmos2.cli import main

    with pytest.raises(SystemExit):
        main(["grit", "build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "boxes normalised to the image (x divided by its width, y by its height, all in [0, 1]" in text
    assert "the first pair is 000000000, the 43rd 000000042" in text
    assert "--overwrite" in text


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"image": "a.jpg"}], "no caption"),
        ([{"caption": "x"}], "no image path"),
        ([{"image": "a.jpg", "caption": "x", "key": "a.b"}], "cannot name webdataset members"),
        ([{"image": "a.jpg", "caption": "x", "id": "seven"}], "id must be an integer"),
    ],
)
def test_bad_listing_rows_are_named(tmp_path, rows, message):
    listing = tmp_path / "pairs.jsonl"
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    detections = tmp_path / "det.jsonl"
    detections.write_text("")
    with pytest.raises(ValueError, match=message) as info:
        build(_settings(tmp_path, listing, detections), progress=False)
    assert "pairs.jsonl:1" in str(info.value)


def test_bad_inputs_and_settings(tmp_path):
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text("")
    (tmp_path / "mixed" / "b.csv").write_text("image,caption\n")
    with pytest.raises(ValueError, match="exactly one kind"):
        grit.plan_shards(tmp_path / "mixed", 10)
    with pytest.raises(FileNotFoundError):
        grit.plan_shards(tmp_path / "nope", 10)
    with pytest.raises(ValueError, match="needs a path"):
        BuildSettings(input="x", output="y", detector="owlv2")
    with pytest.raises(ValueError, match="shard_size"):
        BuildSettings(input="x", output="y", detector_path="d", shard_size=0)


# ------------------------------------------------------------------------------------------------------------
# Kill and resume, workers


class SlowDetector(Detector):
    """Precomputed detections that take `delay` seconds per call: a build long enough to kill mid-run."""

    name = "slow-precomputed"

    def __init__(self, path: str, delay: float) -> None:
        self.inner = PrecomputedDetections(path)
        self.delay = delay

    def detect(self, images, phrases_per_image, keys=None):
        time.sleep(self.delay)
        return self.inner.detect(images, phrases_per_image, keys)


def slow_factory(path: str, delay: float):
    return functools.partial(SlowDetector, path, delay)


def _tar_contents(directory: Path) -> dict[str, bytes]:
    contents = {}
    for file in sorted(directory.glob("part-*.tar")):
        with tarfile.open(file) as tar:
            for member in tar:
                contents[member.name] = tar.extractfile(member).read()
    return contents


_KILLED_RUN = """
import json, sys
sys.path[:0] = [{tests!r}, {repo!r}]
from test_grit import slow_factory
from kosmos2.data.grit import BuildSettings, build
settings = BuildSettings(**json.loads(sys.argv[1]))
build(settings, progress=False, detector_factory=slow_factory({detections!r}, 0.3))
"""


def test_sigkill_mid_run_then_resume_loses_and_duplicates_nothing(tmp_path):
    listing = _make_input(tmp_path / "in", n_extra=9)  # 14 pairs, 14 shards of one pair
    keys = ["000000000"] + [f"{i:09d}" for i in range(5, 14)]
    detections = _make_detections(tmp_path / "det.jsonl", keys)
    reference = _settings(tmp_path, listing, detections, shard_size=1, output=str(tmp_path / "reference"))
    expected = build(reference, progress=False, detector_factory=slow_factory(str(detections), 0.0))

    killed = _settings(tmp_path, listing, detections, shard_size=1, workers=2)
    values = {f: getattr(killed, f) for f in killed.__dataclass_fields__}
    script = _KILLED_RUN.format(tests=str(REPO / "tests"), repo=str(REPO), detections=str(detections))
    process = subprocess.Popen([sys.executable, "-c", script, json.dumps(values)], start_new_session=True)
    manifest = tmp_path / "out" / "manifest.json"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 3:
                break
            assert process.poll() is None, "the build ended before it could be killed"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)  # the build and its worker processes, mid-run
    finally:
        process.wait(timeout=30)
    done_before = json.loads(manifest.read_text())["shards"]
    assert 3 <= len(done_before) < 14, "the kill should land mid-run"

    resumed = build(killed, progress=False, detector_factory=slow_factory(str(detections), 0.0))
    assert resumed.shards_skipped == len(done_before) and resumed.shards_run == 14 - len(done_before)
    assert read_records(tmp_path / "out") == read_records(tmp_path / "reference")
    keys_written = [r["key"] for r in read_records(tmp_path / "out")]
    assert len(keys_written) == len(set(keys_written)) == 11  # 2 from the five pairs + 9 copies of pair 0
    assert _tar_contents(tmp_path / "out") == _tar_contents(tmp_path / "reference")
    assert not list((tmp_path / "out").glob(".*tmp"))
    assert resumed.counts == expected.counts


def _descendants(pid: int) -> set[int]:
    """Live (not zombie) processes under `pid`, from /proc (Linux)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rpartition(")")[2].split()[:2]
            if state != "Z":
                parents[int(entry.name)] = int(ppid)
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"  # a zombie has ended; only its parent may reap it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
@pytest.mark.parametrize(
    "how",
    [
        pytest.param(signal.SIGKILL, id="SIGKILL"),
        # the same mechanism (any death of the parent); 15-50 s like the SIGKILL case, so left to -m slow
        pytest.param(signal.SIGTERM, id="SIGTERM", marks=pytest.mark.slow),
    ],
)
def test_workers_end_with_their_killed_parent(tmp_path, how):
    listing = _make_input(tmp_path / "in", n_extra=40)  # 45 shards of one pair, 0.3 s each
    keys = ["000000000"] + [f"{i:09d}" for i in range(5, 45)]
    detections = _make_detections(tmp_path / "det.jsonl", keys)
    settings = _settings(tmp_path, listing, detections, shard_size=1, workers=2)
    values = {f: getattr(settings, f) for f in settings.__dataclass_fields__}
    script = _KILLED_RUN.format(tests=str(REPO / "tests"), repo=str(REPO), detections=str(detections))
    process = subprocess.Popen([sys.executable, "-c", script, json.dumps(values)], start_new_session=True)
    manifest = tmp_path / "out" / "manifest.json"
    try:
        deadline = time.monotonic() + 120
        while not (manifest.exists() and json.loads(manifest.read_text())["shards"]):
            assert process.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline, "no shard done in 120 s"
            time.sleep(0.05)
        workers = _descendants(process.pid)
        assert len(workers) >= 2  # the two workers (and multiprocessing's resource tracker)
        process.send_signal(how)  # the parent only, not its process group
        process.wait(timeout=30)
        deadline = time.monotonic() + 20
        while (left := {p for p in workers if _alive(p)}) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"worker processes {sorted(left)} outlived their parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left, so that a failure leaks nothing
        process.wait(timeout=30)
    done = json.loads(manifest.read_text())["shards"]
    assert 1 <= len(done) < 45
    # and the folder resumes: nothing was left locked or half-written
    summary = build(settings, progress=False, detector_factory=slow_factory(str(detections), 0.0))
    assert summary.shards_skipped == len(done) and summary.shards_run == 45 - len(done)


_WATCHING_CHILD = """
import os, sys, time
sys.path[:0] = [{repo!r}]
sys.platform = "other"  # no prctl: the os.getppid() poll alone must notice the parent's death
from kosmos2.data.grit import end_with_parent
end_with_parent(int(sys.argv[1]), poll_seconds=0.1)
print("watching", flush=True)
time.sleep(60)
"""
_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(__import__("os").getpid())],
                         stdout=subprocess.PIPE, text=True)
assert child.stdout.readline() == "watching\\n"
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
def test_parent_poll_ends_a_worker_without_prctl():
    child_script = _WATCHING_CHILD.format(repo=str(REPO))
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, child_script],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)


# ------------------------------------------------------------------------------------------------------------
# The Ray engine, the CLI, a model detector in the pipeline


@pytest.mark.slow
def test_ray_engine_gives_the_same_records_as_the_local_one(tmp_path, small_input):
    pytest.importorskip("ray")
    import ray

    from kosmos2.data.grit_ray import build_ray

    listing, detections = small_input
    build(_settings(tmp_path, listing, detections, shard_size=2), progress=False)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        settings = _settings(tmp_path, listing, detections, shard_size=2, output=str(tmp_path / "ray"))
        summary = build_ray(settings, progress=False)
    finally:
        ray.shutdown()
    assert summary.shards_run == 3
    assert read_records(tmp_path / "ray") == read_records(tmp_path / "out")
    assert _tar_contents(tmp_path / "ray") == _tar_contents(tmp_path / "out")
    ray_manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    local_manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert ray_manifest["shards"] == local_manifest["shards"]


def test_cli_grit_build(tmp_path, small_input, capsys):
    from kosmos2.cli import main

    listing, detections = small_input
    out = tmp_path / "cli"
    code = main(["grit", "build", str(listing), str(out), "--detections", str(detections), "--no-progress"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records"] == 2 and report["shards"] == 1
    assert len(read_records(out)) == 2
    assert main(["grit", "build", str(listing), str(out), "--detector", "owlv2", "--no-progress"]) == 2
    assert "needs --model-dir" in capsys.readouterr().err


@pytest.mark.reference
def test_tiny_owlv2_through_the_pipeline(tmp_path, small_input):
    pytest.importorskip("scipy", reason="OWLv2's image processor needs scipy without torchvision")
    from _detector_fixtures import build_owlv2

    listing, _ = small_input
    model = build_owlv2(tmp_path / "owlv2")
    settings = BuildSettings(
        input=str(listing),
        output=str(tmp_path / "owl"),
        detector="owlv2",
        detector_path=str(model),
        score_threshold=0.0,  # random weights: keep every box so that records come out
        batch_size=2,
    )
    summary = build(settings, progress=False)
    assert summary.counts["records"] == 3 and summary.counts["bad_images"] == 1
    table = pq.read_table(tmp_path / "owl" / "part-00000.parquet")
    assert table.schema.equals(RELEASED_SCHEMA, check_metadata=False)
    for record in table.to_pylist():
        assert len(record["noun_chunks"]) == len(record["ref_exps"]) > 0
        for chunk, expression in zip(record["noun_chunks"], record["ref_exps"], strict=True):
            assert chunk[2:] == expression[2:]  # same box and score
            assert expression[0] <= chunk[0] < chunk[1] <= expression[1] <= len(record["caption"])
            assert all(0.0 <= v <= 1.0 for v in chunk[2:])
