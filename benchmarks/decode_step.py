"""Where one batch-1 decoding step's time goes, per dtype, against the read bandwidth measured beside it.

    python benchmarks/decode_step.py                         # full size, random weights, 2 threads, ~6 min
    python benchmarks/decode_step.py --checkpoint DIR        # an existing Hugging Face layout checkpoint
    python benchmarks/decode_step.py --preset tiny --steps 4  # smoke test

For each dtype, in this one process, one after the other (the model of the previous dtype is freed first):
1. Loads the checkpoint and prepares it as `Predictor.from_pretrained(dtype=...)` does, fills the KV cache
   with a 71-token prompt (the length of the benchmark's image + "<grounding>An image of" prompt).
2. Times `--steps` single decoding steps (`kosmos2.generate.decode_one_token`), each one alone, with the read
   bandwidth (`x.sum()` over 512 MiB float32, best of 3, the same threads) measured right before and right
   after the block of steps. The bound of that block is the higher of the two bandwidths divided by the bytes
   of weights one step reads (`kosmos2.quantize.bytes_read_per_token`): the machine is shared and its
   bandwidth drifts by 2x within minutes, so a bound measured at another time says little.
3. Runs the step's matrix products alone: every decoder linear layer and the head, in the step's order, on
   one-row inputs, nothing between them (the same modules, so the same kernels and packed weights). Their
   time is the floor a fused step would reach with these kernels; its share of the bound is the ceiling of
   the whole step's share.
4. Reads the same bytes with `sum()`, one plain float32 tensor per product in the step's order: the
   speed of plain reads at the step's granularity (145 calls, each split over the threads), against which
   the products' own GB/s can be judged.
5. Profiles `--profile-steps` steps (torch.profiler, self CPU time per operator) and splits the step into
   products, attention (`scaled_dot_product_attention` or the decode path's matmuls and softmax), other
   operators (LayerNorms, GELU, adds, the cache writes, the mask) and the time outside any operator (Python
   and dispatch), scaled to the unprofiled median step.

Prints one Markdown table; `--json FILE` writes the numbers too.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate import GB, best_seconds, build_checkpoint, probe_bandwidth  # noqa: E402  (benchmarks/generate.py, beside this script)

from kosmos2.config import Kosmos2Config  # noqa: E402
from kosmos2.quantize import DTYPES  # noqa: E402

PROMPT = 71
PRODUCT_OPS = ("linear_pointwise", "_weight_int8pack_mm", "linear_dynamic", "aten::addmm", "aten::mm")
ATTENTION_OPS = ("scaled_dot_product", "aten::bmm", "aten::_softmax", "aten::baddbmm")


def products(model: nn.Module) -> list[nn.Module]:
    """Every product module a decoding step runs, in order: per block q, k, v, out, fc1, fc2, then the
    head."""
    text = model.text_model
    out = []
    for layer in text.model.layers:
        a, f = layer.self_attn, layer.ffn
        out += [a.q_proj, a.k_proj, a.v_proj, a.out_proj, f.fc1, f.fc2]
    out.append(text.lm_head)
    return out


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the weight a product module reads: in * out * the stored element size (packed bf16: 2)."""
    n = module.in_features * module.out_features
    if hasattr(module, "weight_int8"):
        return n
    if hasattr(module, "packed"):
        return 2 * n
    return n * module.weight.element_size()


def classify(name: str) -> str:
    if any(k in name for k in PRODUCT_OPS):
        return "products"
    if any(k in name for k in ATTENTION_OPS):
        return "attention"
    return "other ops"


@torch.no_grad()
def measure(checkpoint: Path, dtype: str, steps: int, profile_steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from kosmos2.checkpoint import load_pretrained
    from kosmos2.generate import decode_one_token, onednn_linear, prefill
    from kosmos2.quantize import bytes_read_per_token, prepare_model

    load_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    model = prepare_model(load_pretrained(checkpoint, dtype=load_dtype), dtype).eval()
    nbytes = bytes_read_per_token(model)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60000, (1, PROMPT), generator=generator)
    total_steps = 3 + steps + profile_steps
    _, positions = prefill(model, ids, torch.ones_like(ids), None, None, PROMPT + total_steps)
    token = torch.tensor([[1250]])
    slot = PROMPT

    def step() -> None:
        nonlocal slot, positions
        positions = positions + 1
        decode_one_token(model, token, slot, positions)
        slot += 1

    for _ in range(3):  # warm-up: kernels' plans, first touch of the cache
        step()
    probe = torch.ones((512 << 20) // 4)
    before = probe_bandwidth(probe)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    after = probe_bandwidth(probe)
    del probe

    # the products alone, in the step's order, on one-row inputs of the activations' dtype
    act = model.text_model.model.embed_tokens.weight.dtype
    modules = products(model)
    inputs = [torch.randn(1, 1, m.in_features, generator=generator).to(act) for m in modules]

    def products_only() -> None:
        for m, x in zip(modules, inputs, strict=True):
            m(x)

    with onednn_linear(act == torch.float32):
        products_s = best_seconds(products_only, max(3, steps // 3))

    # the same bytes read by `sum()`, one float32 tensor per product (each product's weight bytes), in order:
    # how fast plain reads go at the step's granularity (145 separate calls, each split over the threads)
    reads = [torch.ones(weight_bytes(m) // 4) for m in modules]
    reads_s = best_seconds(lambda: [r.sum() for r in reads], 3)
    read_bytes = 4 * sum(r.numel() for r in reads)
    reads.clear()  # up to 5.4 GB (float32): freed before the profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(profile_steps):
            step()
        profiled_wall = time.perf_counter() - start
    parts = {"products": 0.0, "attention": 0.0, "other ops": 0.0}
    for event in prof.key_averages():
        parts[classify(event.key)] += event.self_cpu_time_total / 1e6
    model.clear_cache()
    median = statistics.median(times)
    # profiling slows everything a little: shares of the profiled wall time, applied to the plain median
    parts["outside operators"] = max(0.0, profiled_wall - sum(parts.values()))
    breakdown = {k: v * median / profiled_wall for k, v in parts.items()}
    bw = max(before, after)
    bound = bw / nbytes  # steps per second
    return {
        "dtype": dtype,
        "bytes_per_token": nbytes,
        "bandwidth_before": before,
        "bandwidth_after": after,
        "step_median_s": median,
        "step_best_s": min(times),
        "tokens_per_s": 1 / median,
        "bound_tokens_per_s": bound,
        "share_of_bound": (1 / median) / bound,
        "products_only_s": products_s,
        "products_only_share": (1 / products_s) / bound,
        "products_only_gbps": nbytes / products_s / GB,
        "reads_alone_gbps": read_bytes / reads_s / GB,
        "breakdown_s": breakdown,
    }


def report(rows: list[dict], threads: int, load: tuple[float, float]) -> str:
    lines = [
        f"{threads} threads; load average {load[0]:.2f} at the start, {load[1]:.2f} at the end",
        "",
        "| dtype | step (median) | tok/s | bandwidth beside it | bound | share | products | attention "
        "| other ops | outside ops | products alone | its share | plain reads of those bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r["breakdown_s"]
        ms = {k: 1000 * v for k, v in b.items()}
        lines.append(
            f"| {r['dtype']} | {1000 * r['step_median_s']:.1f} ms | {r['tokens_per_s']:.2f} | "
            f"{max(r['bandwidth_before'], r['bandwidth_after']) / GB:.1f} GB/s | "
            f"{r['bound_tokens_per_s']:.2f} tok/s | {100 * r['share_of_bound']:.0f} % | "
            f"{ms['products']:.1f} ms | {ms['attention']:.1f} ms | {ms['other ops']:.1f} ms | "
            f"{ms['outside operators']:.1f} ms | {1000 * r['products_only_s']:.1f} ms "
            f"({r['products_only_gbps']:.1f} GB/s) | {100 * r['products_only_share']:.0f} % | "
            f"{r['reads_alone_gbps']:.1f} GB/s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="kosmos-2-patch14-224")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint folder (default: build one, random)")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: {', '.join(unknown)} not one of {', '.join(DTYPES)}")
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kosmos2-step-") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = Path(tmp) / "checkpoint"
            print(f"building {args.preset} with random weights ...", file=sys.stderr, flush=True)
            build_checkpoint(Kosmos2Config.from_preset(args.preset), checkpoint, args.seed)
        for dtype in dtypes:
            print(f"{dtype} ...", file=sys.stderr, flush=True)
            rows.append(measure(checkpoint, dtype, args.steps, args.profile_steps))
            gc.collect()
    text = report(rows, args.threads, (load_start, os.getloadavg()[0]))
    print(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
