"""Training steps with the batches made between steps (reference) against made ahead in a worker process.

    python benchmarks/batch_worker.py                  # the default recipe, 60 steps each, 2 threads
    python benchmarks/batch_worker.py --steps 100 --repeats 2

`kosmos2 train --prefetch on` makes each step's batch (render 32 scenes, resize, tokenise 128 samples:
~0.2 s of Python and PIL on one core) in a worker process while the model trains on the step before
(`BatchWorker`); `--prefetch off` (the CPU's default) makes it in the training process between steps. This
runs `kosmos2 train --recipe default` in fresh processes with `--prefetch off` (the reference) and `on`,
alternating `--repeats` times, and reads the seconds of steps 10..N from each run's log (the first 10 steps
warm up, and the worker's start falls in them). The runs compute the same floats (their logged losses are
compared and must be equal); only the time differs. Prints seconds a step for each and the ratio.
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
    seconds: dict[bool, list[float]] = {False: [], True: []}
    logs = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for prefetch in (False, True):
                option = ("--prefetch", "on" if prefetch else "off")
                log = train_log(Path(tmp) / f"{prefetch}-{repeat}", args.steps, args.threads, *option)
                seconds[prefetch].append(seconds_per_step(log, args.steps))
                logs.append(losses(log))
    if any(log != logs[0] for log in logs):
        print("the runs logged different losses: the worker changed the batches", file=sys.stderr)
        return 1
    reference, worker = (statistics.median(seconds[p]) for p in (False, True))
    print(f"default recipe, {args.threads} threads, steps {WARMUP}..{args.steps}, median of {args.repeats}:")
    print(f"  batches between steps (reference)  {reference:.3f} s/step  {seconds[False]}")
    print(f"  batches in a worker process        {worker:.3f} s/step  {seconds[True]}")
    print(f"  ratio                              {reference / worker:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
