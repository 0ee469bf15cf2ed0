"""`kosmos2 eval refcoco | flickr30k | synthetic`: thin subcommands over the evaluation functions.

Each handler loads the annotations, builds the predictor, and calls the typed function of the dataset's module
(refcoco.evaluate_rec / evaluate_reg, flickr30k.evaluate_grounding / evaluate_captions,
synthetic.evaluate_world, or synthetic.evaluate for --samples-file), which writes metrics.json,
records.jsonl, report.md, plots and example pictures under --out. Heavy modules (torch,
the predictor) are imported only when a handler runs. docs/EVAL.md says where to get each dataset.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
from pathlib import Path
from typing import Any

from kosmos2 import runtime

REFCOCO_DATASETS = ("refcoco", "refcoco+", "refcocog")
# the synthetic world's tasks (kosmos2.eval.synthetic.WORLD_TASKS / DEFAULT_TASKS, repeated here so that
# building the parser imports nothing heavy; tests check the two agree)
WORLD_TASKS = ("rec", "phrase_grounding", "grounded_caption", "caption", "reg", "grounded_vqa", "vqa")
DEFAULT_TASKS = ("rec", "phrase_grounding", "grounded_caption", "reg", "grounded_vqa", "vqa")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `eval` with its three subcommands to the top-level parser."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate on RefCOCO/+/g, Flickr30k Entities or the synthetic world",
        description="Benchmarks with the official Kosmos-2 protocols (docs/EVAL.md).",
    )
    sub = parser.add_subparsers(dest="eval_command", metavar="BENCHMARK")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    p = sub.add_parser(
        "refcoco",
        help="referring expressions: REC accuracy (first/any/mean box) or REG (CIDEr, METEOR)",
        description="RefCOCO, RefCOCO+ (UNC splits) and RefCOCOg (UMD splits), from refer's pickles or "
        "MDETR's json files.",
    )
    p.add_argument("--dataset", choices=REFCOCO_DATASETS, default="refcoco")
    p.add_argument("--splits", nargs="+", help="default: all evaluation splits (val testA testB / val test)")
    p.add_argument(
        "--refer-dir", type=Path, help="refer's data/ folder (refcoco/refs(unc).p, instances.json, ...)"
    )
    p.add_argument(
        "--mdetr-dir", type=Path, help="MDETR's mdetr_annotations/ (finetune_<dataset>_<split>.json)"
    )
    p.add_argument(
        "--images", type=Path, required=True, help="COCO train2014 images (or their parent folder)"
    )
    p.add_argument("--task", choices=("rec", "reg"), default="rec")
    _text_metrics(p)
    _common(p, "the official one: greedy, no-repeat-ngram 3, up to 64 new tokens")
    p.set_defaults(func=run_refcoco)

    p = sub.add_parser(
        "flickr30k",
        help="Flickr30k Entities phrase grounding (R@1/5/10 by phrase type) or captioning (CIDEr, METEOR)",
        description="Flickr30k Entities from the official Annotations/Sentences folder, MDETR's "
        "final_flickr_separateGT_<split>.json, or both (queries from MDETR, ground truth from the folder, as "
        "the official evaluation).",
    )
    p.add_argument("--splits", nargs="+", default=["val", "test"], choices=("train", "val", "test"))
    p.add_argument(
        "--entities-dir", type=Path, help="flickr30k_entities folder (Annotations/, Sentences/, val.txt)"
    )
    p.add_argument(
        "--mdetr-dir", type=Path, help="MDETR's mdetr_annotations/ (final_flickr_separateGT_<split>.json)"
    )
    p.add_argument("--images", type=Path, required=True, help="flickr30k-images folder (<id>.jpg)")
    p.add_argument("--task", choices=("grounding", "caption"), default="grounding")
    p.add_argument("--caption-prompt", default="An image of", help="captioning prompt (default: %(default)r)")
    _text_metrics(p)
    _common(
        p,
        "the official one: greedy for grounding, 5 beams for captions; no-repeat-ngram 3; up to 64 "
        "new tokens",
    )
    p.set_defaults(func=run_flickr30k)

    p = sub.add_parser(
        "synthetic",
        help="the synthetic world of the default model: REC, phrase grounding, grounded captions, REG, VQA, "
        "with the default model's targets",
        description="The synthetic world's fixed held-out sets (kosmos2/data/synthetic.py): every task with "
        "the prompts the model trained on, greedy decoding without n-gram blocking; writes metrics.json, "
        "report.md (targets beside the measured values) and example pictures. --samples-file evaluates a "
        "JSON Lines file of REC / phrase samples instead (format in docs/EVAL.md).",
    )
    p.add_argument(
        "--split",
        default="all",
        choices=("all", "test", "compositional", "train"),
        help="all = test and compositional, the held-out splits (default: %(default)s)",
    )
    p.add_argument(
        "--n-per-task", type=int, default=1000, help="queries per task and split (default: %(default)s)"
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        choices=WORLD_TASKS,
        default=list(DEFAULT_TASKS),
        help=f"world tasks to evaluate, of {' '.join(WORLD_TASKS)} (default: all but caption)",
    )
    p.add_argument("--samples-file", type=Path, help="a JSON Lines file of REC / phrase samples instead")
    p.add_argument(
        "--trust",
        action="store_true",
        help="instead: calibrate locate's found / ambiguous thresholds on the calibration split and measure "
        "them on the test split (ordinary, absent and ambiguous REC queries); writes trust.md, trust.json",
    )
    _common(p, "the world's: greedy, up to 96 new tokens, no n-gram blocking (its captions repeat trigrams)")
    p.set_defaults(func=run_synthetic)


def _text_metrics(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--text-metrics",
        nargs="+",
        default=["CIDEr", "METEOR"],
        metavar="METRIC",
        choices=("CIDEr", "METEOR", "BLEU-4", "ROUGE-L"),
        help="metrics for REG / captions: CIDEr METEOR BLEU-4 ROUGE-L (default: CIDEr METEOR)",
    )


def _common(p: argparse.ArgumentParser, decoding: str) -> None:
    d = p.add_argument_group(
        "decoding",
        f"The protocol's decoding is pinned ({decoding}); the model's generation_config.json decides "
        "nothing. These options change it explicitly, and metrics.json records the decoding used and any "
        "change.",
    )
    d.add_argument("--max-new-tokens", type=int, help="generation length (default: the protocol's)")
    d.add_argument("--num-beams", type=int, help="beam size (default: the protocol's)")
    d.add_argument(
        "--no-repeat-ngram-size", type=int, help="n-gram blocking, 0 = off (default: the protocol's)"
    )
    d.add_argument(
        "--length-penalty", type=float, help="beam score length exponent (default: the protocol's, 1.0)"
    )
    g = p.add_argument_group("model and run")
    g.add_argument(
        "--model",
        "--checkpoint",
        dest="checkpoint",
        help="model directory, as for `kosmos2 ground` (default: the built-in default model)",
    )
    g.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    runtime.add_runtime_arguments(g)
    g.add_argument("--out", type=Path, required=True, help="output folder (metrics.json, report.md, plots)")
    g.add_argument(
        "--cache", type=Path, help="prediction cache (default: OUT/predictions.jsonl); reruns resume"
    )
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--limit", type=int, help="evaluate only the first N queries of each split (quick runs)")
    g.add_argument(
        "--model-id", help="name of the model in cache keys (default: path + file sizes and times)"
    )
    g.add_argument(
        "--samples", type=int, default=16, help="images on the sample sheet (default: %(default)s)"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


# ------------------------------------------------------------------------------------------------------------
# Shared helpers


def model_id_for(checkpoint: str | os.PathLike | None) -> str:
    """Cache identity of a model: its resolved path plus a digest of its files' names, sizes and mtimes.

    A checkpoint rewritten in place gets a new id, so stale predictions are never reused. None: the default
    model's directory ($KOSMOS2_MODEL or the one shipped in the package).
    """
    if checkpoint is None:
        from kosmos2.predictor import default_model_dir

        checkpoint = default_model_dir()
    path = Path(checkpoint).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {checkpoint!r}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"{path}@{digest.hexdigest()[:12]}"


def load_predictor(args: argparse.Namespace) -> Any:
    """The Predictor for --checkpoint / --dtype / --device, with --threads applied (torch is imported here,
    not at parse time)."""
    from kosmos2.predictor import Predictor

    runtime.set_threads(getattr(args, "threads", None))
    return Predictor.from_pretrained(
        args.checkpoint, dtype=args.dtype, device=args.device, batch_size=args.batch_size
    )


def generation_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding options given on the command line: explicit changes to the protocol's decoding."""
    given = {
        "max_new_tokens": args.max_new_tokens,
        "num_beams": args.num_beams,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "length_penalty": args.length_penalty,
    }
    for name, least in (("max_new_tokens", 1), ("num_beams", 1), ("no_repeat_ngram_size", 0)):
        if given[name] is not None and given[name] < least:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {least}, got {given[name]}")
    if given["length_penalty"] is not None and not math.isfinite(given["length_penalty"]):
        raise ValueError(f"--length-penalty must be a finite number, got {given['length_penalty']}")
    return {k: v for k, v in given.items() if v is not None}


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    model_id = args.model_id or model_id_for(args.checkpoint)
    # bfloat16 and int8 can predict otherwise than float32: their predictions get cache keys of their own
    if getattr(args, "dtype", None) not in (None, "float32"):
        model_id = f"{model_id}+{args.dtype}"
    return {
        "model_id": model_id,
        "cache": args.cache,
        "batch_size": args.batch_size,
        "progress": not args.no_progress,
    }


def _missing_text_metrics() -> str | None:
    """The install hint when pycocoevalcap is missing (checked before any inference runs), else None."""
    from kosmos2.eval import text_metrics

    try:
        text_metrics.require()
    except ImportError as e:
        return str(e)
    return None


def _rec_line(s: dict[str, Any]) -> str:
    """A REC summary (an entry of refcoco.summarize) as printed after a run."""
    return (
        f"Acc@0.5 first {s['acc_first']:.2f} any {s['acc_any']:.2f} mean {s['acc_mean']:.2f} "
        f"(n={s['count']}, no box {s['undecodable']})"
    )


def _recall_line(a: dict[str, Any]) -> str:
    """R@1/5/10 of a phrase-grounding recall row (flickr30k.summarize's "all") as printed after a run."""
    return f"R@1 {a['R@1']:.2f} R@5 {a['R@5']:.2f} R@10 {a['R@10']:.2f}"


def _fail(message: str) -> int:
    """A usage error: kosmos2.cli prints it as `kosmos2 eval <benchmark>: <message>` and exits with 2."""
    from kosmos2.errors import UsageError

    raise UsageError(message)


# ------------------------------------------------------------------------------------------------------------
# Handlers


def run_refcoco(args: argparse.Namespace) -> int:
    from kosmos2.eval import refcoco
    from kosmos2.eval.runner import limit_queries
    from kosmos2.image import ImageError

    try:
        splits = args.splits or list(refcoco.DATASETS[args.dataset][1])
        examples = []
        for split in splits:
            examples += limit_queries(
                refcoco.load_split(args.dataset, split, args.refer_dir, args.mdetr_dir), args.limit
            )
        options = _run_options(args)
        generation = generation_settings(args)
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    if args.task == "reg" and (missing := _missing_text_metrics()):
        return _fail(missing)
    predictor = load_predictor(args)
    try:
        if args.task == "rec":
            result = refcoco.evaluate_rec(
                predictor,
                examples,
                args.images,
                args.out,
                generation=generation,
                samples=args.samples,
                **options,
            )
        else:
            result = refcoco.evaluate_reg(
                predictor,
                examples,
                args.images,
                args.out,
                generation=generation,
                metrics_names=args.text_metrics,
                **options,
            )
    except (FileNotFoundError, ImageError) as e:  # an image missing or unreadable
        return _fail(str(e))
    if args.task == "rec":
        for dataset, by_split in result["results"].items():
            for split, s in by_split.items():
                print(f"{dataset} {split}: {_rec_line(s)}")
    else:
        print(" ".join(f"{k} {v:.2f}" for k, v in result["results"]["scores"].items()))
    print(f"report: {os.fspath(args.out / 'report.md')}")
    return 0


def run_flickr30k(args: argparse.Namespace) -> int:
    from kosmos2.eval import flickr30k
    from kosmos2.eval.runner import limit_queries
    from kosmos2.image import ImageError

    try:
        options = _run_options(args)
        if args.task == "grounding":
            examples = []
            for split in args.splits:
                examples += limit_queries(
                    flickr30k.load_split(split, args.entities_dir, args.mdetr_dir), args.limit
                )
        else:
            images: dict[str, Any] = {}
            for split in args.splits:
                if args.entities_dir is not None:
                    found = flickr30k.load_captions(args.entities_dir, split)
                else:
                    found = flickr30k.caption_references(flickr30k.load_split(split, None, args.mdetr_dir))
                images.update(dict(limit_queries(list(found.items()), args.limit)))
        generation = generation_settings(args)
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    if args.task == "caption" and (missing := _missing_text_metrics()):
        return _fail(missing)
    predictor = load_predictor(args)
    try:
        if args.task == "grounding":
            result = flickr30k.evaluate_grounding(
                predictor,
                examples,
                args.images,
                args.out,
                generation=generation,
                samples=args.samples,
                **options,
            )
        else:
            result = flickr30k.evaluate_captions(
                predictor,
                images,
                args.images,
                args.out,
                prompt=args.caption_prompt,
                generation=generation,
                metrics_names=args.text_metrics,
                **options,
            )
    except (FileNotFoundError, ImageError) as e:
        return _fail(str(e))
    if args.task == "grounding":
        for split, s in result["results"].items():
            a = s["recall"]["all"]
            print(f"flickr30k {split}: {_recall_line(a)} (n={a['count']}, no box {s['undecodable']})")
    else:
        print(" ".join(f"{k} {v:.2f}" for k, v in result["results"]["scores"].items()))
    print(f"report: {os.fspath(args.out / 'report.md')}")
    return 0


def run_synthetic(args: argparse.Namespace) -> int:
    from kosmos2.eval import synthetic

    if args.samples_file is not None:
        return _run_samples_file(args)
    try:
        options = _run_options(args)
        if args.n_per_task < 1:
            raise ValueError(f"--n-per-task must be a positive number of queries, got {args.n_per_task}")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be a positive number of queries, got {args.limit}")
        # --limit N: the first N queries of each task and split (a prefix of the full run, so cached)
        n = min(args.n_per_task, args.limit) if args.limit is not None else args.n_per_task
        generation = generation_settings(args)
        if args.samples < 0:
            raise ValueError(f"--samples must be >= 0, got {args.samples}")
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    splits = synthetic.HELD_OUT_SPLITS if args.split == "all" else (args.split,)
    predictor = load_predictor(args)
    if args.trust:
        trust = synthetic.evaluate_trust(
            predictor,
            args.out,
            model_id=options["model_id"],
            n_per_task=n,
            batch_size=options["batch_size"],
            progress=options["progress"],
        )
        print("\n".join(line for line in synthetic.trust_markdown(trust) if line.startswith("|")))
        print(f"report: {os.fspath(args.out / 'trust.md')}")
        return 0
    result = synthetic.evaluate_world(
        predictor,
        args.out,
        splits=splits,
        n_per_task=n,
        tasks=args.tasks,
        generation=generation,
        examples=args.samples,
        **options,
    )
    for split, by_task in result["results"].items():
        print(f"{split}: " + ", ".join(_headline(task, s) for task, s in by_task.items()))
    for row in result["targets"]:
        if row["met"] is not None:
            verdict = "pass" if row["met"] else "FAIL"
            size = "" if row["full_size"] else f", n={row['n']} < {synthetic.MIN_QUERIES}"
            print(
                f"target {row['split']} {row['label']} >= {row['target']:.2f}: {row['measured']:.3f} "
                f"{verdict}{size}"
            )
    print(f"report: {os.fspath(args.out / 'report.md')}")
    return 0


def _headline(task: str, s: dict[str, Any]) -> str:
    if task == "rec":
        return f"REC Acc@0.5 {s['accuracy']:.3f}"
    if task == "phrase_grounding":
        return f"phrase R@1 {s['R@1']:.3f}"
    if task == "grounded_caption":
        return f"caption entities P {s['precision']:.3f} R {s['recall']:.3f}"
    if task in ("vqa", "grounded_vqa"):
        return f"{task} {s['accuracy']:.3f}"
    return f"{task} exact {s['exact_match']:.3f}"


def _run_samples_file(args: argparse.Namespace) -> int:
    """REC / phrase samples of a JSON Lines file, reported as the benchmarks are (OUT/rec, OUT/phrases)."""
    from kosmos2.eval import synthetic
    from kosmos2.eval.runner import limit_queries

    try:
        options = _run_options(args)
        rec, phrases = synthetic.load_samples(args.samples_file)
        rec, phrases = limit_queries(rec, args.limit), limit_queries(phrases, args.limit)
        generation = generation_settings(args)
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    predictor = load_predictor(args)
    try:
        result = synthetic.evaluate(
            predictor,
            args.out,
            rec=rec,
            phrases=phrases,
            generation=generation,
            samples=args.samples,
            **options,
        )
    except (ValueError, FileNotFoundError) as e:  # a sample's image or boxes
        return _fail(str(e))
    for name, by_split in result.get("rec", {}).get("results", {}).items():
        for s in by_split.values():
            print(f"{name} REC: {_rec_line(s)}")
    for name, s in result.get("phrases", {}).get("results", {}).items():
        a = s["recall"]["all"]
        print(f"{name} phrases: {_recall_line(a)} (n={a['count']})")
    parts = [args.out / part / "report.md" for part in ("rec", "phrases") if part in result]
    print(f"reports: {', '.join(os.fspath(p) for p in parts)}")
    return 0
