"""`kosmos2 ground | info | convert` on a tiny random checkpoint, through `kosmos2.cli.main` and as a real
console-script process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from _model_fixtures import random_model, tiny_config
from PIL import Image

from kosmos2.cli import main
from kosmos2.predictor import Predictor
from kosmos2.tokenizer import Kosmos2Tokenizer


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    paths = []
    for i, (w, h) in enumerate([(60, 40), (33, 50), (40, 40)]):
        p = d / f"im{i}.png"
        Image.new("RGB", (w, h), (40 * i, 100, 200)).save(p)
        paths.append(str(p))
    return paths


def test_ground_json_equals_predictor(tiny_checkpoint_dir, image_files, capsys):
    assert (
        main(["ground", *image_files, "--model", str(tiny_checkpoint_dir), "--json", "--max-new-tokens", "8"])
        == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["image"] for x in lines] == image_files
    expected = Predictor.from_pretrained(tiny_checkpoint_dir).ground(image_files, max_new_tokens=8)
    for got, want in zip(lines, expected, strict=True):
        assert got["text"] == want.text and got["caption"] == want.caption
        assert got["image_size"] == list(want.image_size)


def test_ground_text_output_and_draw(tiny_checkpoint_dir, image_files, tmp_path, capsys):
    out = tmp_path / "one.png"
    prompt = "<grounding><phrase>a thing</phrase><object><patch_index_0000><patch_index_1023></object>"
    args = [
        "ground",
        image_files[0],
        "--model",
        str(tiny_checkpoint_dir),
        "--prompt",
        prompt,
        "--draw",
        str(out),
    ]
    assert main([*args, "--max-new-tokens", "4"]) == 0
    text = capsys.readouterr().out
    # the prompt's own box covers the whole 60x40 image: cells 0 and 1023 share no row or column -> centres
    assert "'a thing' [0:7] -> (1, 1, 59, 39)" in text
    drawn = Image.open(out)
    assert drawn.size == (60, 40)
    assert drawn.getpixel((1, 20)) != (0, 100, 200)  # the box outline was drawn over the plain background
    folder = tmp_path / "drawn"
    assert main(["ground", *image_files, "--model", str(tiny_checkpoint_dir), "--draw", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["im0.png", "im1.png", "im2.png"]


def test_ground_tasks_and_errors(tiny_checkpoint_dir, image_files, capsys):
    base = ["ground", image_files[0], "--model", str(tiny_checkpoint_dir), "--max-new-tokens", "3", "--json"]
    main([*base, "--task", "detailed"])
    assert json.loads(capsys.readouterr().out)["prompt"] == "<grounding>Describe this image in detail:"
    main([*base, "--locate", "the ball"])
    assert json.loads(capsys.readouterr().out)["prompt"] == "<grounding><phrase>the ball</phrase>"
    main([*base, "--sample", "--seed", "1"])
    capsys.readouterr()
    assert main(["ground", "missing.png", "--model", str(tiny_checkpoint_dir)]) == 1
    assert capsys.readouterr().err == "kosmos2 ground: 'missing.png': no such file; check the path\n"
    with pytest.raises(SystemExit) as usage:  # --prompt and --task together
        main([*base, "--prompt", "x", "--task", "brief"])
    assert usage.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_info(tiny_checkpoint_dir, capsys):
    assert main(["info", str(tiny_checkpoint_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    n = sum(p.numel() for p in random_model(tiny_config(info["tokenizer"]["vocab_size"])).parameters())
    assert info["parameters"] == n
    assert (
        info["tokenizer"]["image_start_id"]
        == Kosmos2Tokenizer.from_pretrained(tiny_checkpoint_dir).image_start_id
    )


def test_convert_original_release(tmp_path, kosmos2_tokenizer_dir):
    from test_checkpoint import _original_state  # original names written per prefix, not from our table

    model = random_model(tiny_config(), seed=9)
    torch.save(_original_state(model), tmp_path / "kosmos-2.pt")
    out = tmp_path / "converted"
    args = ["convert", str(tmp_path / "kosmos-2.pt"), str(out), "--preset", "tiny"]
    assert main([*args, "--sentencepiece", str(kosmos2_tokenizer_dir / "sentencepiece.bpe.model")]) == 0
    from kosmos2.checkpoint import load_pretrained

    loaded = load_pretrained(out)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    assert (out / "tokenizer.json").is_file()
    assert Kosmos2Tokenizer.from_pretrained(out).encode("a red ball") == Kosmos2Tokenizer.from_pretrained(
        kosmos2_tokenizer_dir
    ).encode("a red ball")


def test_console_script_process(tiny_checkpoint_dir, image_files):
    exe = shutil.which("kosmos2") or None
    cmd = [exe] if exe else [sys.executable, "-m", "kosmos2.cli"]
    proc = subprocess.run(
        [*cmd, "ground", image_files[1], "--model", str(tiny_checkpoint_dir), "--max-new-tokens", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{image_files[1]}: ")
    proc = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert "ground" in proc.stdout and "convert" in proc.stdout


def test_a_reader_that_goes_away_ends_the_command_quietly(tiny_checkpoint_dir, image_files):
    """`kosmos2 ground IMAGE | head -0`: the pipe's reader is gone before anything is written; the command
    stops with a shell's SIGPIPE status and no traceback."""
    exe = shutil.which("kosmos2") or None
    cmd = [exe] if exe else [sys.executable, "-m", "kosmos2.cli"]
    proc = subprocess.Popen(
        [*cmd, "ground", image_files[1], "--model", str(tiny_checkpoint_dir), "--max-new-tokens", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_draw_markup(tmp_path, capsys):
    Image.new("RGB", (320, 160), (255, 255, 255)).save(tmp_path / "white.png")
    # cell 517 = row 16, col 5; cell 811 = row 25, col 11: different row and column -> cell centres
    text = "An image of <phrase>a red ball</phrase><object><patch_index_0517><patch_index_0811></object>"
    assert main(["draw", str(tmp_path / "white.png"), text, "--out", str(tmp_path / "drawn.png")]) == 0
    printed = capsys.readouterr().out
    x1, y1, x2, y2 = 5.5 / 32 * 320, 16.5 / 32 * 160, 11.5 / 32 * 320, 25.5 / 32 * 160  # 55, 82.5, 115, 127.5
    assert printed.startswith(f"{tmp_path / 'white.png'}: An image of a red ball")
    assert f"'a red ball' [12:22] -> ({x1:.0f}, {y1:.0f}, {x2:.0f}, {y2:.0f})" in printed
    drawn = Image.open(tmp_path / "drawn.png").convert("RGB")
    assert drawn.getpixel((round(x1), 105)) != (255, 255, 255)  # left edge of the box
    assert drawn.getpixel((200, 40)) == (255, 255, 255)  # far from it
