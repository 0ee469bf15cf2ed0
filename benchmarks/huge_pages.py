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
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(steps: int, threads: int, thp: str, out: Path) -> list[dict]:
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": thp}
    command = [sys.executable, "-m", "kosmos2.cli", "train", "--recipe", "default", "--out", str(out)]
    command += ["--steps", str(steps), "--threads", str(threads), "--no-progress", "--eval-per-task", "0"]
    subprocess.run(command, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


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
            log = run(args.steps, args.threads, thp, Path(tmp) / f"thp{thp}")
            by_step = {r["step"]: r for r in log}
            seconds[thp] = (by_step[args.steps]["elapsed_s"] - by_step[10]["elapsed_s"]) / (args.steps - 10)
            logs[thp] = [(r["step"], r["loss"]) for r in log]
    if logs["0"] != logs["1"]:
        print("the two runs logged different losses: huge pages changed the arithmetic", file=sys.stderr)
        return 1
    print(f"{args.steps} steps of the default recipe, {args.threads} threads, steps 10..{args.steps}:")
    print(f"  torch default (reference)  {seconds['0']:.3f} s/step")
    print(f"  THP_MEM_ALLOC_ENABLE=1     {seconds['1']:.3f} s/step")
    print(f"  ratio                      {seconds['0'] / seconds['1']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
