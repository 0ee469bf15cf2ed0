"""`kosmos2 serve`: parse the arguments, load the predictor, run uvicorn (imports are deferred to the run)."""

from __future__ import annotations

import argparse

from kosmos2.runtime import add_runtime_arguments, set_threads


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the model over HTTP: native grounding API, OpenAI-compatible chat, web demo",
        description="Serve a Kosmos-2 checkpoint: POST /v1/ground|locate|describe|vqa, /v1/chat/completions, "
        "GET /v1/models, /health, /metrics, /docs and the web demo at /.",
    )
    p.add_argument("--model", help="checkpoint directory (default: $KOSMOS2_MODEL, else the built-in model)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    add_runtime_arguments(p)  # --dtype float32|bfloat16|int8, --threads N (as ground and eval)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting before 503s (default 64)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ routes")
    p.add_argument(
        "--allow-remote-images", action="store_true", help="fetch http(s) image URLs (refused by default)"
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="the most new tokens one request may ask")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000, help="the largest image, in pixels")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="the largest request body, in MiB")
    p.add_argument("--served-model-name", default=None, help="the model id in /v1/models (default: dir name)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from kosmos2.server.inputs import Limits

    for name in ("max_batch", "max_new_tokens", "max_image_pixels"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"kosmos2 serve: --{name.replace('_', '-')} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.max_queue < 0 or args.max_body_mb <= 0:
        print("kosmos2 serve: --max-queue must be >= 0 and --max-body-mb > 0", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from kosmos2.server.app import ServeConfig, create_app
    except ModuleNotFoundError as e:
        print(
            f"kosmos2 serve: {e.name} is missing; install the extra: pip install 'kosmos2[serve]'",
            file=sys.stderr,
        )
        return 1

    from kosmos2.predictor import Predictor, default_model_dir

    set_threads(args.threads)
    try:
        predictor = Predictor.from_pretrained(args.model, dtype=args.dtype, device=args.device)
    except (OSError, ValueError) as e:
        print(f"kosmos2 serve: {e}", file=sys.stderr)
        return 1
    directory = args.model or str(default_model_dir())
    name = args.served_model_name or _model_name(directory, args.model is None)
    limits = Limits(
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_image_pixels=args.max_image_pixels,
        max_new_tokens=args.max_new_tokens,
    )
    config = ServeConfig(
        model_name=name,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        api_key=args.api_key,
        allow_remote_images=args.allow_remote_images,
        limits=limits,
    )
    app = create_app(predictor, config)
    print(
        f"kosmos2 serve: {name} on http://{args.host}:{args.port} (demo at /, API docs at /docs)",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


def _model_name(directory: str, builtin: bool) -> str:
    from pathlib import Path

    return "kosmos2-default" if builtin and Path(directory).name == "default" else Path(directory).name
