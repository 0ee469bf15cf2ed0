"""Training steps with and without transparent huge pages for torch's big CPU tensors.

    python benchmarks/huge_pages.py                  # the default recipe, 60 steps each, 2 threads
    python benchmarks/huge_pages.py --steps 300      # long enough to see the slowing of a long run

`kosmos2 train` sets torch's `THP_MEM_ALLOC_ENABLE=1` (Linux: tensors of 2 MB and more are allocated on
2 MB boundaries and advised to use huge pages) unless the environment already sets it. This runs the same
`kosmos2 train --recipe default` twice in fresh processes, first with `THP_MEM_ALLOC_ENABLE=0` (the
reference: torch's default allocation), then with 1, and reads the seconds of steps 10..N from each run's
log (the first 10 steps warm up). The two runs compute the same floats (their logged losses are compared
and must be equal); only the time differs. Prints seconds a step for each and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from train_runs import WARMUP, losses, seconds_per_step, train_log  # benchmarks/train_runs.py


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    if args.steps < 20 or args.steps % 10:
        parser.error("--steps must be a multiple of 10, at least 20")
    if sys.platform != "linux":
        print("transparent huge pages are a Linux feature; nothing to measure here")
        return 0
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    print(f"system setting: {mode.read_text().strip() if mode.exists() else 'unknown'}")
    seconds, logs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for thp in ("0", "1"):
            log = train_log(
                Path(tmp) / f"thp{thp}", args.steps, args.threads, env={"THP_MEM_ALLOC_ENABLE": thp}
            )
            seconds[thp] = seconds_per_step(log, args.steps)
            logs[thp] = losses(log)
    if logs["0"] != logs["1"]:
        print("the two runs logged different losses: huge pages changed the arithmetic", file=sys.stderr)
        return 1
    print(f"{args.steps} steps of the default recipe, {args.threads} threads, steps {WARMUP}..{args.steps}:")
    print(f"  torch default (reference)  {seconds['0']:.3f} s/step")
    print(f"  THP_MEM_ALLOC_ENABLE=1     {seconds['1']:.3f} s/step")
    print(f"  ratio                      {seconds['0'] / seconds['1']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
