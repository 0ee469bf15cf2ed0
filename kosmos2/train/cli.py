"""`kosmos2 train`: train a recipe (kosmos2/train/recipes/), e.g. the synthetic world's default model.

Light to import (torch is imported when a run starts), so `kosmos2 --help` stays fast. Under
`torchrun --nproc-per-node N kosmos2 train ...` the same command trains on N processes (loop.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

RECIPE_NAMES = ("default", "trust", "test")  # kosmos2.train.recipes.synthetic.RECIPES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `kosmos2 train` to the top-level parser."""
    p = subparsers.add_parser(
        "train",
        help="train a Kosmos-2 on the synthetic world (reproduces the built-in default model)",
        description="Train from scratch on the synthetic world. A folder with a checkpoint resumes where it "
        "stopped. The final model goes to OUT/model (Hugging Face layout). Under torchrun --nproc-per-node N "
        "the same command trains on N processes (DDP; gloo on the CPU, nccl on GPUs).",
    )
    p.add_argument("--recipe", default="default", choices=RECIPE_NAMES, help="(default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/default"), help="run folder (default: %(default)s)")
    p.add_argument("--steps", type=int, help="override the recipe's number of steps")
    p.add_argument("--seed", type=int, help="override the recipe's seed")
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
        help="override any recipe field, e.g. --set optimizer=muon --set lr=2e-3 --set grad_accum=2; VALUE "
        "is read as JSON (numbers, true/false, {\"rec\": 1.0}), else as a string; repeatable",
    )  # fmt: skip
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    p.add_argument(
        "--device", default="cpu",
        help="torch device to train on, e.g. cuda (default: %(default)s; the shipped model is a CPU run)",
    )  # fmt: skip
    p.add_argument(
        "--eval-per-task", type=int, default=200,
        help="after training, score the model on this many held-out queries per task (0: skip)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--prefetch", choices=("auto", "on", "thread", "off"), default="auto",
        help="make the next batches while the model trains (the same batches and weights either way): on: in "
        "worker processes, thread: the next one in a background thread of the trainer; auto: on for a GPU "
        "--device, where the CPU's batch would otherwise leave the GPU waiting, thread on the CPU, whose "
        "cores the model keeps busy but for moments the thread fills (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--prefetch-workers", type=int, default=1, metavar="N",
        help="with prefetch on, this many worker processes make batches (default: %(default)s)",
    )  # fmt: skip
    p.set_defaults(func=run_train)


def use_huge_pages() -> bool:
    """Ask torch to put its big CPU tensors on transparent huge pages (`THP_MEM_ALLOC_ENABLE=1`: on Linux,
    tensors of 2 MB and more are allocated on 2 MB boundaries and advised to use huge pages) unless the
    environment already says. The same floats; on the 2-core development CPU the default recipe's first 60
    steps run 5 % faster (benchmarks/huge_pages.py) and the gap grows as a run's heap fragments: ~13 % from
    step 500 on (docs/DEFAULT_MODEL.md). torch reads the variable once, at its first tensor, so this works
    only before torch is imported; returns whether it was set here."""
    if "torch" in sys.modules or "THP_MEM_ALLOC_ENABLE" in os.environ:
        return False
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    return True


def error(message: str) -> int:
    print(f"kosmos2 train: error: {message}", file=sys.stderr)
    return 2


def run_train(args: argparse.Namespace) -> int:
    use_huge_pages()
    from kosmos2.train.config import parse_overrides
    from kosmos2.train.recipes import synthetic

    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    try:
        overrides.update(parse_overrides(args.overrides))
        recipe = synthetic.get_recipe(args.recipe, **overrides)
    except ValueError as e:
        return error(str(e))
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        return error(f"--device {args.device!r}: {e}")
    if args.prefetch_workers < 1:
        return error(f"--prefetch-workers {args.prefetch_workers}: use 1 or more worker processes")
    on = args.prefetch == "on" or (args.prefetch == "auto" and device.type != "cpu")
    thread = args.prefetch == "thread" or (args.prefetch == "auto" and device.type == "cpu")
    # the number of batch worker processes (0: none), or the trainer's own batch thread
    prefetch: int | str = args.prefetch_workers if on else "thread" if thread else 0
    try:
        model_dir = synthetic.train(
            recipe, args.out, progress=not args.no_progress, device=device, prefetch=prefetch
        )
    except ValueError as e:
        return error(str(e))
    from kosmos2.train.distributed import current

    if not current().main:
        return 0
    print(f"model: {model_dir}")
    if args.eval_per_task > 0:
        from kosmos2.predictor import Predictor

        predictor = Predictor.from_pretrained(model_dir, device=str(device))
        for split in ("test", "compositional"):
            tasks = ("rec", "grounded_caption", "reg", "vqa") if split == "test" else ("rec",)
            results = synthetic.world_scores(predictor, split, args.eval_per_task, tasks)
            print(synthetic.format_quality(split, results))
    return 0
