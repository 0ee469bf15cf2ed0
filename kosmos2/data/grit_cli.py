"""`kosmos2 grit build`: image–caption pairs -> GRIT-20M-format parquet and webdataset shards (SPEC §9).

Light on purpose: the handler imports the pipeline (spaCy, pyarrow, torch, transformers, Ray) only when it
runs.
"""

from __future__ import annotations

import argparse
import json

DETECTORS = (
    "grounding-dino",
    "owlv2",
    "precomputed",
)  # as in kosmos2.data.detectors, kept here to stay light


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `grit build` to the console script."""
    grit = subparsers.add_parser("grit", help="build GRIT grounded image-text data (SPEC §9)")
    grit.set_defaults(func=lambda args: (grit.print_help(), 2)[1])
    commands = grit.add_subparsers(dest="grit_command", metavar="COMMAND")
    build = commands.add_parser(
        "build",
        help="image-caption pairs -> GRIT-20M parquet + webdataset shards",
        description=(
            "Turn local image-caption pairs into GRIT-20M-format parquet and webdataset training shards: "
            "spaCy noun chunks minus abstract ones, a grounding detector, score > 0.65, NMS across chunks, "
            "referring expressions. A killed build resumes when run again with the same command; "
            "--overwrite starts it over."
        ),
    )
    build.add_argument(
        "input",
        help="a .jsonl or .csv listing (columns image, caption; optional key, id, url, "
        "clip_similarity_vitb32, clip_similarity_vitl14; image paths relative to the listing), webdataset "
        ".tar shards (<key>.jpg + <key>.txt or a caption in <key>.json), a .parquet file with image (bytes "
        "or path) and caption, or a folder of files of one of these kinds. A pair without a key gets its "
        "position in the input, counted from 0 over the files in name order, as nine digits (the first "
        "pair is 000000000, the 43rd 000000042) and that number as its id; --detections names pairs by "
        "these keys",
    )
    build.add_argument("output", help="output folder: part-NNNNN.parquet, part-NNNNN.tar, manifest.json")
    build.add_argument("--detector", choices=DETECTORS, default="precomputed", help="default: precomputed")
    build.add_argument(
        "--model-dir", help="local model directory (with processor files) for grounding-dino/owlv2"
    )
    build.add_argument(
        "--detections",
        help='JSONL of precomputed detections, a line per image: {"key": "000000042", "detections": '
        '[{"phrase": "a dog", "box": [x1, y1, x2, y2], "score": 0.91}]}; boxes normalised to the image '
        "(x divided by its width, y by its height, all in [0, 1], on the image as displayed, its EXIF "
        'rotation applied), a phrase named by its text or by "phrase_index" (its noun chunk\'s position)',
    )
    build.add_argument("--device", default="cpu", help="torch device of a model detector (default cpu)")
    build.add_argument("--workers", type=int, default=1, help="processes on this machine (default 1)")
    build.add_argument("--engine", choices=("local", "ray"), default="local", help="default local")
    build.add_argument("--ray-address", help="Ray cluster to join (default: start a local Ray instance)")
    build.add_argument(
        "--shard-size", type=int, default=1000, help="pairs per shard and commit (default 1000)"
    )
    build.add_argument("--batch-size", type=int, default=8, help="images per detector call (default 8)")
    build.add_argument(
        "--score-threshold", type=float, default=0.65, help="keep boxes scoring above this (default 0.65)"
    )
    build.add_argument(
        "--nms-iou",
        type=float,
        default=0.5,
        help="class-agnostic NMS across chunks: drop a box overlapping a better one by IoU above this "
        "(default 0.5; 1.0 turns NMS off)",
    )
    build.add_argument(
        "--spacy-pipeline", help="spaCy pipeline name or directory (default: the installed one)"
    )
    build.add_argument("--no-webdataset", action="store_true", help="write parquet only")
    build.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: delete the shards and manifest of a previous build in OUTPUT (other files stay) "
        "instead of resuming it; needed to rerun a folder with other settings",
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    """The handler of `grit build`: settings from the arguments, then the chosen engine."""
    from kosmos2.data.grit import BuildSettings, build
    from kosmos2.errors import UsageError, UserError

    if args.detector == "precomputed":
        if not args.detections or args.model_dir:
            raise UsageError("--detector precomputed needs --detections FILE (and no --model-dir)")
        path = args.detections
    else:
        if not args.model_dir or args.detections:
            raise UsageError(f"--detector {args.detector} needs --model-dir DIR (and no --detections)")
        path = args.model_dir
    try:
        settings = BuildSettings(
            input=args.input,
            output=args.output,
            detector=args.detector,
            detector_path=path,
            device=args.device,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            score_threshold=args.score_threshold,
            nms_iou=args.nms_iou,
            spacy_pipeline=args.spacy_pipeline,
            webdataset=not args.no_webdataset,
            workers=args.workers,
            overwrite=args.overwrite,
        )
        if args.engine == "ray":
            from kosmos2.data.grit_ray import build_ray

            summary = build_ray(settings, progress=not args.no_progress, address=args.ray_address)
        else:
            summary = build(settings, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        raise UserError(str(e)) from e  # `kosmos2 grit build: <message>`, exit 1 (kosmos2.cli)
    print(
        json.dumps(
            {
                "output": summary.output,
                "shards": summary.shards_total,
                "shards_run": summary.shards_run,
                "shards_resumed": summary.shards_skipped,
                "seconds": round(summary.seconds, 2),
                **summary.counts,
            }
        )
    )
    return 0
