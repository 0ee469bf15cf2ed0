"""Peak memory of loading a checkpoint: peak RSS of a fresh process running `load_pretrained`, against the
bytes of the weights it ends up holding (the issue's bound: <= 1.3x).

    python benchmarks/load_memory.py                       # full-size kosmos-2-patch14-224, fp32 and bf16
    python benchmarks/load_memory.py --preset tiny         # smoke run

The checkpoint is written once (random weights, model.safetensors) into --workdir (default: a temp folder;
the full model takes 6.7 GB of disk). Each load runs in its own process so its peak RSS is its own; the
process's baseline RSS (python + torch imported, before loading) is reported too. Peak RSS is the
child's VmHWM (Linux).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, torch
from kosmos2.checkpoint import load_pretrained
def hwm():  # this process's peak RSS (VmHWM; ru_maxrss would carry the parent's peak across fork + exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
base = hwm()
dtype = getattr(torch, sys.argv[2])
model = load_pretrained(sys.argv[1], dtype=dtype)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
# read every weight once, so memory-mapped pages count as resident, as they will once the model runs
for p in model.parameters():
    p.sum()
peak = hwm()
print(json.dumps({"baseline_rss": base, "peak_rss": peak, "weight_bytes": weights}))
"""


def write_checkpoint(preset: str, directory: Path) -> None:
    import torch

    from kosmos2.checkpoint import save_pretrained
    from kosmos2.config import Kosmos2Config
    from kosmos2.model import Kosmos2

    if (directory / "model.safetensors").is_file():
        return
    torch.manual_seed(0)
    model = Kosmos2(Kosmos2Config.from_preset(preset))
    save_pretrained(model, directory)


def measure(directory: Path, dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(directory), dtype], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="kosmos-2-patch14-224")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.workdir or Path(tmp) / args.preset
        directory.mkdir(parents=True, exist_ok=True)
        write_checkpoint(args.preset, directory)
        print(f"| load ({args.preset}) | weights | peak RSS | peak - baseline | peak / weights |")
        print("|---|---|---|---|---|")
        for dtype in ("float32", "bfloat16"):
            m = measure(directory, dtype)
            w, peak, extra = m["weight_bytes"], m["peak_rss"], m["peak_rss"] - m["baseline_rss"]
            print(
                f"| {dtype} | {w / 1e9:.2f} GB | {peak / 1e9:.2f} GB | {extra / 1e9:.2f} GB "
                f"| {peak / w:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
