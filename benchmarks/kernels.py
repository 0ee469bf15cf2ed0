"""One linear product of the full-size decoder in each dtype's kernel: milliseconds per call and GB/s over
the weight bytes. The table behind `kosmos2/quantize.py`'s choices (benchmarks/README.md, "Dtype arms").

    python benchmarks/kernels.py [--threads 1] [--calls 40]

Each kernel is the layer `prepare_model` puts in the model: float32 `nn.Linear` under oneDNN
(`kosmos2.generate.onednn_linear`), bf16 `F.linear` on the plain weight, bf16 `PackedLinear` (oneDNN's
blocked layout), `Int8Linear` (`torch._weight_int8pack_mm`, weight-only) and `Int8DynamicLinear` (FBGEMM's
dynamically quantised linear, activations rounded to 8 bits per call). Best of `--calls` calls after a
warm-up, on the same random weights; the relative error is against the float64 product of the float32
weight.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate import best_seconds  # noqa: E402  (benchmarks/generate.py, beside this script)

from kosmos2 import quantize as Q  # noqa: E402
from kosmos2.generate import onednn_linear  # noqa: E402

PRODUCTS = [(1, 2048, 8192), (1, 8192, 2048), (1, 2048, 65037), (8, 2048, 8192), (71, 2048, 8192)]


def kernels(layer: nn.Linear) -> dict[str, tuple[nn.Module, torch.dtype, int]]:
    """name -> (module, input dtype, bytes of weight it reads)."""
    n = layer.in_features * layer.out_features
    plain = nn.Linear(layer.in_features, layer.out_features, bias=False).to(torch.bfloat16)
    plain.weight.data.copy_(layer.weight.data)
    out = {
        "fp32 oneDNN": (layer, torch.float32, 4 * n),
        "bf16 F.linear": (plain, torch.bfloat16, 2 * n),
    }
    if Q.packing_available():
        out["bf16 packed"] = (Q.PackedLinear(layer), torch.bfloat16, 2 * n)
    out["int8 weight-only"] = (Q.Int8Linear.from_linear(layer), torch.bfloat16, n)
    if Q.dynamic_available():
        dynamic = Q.Int8DynamicLinear.from_linear(layer)
        dynamic.bias = None
        out["int8-dynamic"] = (dynamic, torch.float32, n)
    return out


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"threads {args.threads}, best of {args.calls} calls, load average {load:.2f} at the start")
    rows, names = [], None
    for m, k, n in PRODUCTS:
        layer = nn.Linear(k, n, bias=False)
        layer.weight.data.normal_(0, 0.02)
        x = torch.randn(m, k)
        ref = x.double() @ layer.weight.double().T
        cells = {}
        for name, (module, dtype, nbytes) in kernels(layer).items():
            xin = x.to(dtype)
            with onednn_linear(dtype == torch.float32 and isinstance(module, nn.Linear)):
                ms = 1000 * best_seconds(lambda module=module, xin=xin: module(xin), args.calls)
                y = module(xin).double()
            rel = float((y - ref).norm() / ref.norm())
            cells[name] = f"{ms:.2f} ms ({nbytes / ms / 1e6:.0f} GB/s, err {rel:.4f})"
        names = names or list(cells)
        rows.append(f"| {m} × {k} → {n} | " + " | ".join(cells[c] for c in names) + " |")
    print("| product (rows × in → out) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    print("\n".join(rows))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
