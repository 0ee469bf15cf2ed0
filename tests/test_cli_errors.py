"""Every bad input to `kosmos2` gets one clear line and a documented exit status (issue 34), and one bad image
never loses the others' results.

Runs in-process through `kosmos2.cli.main` with capsys (argparse errors raise SystemExit(2), as argparse
does), plus real console-script processes where the process boundary matters (--debug, the exit status).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from kosmos2.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `kosmos2 ARGV` in this process."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: a malformed command line
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, verb: str = "kosmos2 ground") -> str:
    """The single line of stderr, checked to be `verb: message` with no traceback."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{verb}: ") and "Traceback" not in err, err
    return lines[0]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Good and bad image files, each named for what it is."""
    d = tmp_path_factory.mktemp("inputs")
    good = Image.new("RGB", (60, 40), (30, 120, 200))
    good.save(d / "good.png")
    good.save(d / "good.jpg")
    png, jpg = (d / "good.png").read_bytes(), (d / "good.jpg").read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("not an image\n")
    # a PNG header declaring 30000 x 20000 pixels: a decompression bomb, refused before decoding
    header = struct.pack(">IIBBBBB", 30_000, 20_000, 8, 2, 0, 0, 0)
    (d / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b""))
    Image.new("RGB", (50, 50)).save(d / "big.png")  # 2,500 pixels
    return {p.stem if p.suffix == ".png" else p.name: str(p) for p in d.iterdir()}


# -- 1. one line, a documented exit status ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, message",
    [
        ("text", r"'.*text\.png': not a recognised image format"),
        ("truncated", r"'.*truncated\.png': corrupt or truncated PNG data"),
        ("truncated.jpg", r"'.*truncated\.jpg': .*corrupt.*re-export or re-download the file"),
        ("empty", r"'.*empty\.png': empty \(0 bytes\)"),
        ("bomb", r"'.*bomb\.png': refused by Pillow as a possible decompression bomb.*--max-pixels"),
        ("missing", r"'missing\.png': no such file"),
    ],
)
def test_a_bad_image_is_one_line_and_exit_1(files, tiny_checkpoint_dir, capsys, name, message):
    path = files.get(name, "missing.png")
    code, out, err = run(["ground", path, "--model", str(tiny_checkpoint_dir)], capsys)
    assert code == 1 and out == ""
    assert re.search(message, one_line(err)), err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--max-new-tokens", "0"], r"argument --max-new-tokens: 0 must be 1 or more"),
        (["--num-beams", "0"], r"argument --num-beams: 0 must be 1 or more"),
        (["--batch-size", "0"], r"argument --batch-size: 0 must be 1 or more"),
        (["--sample", "--top-p", "2"], r"argument --top-p: 2 must lie in \(0, 1\]"),
        (["--sample", "--temperature", "0"], r"argument --temperature: 0 must be > 0"),
        (["--temperature", "0.5"], r"--temperature applies only to sampling; add --sample"),
        (["--sample", "--num-beams", "3"], r"beam search does not sample"),
        (["--max-pixels", "many"], r"argument --max-pixels: 'many' is not an integer"),
        (["--task", "poem"], r"argument --task: invalid choice: 'poem'"),
        (["--device", "bogus"], r"device 'bogus' is not a torch device"),
        (["--prompt", ""], r"--prompt '' is empty; leave --prompt out for '<grounding>An image of'"),
        (["--locate", ""], r"--locate '' is empty"),
        (["--locate", "</phrase>"], r"--locate '</phrase>': contains the markup '</phrase>'"),
        (
            ["--prompt", "<grounding>An image of<patch_index_9999>"],
            r"at character 22: .*outside the 32×32 grid",
        ),
        (["--prompt", "<grounding><phrase>the circle"], r"at character 11: unclosed <phrase>"),
        (["--draw", "nowhere/out.png"], r"--draw 'nowhere/out.png': the folder 'nowhere' does not exist"),
        (["--draw", "out.xyz"], r"--draw 'out.xyz': \.xyz is not an image format Pillow writes"),
    ],
)
def test_a_bad_argument_is_one_line_and_exit_2_before_any_work(files, capsys, monkeypatch, options, message):
    from kosmos2.predictor import Predictor

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(Predictor, "from_pretrained", never)
    code, out, err = run(["ground", files["good"], *options], capsys)
    assert code == 2 and out == ""
    assert re.search(message, one_line(err)), err


def test_bad_model_directories(files, tmp_path, capsys, monkeypatch, tiny_checkpoint_dir):
    cases = [
        (tmp_path / "nope", r"model directory '.*nope' does not exist"),
        (files["good"], r"model directory '.*good\.png' is a file, not a directory"),
        (tmp_path, r"config\.json"),
    ]
    for model, message in cases:
        code, out, err = run(["ground", files["good"], "--model", str(model)], capsys)
        assert code == 1 and out == "", err
        assert re.search(message, one_line(err)), err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 4)
    code, _, err = run(["ground", files["good"], "--model", str(broken)], capsys)
    assert code == 1 and "not a safetensors file" in one_line(err)
    monkeypatch.setenv("KOSMOS2_MODEL", str(tmp_path / "nope"))
    code, _, err = run(["ground", files["good"]], capsys)
    assert code == 1 and one_line(err).startswith(f"kosmos2 ground: $KOSMOS2_MODEL='{tmp_path / 'nope'}': ")


def test_debug_shows_the_traceback_and_a_bug_says_it_is_one(files, capsys, monkeypatch):
    code, _, err = run(["ground", files["text"], "--debug"], capsys)
    assert code == 1 and "Traceback" in err and "ImageError" in err
    assert err.splitlines()[-1].startswith("kosmos2 ground: ") and "not a recognised image" in err
    monkeypatch.setenv("KOSMOS2_DEBUG", "1")
    code, _, err = run(["ground", files["text"]], capsys)
    assert code == 1 and "Traceback" in err
    monkeypatch.delenv("KOSMOS2_DEBUG")

    import kosmos2.commands

    def bug(*args, **kwargs):
        return {}["missing"]

    monkeypatch.setattr(kosmos2.commands, "describe_checkpoint", bug)
    code, _, err = run(["info"], capsys)
    line = one_line(err, "kosmos2 info")
    assert code == 1 and "internal error: KeyError: 'missing'; this is a bug: rerun with --debug" in line
    code, _, err = run(["info", "--debug"], capsys)
    assert "Traceback" in err and "internal error" in err.splitlines()[-1]


def test_warnings_are_one_line_too(tiny_checkpoint_dir, capsys, monkeypatch):
    import warnings

    import kosmos2.commands

    def warn(model):
        warnings.warn("something to know", UserWarning, stacklevel=1)
        return {}

    monkeypatch.setattr(kosmos2.commands, "describe_checkpoint", warn)
    code, out, err = run(["info"], capsys)
    assert code == 0 and err == "kosmos2 info: warning: something to know\n"


def test_console_script_exit_statuses_and_debug(files, tiny_checkpoint_dir):
    """Real processes: a bad image among good ones is one line and exit 1 with the good result printed;
    --debug adds the traceback."""
    exe = shutil.which("kosmos2")
    cmd = [exe] if exe else [sys.executable, "-m", "kosmos2.cli"]
    env = {**os.environ, "KOSMOS2_DEBUG": ""}
    base = [*cmd, "ground", "--model", str(tiny_checkpoint_dir), "--max-new-tokens", "2"]
    done = subprocess.run(
        [*base, files["truncated"], files["good"]], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 1 and done.stdout.startswith(f"{files['good']}: ")
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        f"kosmos2 ground: {files['truncated']!r}: corrupt or truncated PNG data (image file is truncated); "
        "re-export or re-download the file",
        "kosmos2 ground: 1 of 2 images failed (named above)",
    ]
    done = subprocess.run(
        [*base, files["empty"], "--debug"], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr
    assert done.stderr.splitlines()[-1].startswith("kosmos2 ground: ")


def test_every_subcommand_reports_one_line_named_for_itself(tiny_checkpoint_dir, tmp_path, capsys):
    """The handling is in `cli.main`, so it covers eval and grit too; unknown options name the subcommand."""
    (tmp_path / "taken").write_text("a file where the output folder should go")
    argv = ["eval", "synthetic", "--model", str(tiny_checkpoint_dir), "--out", str(tmp_path / "taken")]
    code, _, err = run([*argv, "--n-per-task", "1"], capsys)
    assert code == 1 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("kosmos2 eval synthetic: ")  # (above it: the progress bar)
    code, _, err = run(["eval", "synthetic", "--out", str(tmp_path / "o"), "--frobnicate"], capsys)
    assert code == 2 and one_line(err, "kosmos2 eval synthetic").endswith(
        "unrecognized arguments: --frobnicate (see `kosmos2 eval synthetic --help`)"
    )
    code, _, err = run(["grit", "build", "--frobnicate"], capsys)
    assert code == 2 and one_line(err, "kosmos2 grit build")


# -- 2. one bad image does not lose the rest -----------------------------------------------------------------


def test_good_results_survive_bad_images(files, tiny_checkpoint_dir, capsys):
    images = [files["good"], files["truncated"], "missing.png", files["good.jpg"]]
    code, out, err = run(
        ["ground", *images, "--model", str(tiny_checkpoint_dir), "--max-new-tokens", "2", "--json"], capsys
    )
    assert code == 1
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in records] == images  # every input, in order
    assert "caption" in records[0] and "caption" in records[3]
    assert records[1]["error"].startswith(f"{files['truncated']!r}: corrupt or truncated PNG")
    assert records[2] == {"image": "missing.png", "error": "'missing.png': no such file; check the path"}
    lines = err.splitlines()
    assert len(lines) == 3 and all(line.startswith("kosmos2 ground: ") for line in lines)
    assert lines[-1] == "kosmos2 ground: 2 of 4 images failed (named above)"
    # the text output has the good images' results too
    code, out, err = run(
        ["ground", *images, "--model", str(tiny_checkpoint_dir), "--max-new-tokens", "2"], capsys
    )
    assert code == 1 and out.startswith(f"{files['good']}: ") and f"\n{files['good.jpg']}: " in out


def test_a_folder_is_read_as_its_images(files, tiny_checkpoint_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("b.png", "a.jpg"):
        shutil.copy(files["good"], folder / name)
    shutil.copy(files["text"], folder / "c.png")
    (folder / "notes.txt").write_text("not an image, not read")
    (folder / ".hidden.png").write_text("hidden, not read")
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["ground", str(folder), str(empty), "--model", str(tiny_checkpoint_dir), "--max-new-tokens", "2"]
    code, out, err = run([*argv, "--json"], capsys)
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    assert [r["image"] for r in records] == [str(folder / n) for n in ("a.jpg", "b.png", "c.png")] + [
        str(empty)
    ]
    assert "caption" in records[0] and "caption" in records[1] and "error" in records[2]
    assert records[3]["error"] == f"{str(empty)!r}: a folder with no image files (.png, .jpg, ...) in it"


def test_draw_checks_its_target_before_any_work(files, tiny_checkpoint_dir, tmp_path, capsys):
    argv = [
        "ground",
        files["good"],
        files["good.jpg"],
        "--model",
        str(tiny_checkpoint_dir),
        "--max-new-tokens",
        "2",
    ]
    code, out, err = run([*argv, "--draw", str(tmp_path / "missing" / "drawn")], capsys)
    assert code == 2 and out == "" and "does not exist; create it first" in one_line(err)
    code, out, err = run([*argv, "--draw", str(tmp_path / "one.png")], capsys)
    assert code == 2 and out == "" and "2 images need a folder, not one file" in one_line(err)
    code, out, err = run(
        [*argv, "--draw", str(tmp_path / "drawn")], capsys
    )  # a new folder in an existing one
    # two images named "good": numbered so neither overwrites the other
    assert code == 0 and sorted(p.name for p in (tmp_path / "drawn").iterdir()) == [
        "00000-good.png",
        "00001-good.png",
    ]
    code, out, err = run([*argv[:2], *argv[3:], "--draw", str(tmp_path / "one.jpg")], capsys)
    assert code == 0 and Image.open(tmp_path / "one.jpg").format == "JPEG"


# -- 3. prompts (see also the argument table above) ----------------------------------------------------------


def test_an_empty_or_markup_prompt_is_refused_and_the_default_is_used_only_when_none_is_given(
    files, tiny_checkpoint_dir, capsys
):
    base = ["ground", files["good"], "--model", str(tiny_checkpoint_dir), "--max-new-tokens", "2", "--json"]
    code, out, _ = run(base, capsys)
    assert code == 0 and json.loads(out)["prompt"] == "<grounding>An image of"
    code, out, err = run([*base, "--prompt", "   "], capsys)
    assert code == 2 and out == "" and "is empty" in one_line(err)
    # a vocabulary token the grid does not have
    code, _, err = run([*base, "--prompt", "<grounding>a<object><patch_index_0001></object>"], capsys)
    assert code == 2 and "an object's box is 2 location tokens, found 1" in one_line(err)


# -- 5. kosmos2 draw ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("garbage", r"has no valid box to draw \(it has no <phrase>"),
        # cell 811 (row 25, col 11) is below-right of cell 517 (row 16, col 5): reversed corners
        ("<phrase>a</phrase><object><patch_index_0811><patch_index_0517></object>", r"above or left"),
        (
            "<phrase>a</phrase><object><patch_index_9999><patch_index_0001></object>",
            r"outside the 32×32 grid",
        ),
    ],
)
def test_draw_without_a_valid_box_fails_and_writes_nothing(files, tmp_path, capsys, text, message):
    out = tmp_path / "drawn.png"
    code, stdout, err = run(["draw", files["good"], text, "-o", str(out)], capsys)
    assert code == 1 and stdout == "" and not out.exists()
    assert re.search(message, one_line(err, "kosmos2 draw")), err


def test_draw_writes_any_pillow_format_and_warns_about_skipped_markup(files, tmp_path, capsys):
    # cells 0 and 1023 share no row or column: the box runs between cell centres, (1, 1) to (59, 39) on 60x40
    good = "<phrase>a</phrase><object><patch_index_0000><patch_index_1023></object>"
    for name, fmt in [("x.jpg", "JPEG"), ("x.webp", "WEBP"), ("x.png", "PNG")]:
        code, out, err = run(["draw", files["good"], good, "-o", str(tmp_path / name)], capsys)
        assert code == 0 and err == "" and "'a' [0:1] -> (1, 1, 59, 39)" in out
        assert Image.open(tmp_path / name).format == fmt
    code, out, err = run(
        [
            "draw",
            files["good"],
            good + " <object><patch_index_9999><patch_index_0001></object>",
            "-o",
            str(tmp_path / "y.png"),
        ],
        capsys,
    )
    assert code == 0 and (tmp_path / "y.png").exists()
    assert one_line(err, "kosmos2 draw").startswith("kosmos2 draw: warning: skipped at character ")
    code, _, err = run(["draw", files["good"], good, "-o", str(tmp_path / "y.xyz")], capsys)
    assert code == 2 and "not an image format Pillow writes" in one_line(err, "kosmos2 draw")


# -- 6. tasks a model was not trained for -----------------------------------------------------------------


def test_an_unsupported_task_is_an_error(files, tiny_checkpoint_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KOSMOS2_MODEL", raising=False)
    code, out, err = run(["ground", files["good"], "--task", "detailed"], capsys)  # the built-in model
    assert code == 1 and out == ""
    line = one_line(err)
    assert line.startswith("kosmos2 ground: --task detailed: ") and "not trained for detailed_caption" in line
    copy = tmp_path / "model"
    shutil.copytree(tiny_checkpoint_dir, copy)
    (copy / "generation_config.json").write_text('{"kosmos2_tasks": ["grounded_caption"]}')
    base = ["ground", files["good"], "--model", str(copy), "--max-new-tokens", "2"]
    code, _, err = run([*base, "--locate", "a ball"], capsys)
    assert code == 1 and "--locate: " in one_line(err) and "not trained for rec" in err
    assert run([*base, "--task", "brief"], capsys)[0] == 0
    # a model that does not state its tasks runs them all
    code, out, _ = run(
        [*base[:3], str(tiny_checkpoint_dir), *base[4:], "--task", "detailed", "--json"], capsys
    )
    assert code == 0 and json.loads(out)["prompt"] == "<grounding>Describe this image in detail:"


# -- 7. arguments ------------------------------------------------------------------------------------------


def test_every_option_of_ground_has_help():
    from kosmos2.cli import build_parser

    parser = build_parser()
    ground = next(a for a in parser._actions if hasattr(a, "choices") and a.choices and "ground" in a.choices)
    sub = ground.choices["ground"]
    missing = [a.option_strings or a.dest for a in sub._actions if not a.help]
    assert missing == []
    options = {s for a in sub._actions for s in a.option_strings}
    assert {"--device", "--max-pixels", "--debug"} <= options


def test_device_and_max_pixels_options(files, tiny_checkpoint_dir, capsys):
    base = ["ground", files["big"], "--model", str(tiny_checkpoint_dir), "--max-new-tokens", "2"]
    assert run([*base, "--device", "cpu"], capsys)[0] == 0
    if not torch.cuda.is_available():
        code, _, err = run([*base, "--device", "cuda"], capsys)
        assert code == 1 and "CUDA is not available" in one_line(err)
    code, _, err = run([*base, "--max-pixels", "1000"], capsys)  # 50 x 50 = 2,500 pixels
    assert code == 1 and "exceeds the limit of 1,000" in one_line(err) and "--max-pixels N" in err
    assert run([*base, "--max-pixels", "2500"], capsys)[0] == 0


def test_convert_explains_what_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    torch.save({"model": {"encoder.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases = [
        (
            tmp_path / "notes.txt",
            r"not a PyTorch checkpoint \(starts b'hello'; 5 bytes, not the zip archive torch.save writes\)",
        ),
        (tmp_path / "missing.pt", r"no such file"),
        (tmp_path, r"is a directory; pass the kosmos-2\.pt file"),
        (tmp_path / "other.pt", r"not a Kosmos-2 release checkpoint: none of its 1 entries has a Kosmos-2"),
        (tmp_path / "list.pt", r"expected a state dict"),
    ]
    for source, message in cases:
        code, out, err = run(["convert", str(source), str(tmp_path / "out"), "--preset", "tiny"], capsys)
        assert code == 1 and out == "", err
        assert re.search(message, one_line(err, "kosmos2 convert")), err
    assert not (tmp_path / "out").exists()


def test_info_checks_the_weights_against_the_config(tiny_checkpoint_dir, tmp_path, capsys):
    code, out, _ = run(["info", str(tiny_checkpoint_dir)], capsys)
    assert code == 0 and "shapes match config.json" in json.loads(out)["weights"]
    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_checkpoint_dir, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["text_config"]["ffn_dim"] *= 2  # the weights were saved with the other width
    (wrong / "config.json").write_text(json.dumps(config))
    code, out, err = run(["info", str(wrong)], capsys)
    line = one_line(err, "kosmos2 info")
    assert code == 1 and out == "" and "does not match the model its config describes" in line
    assert "tensors with the wrong shape" in line and "fc1.weight" in line
    (wrong / "config.json").write_text("{")
    code, _, err = run(["info", str(wrong)], capsys)
    assert code == 1 and "config.json" in one_line(err, "kosmos2 info")
    code, _, err = run(["info", str(tmp_path / "nope")], capsys)
    assert code == 1 and "does not exist" in one_line(err, "kosmos2 info")


# -- the property: no input makes a traceback ---------------------------------------------------------------

# Pieces of prompts, well- and ill-formed; values and options listed valid first (hypothesis starts there)
PROMPT_PIECES = [
    "a red",
    "<grounding>",
    "<phrase>",
    "</phrase>",
    "<object>",
    "</object>",
    "<patch_index_0001>",
]
PROMPT_PIECES += [
    "<patch_index_0500>",
    "<patch_index_9999>",
    "<patch_index_7>",
    "</delimiter_of_multi_objects/>",
]
PROMPT_PIECES += ["<image>", "</s>", "<Phrase>", " ball", "<3", "", " "]
NUMBERS = ["1", "2", "0.5", "3", "0", "-1", "2.5", "nan", "inf", "-inf", "1e309", "x", ""]
FLAGS = {"--sample", "--json"}
OPTIONS = [
    "--json",
    "--sample",
    "--num-beams",
    "--temperature",
    "--top-p",
    "--batch-size",
    "--seed",
    "--task",
]
OPTIONS += ["--dtype", "--device", "--max-pixels", "--draw"]
VALUES = {
    "--task": ["brief", "caption", "detailed", "poem"],
    "--dtype": ["float32", "bfloat16", "float8"],
    "--device": ["cpu", "bogus", "cuda:7"],
    "--draw": ["drawn", "one.png", "missing/drawn", "one.xyz"],
    "--max-pixels": ["100000000", "100", "1", "0", "-5"],
    "--seed": ["0", "1", "-1", "x"],
}


@st.composite
def cli_runs(draw, folder: Path, model: str) -> list[str]:
    """A random `kosmos2` command line over random files (random bytes, cut PNGs, folders, missing paths)."""
    names = []
    for i in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["good", "good", "bytes", "cut", "missing", "folder"]))
        path = folder / "inputs" / f"in{i}.png"
        if kind == "bytes":
            path.write_bytes(draw(st.binary(max_size=64)))
        elif kind in ("good", "cut"):
            data = (folder / "good.png").read_bytes()
            path.write_bytes(data if kind == "good" else data[: draw(st.integers(0, len(data) - 1))])
        elif kind == "folder":
            path = folder / "inputs"
        else:
            path = folder / "missing.png"
        names.append(str(path))
    verb = draw(st.sampled_from(["ground"] * 5 + ["draw", "info", "convert"]))  # ground: 5 in 8
    text = "".join(draw(st.lists(st.sampled_from(PROMPT_PIECES), max_size=6)))
    if verb == "draw":
        return [
            "draw",
            names[0],
            text,
            "-o",
            str(folder / draw(st.sampled_from(["o.png", "o.jpg", "o.xyz"]))),
        ]
    if verb == "info":
        return ["info", draw(st.sampled_from([model, str(folder), names[0], str(folder / "nope")]))]
    if verb == "convert":
        return ["convert", names[0], str(folder / "converted"), "--preset", "tiny"]
    argv = ["ground", *names, "--model", draw(st.sampled_from([model] * 4 + [str(folder), names[0]]))]
    argv += ["--max-new-tokens", draw(st.sampled_from(["1", "2", "1", "2", "3", "0", "-3", "two"]))]
    for option in draw(st.lists(st.sampled_from(OPTIONS), max_size=4, unique=True)):
        argv += [option] if option in FLAGS else [option, draw(st.sampled_from(VALUES.get(option, NUMBERS)))]
    if draw(st.booleans()):
        argv += [draw(st.sampled_from(["--prompt", "--locate"])), text]
    return argv


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory, files) -> Path:
    folder = tmp_path_factory.mktemp("fuzz")
    shutil.copy(files["good"], folder / "good.png")
    (folder / "inputs").mkdir()
    return folder


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_property_no_command_line_and_no_bytes_give_a_traceback(
    data, fuzz_folder, tiny_checkpoint_dir, capsys
):
    """Random argument combinations over random bytes given as images: every run ends with exit 0, 1 or 2, no
    traceback and no 'internal error', every stderr line of the form `kosmos2 <verb>: ...`, and a failing
    run says why."""
    argv = data.draw(cli_runs(fuzz_folder, str(tiny_checkpoint_dir)))
    cwd = os.getcwd()
    os.chdir(fuzz_folder)  # relative --draw targets land in the scratch folder
    try:
        code, _, err = run(argv, capsys)
    finally:
        os.chdir(cwd)
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    lines = err.splitlines()
    assert all(line.startswith(f"kosmos2 {argv[0]}: ") for line in lines), (argv, err)
    if code:
        assert lines, argv
    if os.environ.get("KOSMOS2_FUZZ_LOG"):
        with open(os.environ["KOSMOS2_FUZZ_LOG"], "a") as log:
            log.write(json.dumps([code, argv, lines[-1] if lines else ""]) + "\n")


@st.composite
def valid_ground_runs(draw, folder: Path, model: str) -> list[str]:
    """`kosmos2 ground` with well-formed options over random bytes and damaged images: the runs that reach the
    model, where one bad image must not lose the others."""
    names = []
    for i in range(draw(st.integers(1, 4))):
        path = folder / "inputs" / f"v{i}.png"
        data = (folder / "good.png").read_bytes()
        kind = draw(st.sampled_from(["good", "bytes", "cut"]))
        if kind == "bytes":
            data = draw(st.binary(max_size=64))
        elif kind == "cut":
            data = data[: draw(st.integers(0, len(data) - 1))]
        path.write_bytes(data)
        names.append(str(path))
    argv = ["ground", *names, "--model", model, "--max-new-tokens", draw(st.sampled_from(["1", "3"]))]
    argv += draw(st.sampled_from([[], ["--json"]]))
    argv += draw(
        st.sampled_from([[], ["--sample", "--seed", "3"], ["--num-beams", "2"], ["--batch-size", "1"]])
    )
    argv += draw(
        st.sampled_from([[], ["--task", "caption"], ["--locate", "a red ball"], ["--draw", "drawn"]])
    )
    return argv


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_property_bad_bytes_among_images_lose_nothing(data, fuzz_folder, tiny_checkpoint_dir, capsys):
    argv = data.draw(valid_ground_runs(fuzz_folder, str(tiny_checkpoint_dir)))
    cwd = os.getcwd()
    os.chdir(fuzz_folder)
    try:
        code, out, err = run(argv, capsys)
    finally:
        os.chdir(cwd)
    images = [a for a in argv[1 : argv.index("--model")]]
    readable = []
    for name in images:
        try:
            with Image.open(name) as im:
                im.load()
            readable.append(name)
        except Exception:  # noqa: BLE001 - Pillow's own verdict, the reference for "a good image"
            pass
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    assert all(line.startswith("kosmos2 ground: ") for line in err.splitlines()), (argv, err)
    assert code == (0 if len(readable) == len(images) else 1), (argv, err)
    if "--json" in argv:  # one record per image, in order: a result for each readable one, else an error
        records = [json.loads(line) for line in out.splitlines()]
        assert [r["image"] for r in records] == images
        assert [("caption" in r) for r in records] == [name in readable for name in images], (records, err)
    else:
        for name in readable:
            assert f"{name}: " in out
