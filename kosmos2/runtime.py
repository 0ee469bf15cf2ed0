"""How a command runs the model: its dtype and its thread count, with one argparse helper for every command.

    from kosmos2 import runtime
    runtime.add_runtime_arguments(parser)          # --dtype float32|bfloat16|int8|int8-dynamic, --threads N
    threads = runtime.set_threads(args.threads)    # before the model runs; None picks `default_threads()`
    Predictor.from_pretrained(..., dtype=args.dtype)

Threads. Every product of a decoding step is split across torch's threads and each waits for all of them;
when another process keeps a core busy, the scheduler parks one of our threads and every product waits for
it. On the 2-core development machine, one `kosmos2 ground` on the default model took 1.8-5.3 s with
torch's default of 2 threads next to a busy process, and 0.16-0.28 s with 1 thread (issue 32;
benchmarks/threads.py measures it). So the default is the number of cores this process may use that
nobody else is using right now:

    threads = clamp(usable cores - round(other load), 1, usable cores)

usable cores = `os.sched_getaffinity(0)` (what taskset or a container's cpuset allows); other load = the
larger of the 1-minute load average and the number of other runnable threads at this moment
(/proc/loadavg's running count, minus this process). `OMP_NUM_THREADS` set in the environment wins: the
user has chosen. `--threads N` wins over both.
"""

from __future__ import annotations

import argparse
import os

DTYPE_CHOICES = ("float32", "bfloat16", "int8", "int8-dynamic")
THREADS_ENV = "OMP_NUM_THREADS"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; os.cpu_count() where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def other_load() -> float:
    """How many cores other processes keep busy: max(1-minute load average, runnable threads now - 1).

    Both come from /proc/loadavg ("0.52 0.58 0.59 3/512 ..."); where it is missing, os.getloadavg(); 0.0
    where neither exists. A load average lags by up to a minute; the running count sees a process that just
    started. Our own thread is the 1 subtracted (this is called before the model's threads start).
    """
    try:
        with open("/proc/loadavg") as f:
            fields = f.read().split()
        average, running = float(fields[0]), int(fields[3].split("/")[0])
        return max(average, running - 1.0, 0.0)
    except (OSError, IndexError, ValueError):
        try:
            return max(os.getloadavg()[0], 0.0)
        except (AttributeError, OSError):
            return 0.0


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """The thread count to use: `OMP_NUM_THREADS` if set, else the usable cores minus the rounded load of
    other processes, at least 1 (module docstring). `cores` / `load` override the measurements (tests)."""
    env = os.environ.get(THREADS_ENV, "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = usable_cores() if cores is None else cores
    load = other_load() if load is None else load
    return max(1, min(cores, cores - int(load + 0.5)))


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count to `threads` (None: `default_threads()`); returns it."""
    import torch

    n = default_threads() if threads is None else threads
    if n < 1:
        raise ValueError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    return n


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of threads") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} threads: give at least 1")
    return value


def add_runtime_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, dtype_default: str | None = None
) -> None:
    """Add `--dtype` and `--threads` to a command's parser (ground, eval, serve, ...), the same everywhere.

    --dtype float32|bfloat16|int8|int8-dynamic, default `dtype_default` (None: float32, or int8 for a
    checkpoint saved in int8); --threads N, default None (`default_threads()`, chosen when the command
    starts).
    """
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=dtype_default,
        help="weights and compute: float32, bfloat16, int8 weight-only, or int8-dynamic (the same int8 "
        "weights, activations quantised per row: faster on x86) (default: float32, or int8 for an int8 "
        "checkpoint)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="torch threads (default: the free cores: the usable cores minus the other processes' load, "
        "at least 1; $OMP_NUM_THREADS if set)",
    )
