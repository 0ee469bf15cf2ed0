"""Shared by the benchmarks that time whole `kosmos2 train` runs (huge_pages.py, batch_worker.py): run the
default recipe in a fresh process and read its log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 10  # steps left out of the timing: the first steps allocate, and a batch worker starts in them


def train_log(
    out: Path, steps: int, threads: int, *options: str, env: Mapping[str, str] | None = None
) -> list[dict]:
    """`kosmos2 train --recipe default` for `steps` steps into `out` (plus `options`); its log records."""
    command = [sys.executable, "-m", "kosmos2.cli", "train", "--recipe", "default", "--out", str(out)]
    command += ["--steps", str(steps), "--threads", str(threads), "--no-progress", "--eval-per-task", "0"]
    run_env = {**os.environ, **(env or {})}
    subprocess.run([*command, *options], env=run_env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def seconds_per_step(log: list[dict], steps: int) -> float:
    """Mean seconds a step over steps WARMUP..steps of a run's log."""
    by_step = {r["step"]: r for r in log}
    return (by_step[steps]["elapsed_s"] - by_step[WARMUP]["elapsed_s"]) / (steps - WARMUP)


def losses(log: list[dict]) -> list[tuple[int, float]]:
    """(step, loss) of each logged step: equal for two runs that computed the same floats."""
    return [(r["step"], r["loss"]) for r in log]
