"""Train several variants of a recipe side by side on one GPU, evaluate each, print one table.

Each variant is the default recipe (or `--recipe`) with some fields replaced. Every variant runs in its own
process (`kosmos2 train --device cuda` in code, one CPU thread each for its batches), then `kosmos2 eval
synthetic` on the same device; the table has the evaluation's headline numbers and the location-token loss
at the end. Ten variants of the default recipe ran concurrently on one H100 in ~15 minutes of training and
1 minute of evaluation each (docs/DEFAULT_MODEL.md has that sweep). `--workers N` gives each variant N
batch-making processes: one CPU core makes a 32 scenes x 4 samples batch in ~0.2 s, slower than a GPU
step; three variants with four workers each ran at ~8 steps a second each on an H200 with 16 cores.

    python tools/sweep.py --out /tmp/sweep base={} seed1='{"seed": 1}' \\
        scenes32='{"scenes_per_step": 32, "samples_per_scene": 4}'
    python tools/sweep.py --out /tmp/sweep --table        # the table again, from what is there

A GPU run is not the CPU run: other kernels give other floats, so a variant's numbers rank recipes but do not
reproduce a model trained on the CPU (the shipped model is a CPU run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def job(out: Path, recipe_name: str, overrides: dict, device: str, n_per_task: int, workers: int = 1) -> int:
    import torch

    from kosmos2.cli import main
    from kosmos2.train.recipes import synthetic as T

    torch.set_num_threads(1)
    T.train(T.get_recipe(recipe_name, **overrides), out, progress=False, device=device, prefetch=workers)
    return main(
        ["eval", "synthetic", "--model", str(out / "model"), "--out", str(out / "eval"),
         "--batch-size", "128", "--device", device, "--n-per-task", str(n_per_task)]
    )  # fmt: skip


def table(root: Path) -> str:
    lines = [
        "| variant | REC test / comp. | phrase R@1 | caption P / R | REG test / comp. | VQA plain / grounded "
        "| location loss (last 50 steps) |",
        "|---|---|---|---|---|---|---|",
    ]
    for metrics in sorted(root.glob("*/eval/metrics.json")):
        name = metrics.parent.parent.name
        r = json.loads(metrics.read_text())["results"]
        t, c = r["test"], r["compositional"]
        log = [json.loads(line) for line in (metrics.parent.parent / "log.jsonl").read_text().splitlines()]
        tail = [x["loss_location"] for x in log if x["step"] > log[-1]["step"] - 50]
        loc = sum(tail) / len(tail)
        lines.append(
            f"| {name} | {t['rec']['accuracy']:.3f} / {c['rec']['accuracy']:.3f} "
            f"| {t['phrase_grounding']['R@1']:.3f} "
            f"| {t['grounded_caption']['precision']:.3f} / {t['grounded_caption']['recall']:.3f} "
            f"| {t['reg']['exact_match']:.3f} / {c['reg']['exact_match']:.3f} "
            f"| {t['vqa']['accuracy']:.3f} / {t['grounded_vqa']['accuracy']:.3f} | {loc:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "variants", nargs="*", help="NAME=JSON: recipe fields to replace, e.g. lr2='{\"lr\": 2e-3}'"
    )
    p.add_argument("--out", type=Path, required=True, help="one folder per variant goes here")
    p.add_argument("--recipe", default="default")
    p.add_argument("--device", default="cuda")
    p.add_argument("--n-per-task", type=int, default=1000)
    p.add_argument(
        "--workers", type=int, default=1, help="batch-making processes per variant (one CPU core each)"
    )
    p.add_argument("--table", action="store_true", help="only print the table of what --out holds")
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = p.parse_args(argv)
    if args.job:
        name, overrides = args.job.split("=", 1)
        return job(
            args.out / name, args.recipe, json.loads(overrides), args.device, args.n_per_task, args.workers
        )
    failed = []
    if not args.table:
        from kosmos2.train.recipes.synthetic import get_recipe

        for variant in args.variants:  # every variant checked before any starts
            name, sep, overrides = variant.partition("=")
            try:
                fields = json.loads(overrides) if sep else None
                if not isinstance(fields, dict):
                    raise ValueError("write NAME=JSON object, e.g. base={}")
                get_recipe(args.recipe, **fields)
            except ValueError as e:
                p.error(f"variant {variant!r}: {e}")
        procs = []
        for variant in args.variants:
            name = variant.partition("=")[0]
            (args.out / name).mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, __file__, "--out", str(args.out), "--recipe", args.recipe, "--device",
                   args.device, "--n-per-task", str(args.n_per_task), "--workers", str(args.workers),
                   "--job", variant]  # fmt: skip
            with open(args.out / f"{name}.out", "w") as log:  # the child keeps its own copy of the handle
                procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
        for name, proc in procs:
            if proc.wait() != 0:
                failed.append(name)
                print(f"variant {name} failed: see {args.out / (name + '.out')}", file=sys.stderr)
    print(table(args.out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
