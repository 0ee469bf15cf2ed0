"""One `kosmos2 ground` on the default model next to a CPU-bound process, with the default thread count, 1 and
2 threads (issue 32: on a busy 2-core machine torch's default of 2 threads made one call 10-20x slower).

    python benchmarks/threads.py                  # 5 rounds, busy (one spinning process) and quiet
    python benchmarks/threads.py --rounds 3 --no-quiet

Each measurement is a fresh process, as a user's command is: `kosmos2 ground examples/shapes.png
[--threads N]`, timed from start to exit (imports and model load included), with `OMP_NUM_THREADS` removed
from its environment so the default is the one `kosmos2.runtime.default_threads()` picks. The process also
reports, on stderr, the thread count it used and the seconds of its ground call alone. The arms run in
rotating order within each round. "Busy": another process spins on one core (a Python busy loop) for the
whole round; "quiet": nothing of ours runs beside it (other users of a shared machine may).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "examples" / "shapes.png"
ARMS = {"default": [], "1": ["--threads", "1"], "2": ["--threads", "2"]}
# the child: the CLI's own code path, plus a line on stderr with what it did
CHILD = """
import json, sys, time
import torch
from kosmos2 import commands, runtime
from kosmos2.cli import main
real = commands.ground_images
def timed(*a, **k):
    start = time.perf_counter()
    out = real(*a, **k)
    used = {"threads": torch.get_num_threads(), "ground_s": time.perf_counter() - start}
    print(json.dumps(used), file=sys.stderr)
    return out
commands.ground_images = timed
sys.exit(main(sys.argv[1:]))
"""


def spin() -> subprocess.Popen:
    """A CPU-bound process on one core (until killed)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def one_call(extra: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "ground", str(IMAGE), *extra],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    wall = time.perf_counter() - start
    info = json.loads(done.stderr.strip().splitlines()[-1])
    return {"wall_s": wall, **info}


def run(rounds: int, conditions: list[str]) -> dict:
    results: dict = {c: {arm: [] for arm in ARMS} for c in conditions}
    for condition in conditions:
        for r in range(rounds):
            spinner = spin() if condition == "busy" else None
            try:
                if spinner:
                    time.sleep(1.0)  # let the load average and the run queue see it
                order = list(ARMS)
                order = order[r % len(order) :] + order[: r % len(order)]
                for arm in order:
                    m = one_call(ARMS[arm])
                    m["loadavg"] = os.getloadavg()[0]
                    results[condition][arm].append(m)
                    print(
                        f"{condition} round {r + 1} {arm}: {m['threads']} threads, "
                        f"ground {m['ground_s']:.2f} s, "
                        f"command {m['wall_s']:.2f} s (load {m['loadavg']:.1f})",
                        file=sys.stderr,
                        flush=True,
                    )
            finally:
                if spinner:
                    spinner.kill()
                    spinner.wait()
    return results


def report(results: dict) -> str:
    lines = [
        "| condition | threads | threads used | one ground call (s): median, range | whole command (s) |",
        "|---|---|---|---|---|",
    ]
    for condition, arms in results.items():
        for arm, ms in arms.items():
            g = [m["ground_s"] for m in ms]
            w = [m["wall_s"] for m in ms]
            used = sorted({m["threads"] for m in ms})
            lines.append(
                f"| {condition} | {arm} | {', '.join(map(str, used))} | {statistics.median(g):.2f}, "
                f"{min(g):.2f}-{max(g):.2f} | {statistics.median(w):.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-quiet", action="store_true", help="only the busy condition")
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args(argv)
    start_load = os.getloadavg()
    results = run(args.rounds, ["busy"] if args.no_quiet else ["busy", "quiet"])
    print(report(results))
    print(
        f"\nload average at start {start_load[0]:.1f}, at end {os.getloadavg()[0]:.1f}; "
        f"{os.cpu_count()} cores"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
