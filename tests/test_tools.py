"""Tests for the developer tools under tools/: a real sweep of two variants (the tiny "test" recipe on the
CPU, each in its own process, then `kosmos2 eval synthetic`) and its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SWEEP = [sys.executable, str(ROOT / "tools" / "sweep.py")]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*SWEEP, *args], capture_output=True, text=True, timeout=300, env=env)


def test_sweep_trains_evaluates_and_tabulates_each_variant(tmp_path):
    done = run("--out", str(tmp_path), "--recipe", "test", "--device", "cpu", "--n-per-task", "2",
               "base={}", 'seed1={"seed": 1}')  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {line.split(" | ")[0].strip("| "): line for line in done.stdout.splitlines()[2:]}
    assert sorted(rows) == ["base", "seed1"]
    for name, seed in (("base", 0), ("seed1", 1)):
        assert json.loads((tmp_path / name / "recipe.json").read_text())["seed"] == seed
        metrics = json.loads((tmp_path / name / "eval" / "metrics.json").read_text())["results"]
        assert metrics["test"]["rec"]["n"] == 2 and metrics["compositional"]["rec"]["n"] == 2
        log = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        last = [r["loss_location"] for r in log if r["step"] > log[-1]["step"] - 50]  # the test recipe: all 8
        assert len(last) == 8 and rows[name].endswith(f"| {sum(last) / 8:.2f} |")
        assert f"| {metrics['test']['rec']['accuracy']:.3f} / " in rows[name]
    again = run("--out", str(tmp_path), "--table")
    assert again.returncode == 0 and again.stdout == done.stdout


def test_sweep_refuses_a_bad_variant_before_starting_any(tmp_path):
    for variant, message in (
        ("base", "write NAME=JSON object"),
        ('x={"nope": 1}', "recipe unknown fields ['nope']"),
        ('x={"lr": -1}', "recipe lr must be > 0"),
    ):
        done = run("--out", str(tmp_path), "--recipe", "test", "ok={}", variant)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "ok").exists()
