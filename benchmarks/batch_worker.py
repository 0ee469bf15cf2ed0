"""Training steps with the batches made between steps (reference) against made ahead: in a worker process,
and in a background thread of the trainer.

    python benchmarks/batch_worker.py                  # the default recipe, 60 steps each, 2 threads
    python benchmarks/batch_worker.py --steps 100 --repeats 2

A step's batch (render 32 scenes, resize, tokenise 128 samples: ~0.1 s of Python and Pillow on one core)
is made by `kosmos2 train --prefetch off` in the training process between steps; by `--prefetch on` in a
worker process while the model trains on the step before (`BatchWorker`); by `--prefetch thread` (the CPU's
default) in a thread of the trainer while it trains on the step before (`BatchThread`). This runs
`kosmos2 train --recipe default` in fresh processes with each, in turn, `--repeats` times, and reads the
seconds of steps 10..N from each run's log (the first 10 steps warm up, and the worker's start falls in
them). The runs compute the same floats (their logged losses are compared and must be equal); only the time
differs. Prints seconds a step for each and the ratio to the reference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from train_runs import WARMUP, losses, seconds_per_step, train_log  # benchmarks/train_runs.py


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, alternating (default 1)")
    args = parser.parse_args(argv)
    if args.steps < 20 or args.steps % 10:
        parser.error("--steps must be a multiple of 10, at least 20")
    modes = {
        "off": "batches between steps (reference)",
        "on": "batches in a worker process",
        "thread": "batches in a thread",
    }
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    logs = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for mode in modes:
                log = train_log(Path(tmp) / f"{mode}-{repeat}", args.steps, args.threads, "--prefetch", mode)
                seconds[mode].append(seconds_per_step(log, args.steps))
                logs.append(losses(log))
    if any(log != logs[0] for log in logs):
        print("the runs logged different losses: prefetching changed the batches", file=sys.stderr)
        return 1
    reference = statistics.median(seconds["off"])
    print(f"default recipe, {args.threads} threads, steps {WARMUP}..{args.steps}, median of {args.repeats}:")
    for mode, label in modes.items():
        median = statistics.median(seconds[mode])
        runs = ", ".join(f"{s:.3f}" for s in seconds[mode])
        print(f"  {label:<36}{median:.3f} s/step  {reference / median:.2f}x  ({runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
