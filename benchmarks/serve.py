"""`kosmos2 serve` under concurrent clients: batched serving against one-at-a-time serving, same run.

    python benchmarks/serve.py                          # the built-in default model, 8 clients, 64 requests
    python benchmarks/serve.py --full-size-random --requests 16 --max-new-tokens 16
    python benchmarks/serve.py --clients 16 --requests 128 --rounds 2 --json out.json

Each arm is the real app (`kosmos2.server.app.create_app`) under uvicorn on a free 127.0.0.1 port, over one
model loaded once: `--max-batch 8` (continuous batching) and `--max-batch 1` (one request at a time, the same
code otherwise). N client threads each send requests one after another (closed loop) from one shared list
until it is empty, so both arms serve exactly the same requests over 8 variants of examples/shapes.png:
grounded captions (`--tasks ground`, the default), or any mix of the native tasks (`--tasks
ground,locate,describe,vqa`).
Reported per arm: requests/s (requests / wall time from the first send to the last answer), p50 / p95
latency, errors, generated tokens/s; and whether both arms gave identical answers (they must: batching does
not change a token).

`--full-size-random`: the full Kosmos-2 architecture (ViT-L/14, 24-layer 2048-wide decoder) with seeded
random weights and the default model's 1,292-token vocabulary (a random model would otherwise emit ids the
available tokenizer lacks): 1.53 B parameters, ~6.1 GB in float32. Use few new tokens on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


TASKS = {
    "ground": {},  # the grounded brief caption: ~35 new tokens on the default model
    "locate": {"expression": "the orange circle"},  # 4 new tokens
    "describe": {"box": [10, 10, 120, 120]},  # 4-5 new tokens
    "vqa": {"question": "what is the blue shape?", "grounded": True},  # ~6 new tokens
}


def requests_mix(n: int, max_new_tokens: int | None, tasks: list[str]) -> list[tuple[str, dict]]:
    """n (endpoint, JSON body) pairs cycling over `tasks` and 8 image variants."""
    from _server_fixtures import SHAPES, b64, png_bytes
    from PIL import Image

    im = Image.open(SHAPES).convert("RGB")
    T = Image.Transpose
    variants = [
        im,
        im.transpose(T.FLIP_LEFT_RIGHT),
        im.transpose(T.FLIP_TOP_BOTTOM),
        im.transpose(T.ROTATE_90),
    ]
    variants += [im.crop((0, 0, 260, 262)), im.crop((130, 0, 392, 262)), im.transpose(T.ROTATE_180)]
    variants += [im.resize((300, 200))]
    images = [b64(png_bytes(v)) for v in variants]
    tasks = [(t, TASKS[t]) for t in tasks]
    out = []
    for i in range(n):
        endpoint, fields = tasks[i % len(tasks)]
        body = {"image": images[(i // len(tasks) + i) % len(images)], **fields}
        if max_new_tokens is not None:
            body["max_new_tokens"] = max_new_tokens
        out.append((endpoint, body))
    return out


class InProcessServer:
    """The app under uvicorn in a thread of this process, on a free loopback port."""

    def __init__(self, predictor, max_batch: int, max_queue: int, max_new_tokens: int):
        import uvicorn
        from _server_fixtures import free_port

        from kosmos2.server.app import ServeConfig, create_app
        from kosmos2.server.inputs import Limits

        config = ServeConfig(
            model_name="bench",
            max_batch=max_batch,
            max_queue=max_queue,
            limits=Limits(max_new_tokens=max_new_tokens),
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                create_app(predictor, config), host="127.0.0.1", port=self.port, log_level="warning"
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def run_arm(predictor, max_batch: int, work: list[tuple[str, dict]], clients: int, max_new: int) -> dict:
    try:
        import httpx2 as httpx
    except ImportError:  # pragma: no cover
        import httpx

    server = InProcessServer(predictor, max_batch, max_queue=len(work) + clients, max_new_tokens=max_new)
    try:
        with httpx.Client(base_url=server.url, timeout=3600) as c:  # warm-up, not timed
            c.post("/v1/" + work[0][0], json=work[0][1]).raise_for_status()
        todo = list(enumerate(work))
        lock = threading.Lock()
        latencies, answers, errors, tokens = [], {}, [], [0]

        def client() -> None:
            with httpx.Client(base_url=server.url, timeout=3600) as c:
                while True:
                    with lock:
                        if not todo:
                            return
                        i, (endpoint, body) = todo.pop(0)
                    t0 = time.perf_counter()
                    try:
                        r = c.post("/v1/" + endpoint, json=body)
                        ok = r.status_code == 200
                    except Exception as e:  # counted, never fatal
                        ok, r = False, e
                    dt = time.perf_counter() - t0
                    with lock:
                        if ok:
                            latencies.append(dt)
                            answers[i] = r.json()["text"]
                            tokens[0] += r.json()["usage"]["completion_tokens"]
                        else:
                            errors.append(str(getattr(r, "text", r))[:200])

        threads = [threading.Thread(target=client) for _ in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        server.stop()
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19
    return {
        "max_batch": max_batch,
        "requests": len(work),
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "p50_s": statistics.median(latencies) if latencies else float("nan"),
        "p95_s": q[18] if q else float("nan"),
        "errors": len(errors),
        "error_samples": errors[:3],
        "tokens_per_s": tokens[0] / wall,
        "answers": answers,
    }


def load_predictor(args):
    import torch

    from kosmos2.predictor import Predictor, default_model_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.full_size_random:
        name = "default model" if args.model is None else args.model
        return Predictor.from_pretrained(args.model, dtype=args.dtype), f"{name} ({args.dtype or 'float32'})"
    from kosmos2.config import Kosmos2Config
    from kosmos2.model import Kosmos2
    from kosmos2.predictor import generation_defaults
    from kosmos2.tokenizer import Kosmos2Tokenizer

    tokenizer = Kosmos2Tokenizer.from_pretrained(default_model_dir())
    config = Kosmos2Config.from_preset("kosmos-2-patch14-224")
    config = dataclasses.replace(
        config, text=dataclasses.replace(config.text, vocab_size=tokenizer.vocab_size)
    )
    torch.manual_seed(0)
    model = Kosmos2(config).eval()
    n = sum(p.numel() for p in model.parameters())
    if args.dtype:
        from kosmos2.quantize import prepare_model

        model = prepare_model(model, args.dtype)
    return Predictor(model, tokenizer, generation_defaults(default_model_dir(), tokenizer)), (
        f"full-size architecture, random weights ({n / 1e9:.2f} B parameters, {args.dtype or 'float32'})"
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", default=None, help="checkpoint directory (default: the built-in default model)"
    )
    ap.add_argument(
        "--full-size-random", action="store_true", help="the full architecture with random weights"
    )
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64, help="requests per arm")
    ap.add_argument("--max-batch", type=int, default=8, help="the batched arm's --max-batch")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="per request (default: each task's own)")
    ap.add_argument(
        "--tasks",
        default="ground",
        help="comma-separated endpoints cycled over: ground (default), locate, describe, vqa; "
        "all four: a prefill-heavy mix (three of them write 4-6 tokens)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="repeat both arms, alternating their order")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "int8"], default=None, help="as kosmos2 serve")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    predictor, what = load_predictor(args)
    print(f"  {what}: ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        ap.error(f"--tasks: unknown {unknown}; choose from {sorted(TASKS)}")
    work = requests_mix(args.requests, args.max_new_tokens, tasks)
    limit = max(256, args.max_new_tokens or 0)
    load_before = os.getloadavg()
    results = {"batched": [], "one_at_a_time": []}
    for r in range(args.rounds):
        order = [args.max_batch, 1] if r % 2 == 0 else [1, args.max_batch]
        for max_batch in order:
            arm = run_arm(predictor, max_batch, work, args.clients, limit)
            results["batched" if max_batch > 1 else "one_at_a_time"].append(arm)
            print(
                f"  round {r + 1}, max_batch {max_batch}: {arm['requests_per_s']:.2f} req/s, "
                f"p50 {arm['p50_s']:.2f} s, p95 {arm['p95_s']:.2f} s, errors {arm['errors']}",
                file=sys.stderr,
            )
    same = all(a["answers"] == b["answers"] for a in results["batched"] for b in results["one_at_a_time"])

    def med(arms, key):
        return statistics.median(a[key] for a in arms)

    summary = {
        "model": what,
        "clients": args.clients,
        "tasks": tasks,
        "requests_per_arm": args.requests,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "identical_answers": same,
        "speedup_requests_per_s": med(results["batched"], "requests_per_s")
        / med(results["one_at_a_time"], "requests_per_s"),
    }
    for name, arms in results.items():
        summary[name] = {
            k: med(arms, k) for k in ("requests_per_s", "p50_s", "p95_s", "errors", "tokens_per_s", "wall_s")
        }
    print(
        f"\n{what}; tasks {','.join(tasks)}; {args.clients} clients, {args.requests} requests per arm, "
        f"{args.rounds} round(s)"
    )
    print(f"load average before {load_before[0]:.2f}, after {summary['loadavg_after'][0]:.2f}")
    print("| arm | requests/s | p50 s | p95 s | errors | tokens/s |\n|---|---|---|---|---|---|")
    for name, label in (("batched", f"--max-batch {args.max_batch}"), ("one_at_a_time", "--max-batch 1")):
        s = summary[name]
        print(
            f"| {label} | {s['requests_per_s']:.2f} | {s['p50_s']:.2f} | {s['p95_s']:.2f} "
            f"| {s['errors']:.0f} | {s['tokens_per_s']:.1f} |"
        )
    print(
        f"batched / one at a time: {summary['speedup_requests_per_s']:.2f}x requests/s; "
        f"identical answers: {same}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
