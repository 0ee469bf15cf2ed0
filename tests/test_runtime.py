"""kosmos2.runtime: the default thread count (free cores), its overrides, and `--dtype` / `--threads` on the
commands that run the model."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from kosmos2 import runtime
from kosmos2.cli import main


@pytest.fixture
def no_thread_env(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)


@pytest.fixture
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("cores", "load", "expected"),
    [
        (2, 0.1, 2),
        (2, 0.4, 2),
        (2, 0.6, 1),
        (2, 1.0, 1),
        (2, 5.0, 1),
        (16, 2.4, 14),
        (16, 0.0, 16),
        (1, 0, 1),
    ],
)
def test_default_threads_are_the_free_cores(no_thread_env, cores, load, expected):
    assert runtime.default_threads(cores=cores, load=load) == expected


def test_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv(runtime.THREADS_ENV, "3")
    assert runtime.default_threads(cores=2, load=0.0) == 3
    monkeypatch.setenv(runtime.THREADS_ENV, "not a number")
    assert runtime.default_threads(cores=2, load=0.0) == 2


def test_measurements_come_from_this_machine(no_thread_env):
    cores = runtime.usable_cores()
    assert 1 <= cores <= (os.cpu_count() or cores)
    assert runtime.other_load() >= 0.0
    assert 1 <= runtime.default_threads() <= cores


def test_set_threads(keep_torch_threads):
    assert runtime.set_threads(1) == 1 and torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        runtime.set_threads(0)


def test_arguments_helper():
    parser = argparse.ArgumentParser()
    runtime.add_runtime_arguments(parser)
    args = parser.parse_args(["--dtype", "int8", "--threads", "2"])
    assert (args.dtype, args.threads) == ("int8", 2)
    assert parser.parse_args([]).dtype is None and parser.parse_args([]).threads is None


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_bad_threads_is_one_line(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ground", "x.png", "--threads", bad])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--threads" in err and "Traceback" not in err


def test_ground_with_dtype_and_threads(tmp_path, capsys, keep_torch_threads):
    # the default model: int8 and bf16 give the same caption and boxes as float32 on its own scene (the
    # boxes' scores, probabilities, differ in their last digits)
    import json
    from pathlib import Path

    image = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
    outputs = {}
    for dtype in ("float32", "int8", "bfloat16"):
        torch.set_num_threads(2)
        assert main(["ground", str(image), "--json", "--dtype", dtype, "--threads", "1"]) == 0
        r = json.loads(capsys.readouterr().out)
        outputs[dtype] = (r["caption"], [(e["phrase"], e["boxes"]) for e in r["entities"]])
        assert torch.get_num_threads() == 1
    assert outputs["int8"] == outputs["float32"] == outputs["bfloat16"]
    assert len(outputs["float32"][1]) >= 2  # the scene's shapes were found


def test_eval_parser_takes_dtype_and_threads(tmp_path):
    from kosmos2.cli import build_parser

    args = build_parser().parse_args(
        ["eval", "synthetic", "--out", str(tmp_path), "--dtype", "bfloat16", "--threads", "1"]
    )
    assert (args.dtype, args.threads) == ("bfloat16", 1)


def test_eval_cache_key_names_the_dtype(tmp_path):
    from kosmos2.cli import build_parser
    from kosmos2.eval.cli import _run_options

    base = ["eval", "synthetic", "--out", str(tmp_path), "--model-id", "m"]
    keys = {
        d: _run_options(build_parser().parse_args([*base, "--dtype", d]))["model_id"]
        for d in ("float32", "int8")
    }
    assert keys == {"float32": "m", "int8": "m+int8"}  # float32 keeps the keys of caches made before dtypes
