"""Peak memory and seconds per step of fine-tuning the full-size architecture (kosmos-2-patch14-224, random
weights) on the CPU: full fine-tuning, LoRA, and LoRA with gradient checkpointing.

    python benchmarks/finetune_memory.py [--steps 2] [--batch 1] [--text 32] [--threads 2] [--settings ...]
                                         [--dtype float32|bfloat16]

Each setting runs in its own process (peak RSS is per process: ru_maxrss), builds the model in `--dtype`
(bfloat16: the frozen base weights in bf16 under bf16 autocast, the trained LoRA matrices float32, as peft
keeps them),
takes `--steps` AdamW steps on a batch of `--batch` rows (`<s><image>` + 64 slots + `</image>` + `--text`
tokens, loss on the text), and reports the peak RSS and the mean seconds of the steps after the first.

Full fine-tuning in float32 with AdamW needs weights + gradients + two moments = 16 bytes per parameter,
about 26.6 GB for 1.66 B parameters: more than this 24 GiB machine. The script checks that estimate
against MemAvailable and skips a setting that cannot fit (saying so), and also offers "full-frozen-vision"
(decoder and connector trained, 1.36 B parameters, ~21.8 GB + activations) which is what the released
training code trains (SPEC §10), and which may or may not fit depending on the machine's other load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PRESET = "kosmos-2-patch14-224"
SETTINGS = ("full", "full-frozen-vision", "lora", "lora+checkpointing")


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_setting(
    setting: str,
    steps: int,
    batch: int,
    text: int,
    threads: int,
    dtype: str = "float32",
    preset: str = PRESET,
) -> dict:
    import torch

    from kosmos2.config import Kosmos2Config
    from kosmos2.model import Kosmos2
    from kosmos2.train.loop import freeze, set_gradient_checkpointing
    from kosmos2.train.lora import add_lora

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    config = Kosmos2Config.from_preset(preset)
    model = Kosmos2(config).to(getattr(torch, dtype))
    total = sum(p.numel() for p in model.parameters())
    if setting.startswith("lora"):
        peft_model = add_lora(model, rank=16, alpha=32, parts=("text", "connector"))
        model = peft_model.base_model.model
        if setting == "lora+checkpointing":
            set_gradient_checkpointing(model, True)
    elif setting == "full-frozen-vision":
        freeze(model, ["vision_model"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    model.train()
    Q, V = config.latent_query_num, config.text.vocab_size
    ids = torch.cat(
        [
            torch.tensor([[0, 64003, *range(4, 4 + Q), 64004]]),
            torch.randint(4, 64000, (1, text)),
            torch.tensor([[2]]),
        ],
        dim=1,
    ).repeat(batch, 1)
    image_mask = torch.zeros_like(ids, dtype=torch.bool)
    image_mask[:, 2 : 2 + Q] = True
    targets = torch.full_like(ids, -100)
    targets[:, 2 + Q : -1] = ids[:, 3 + Q :]
    size = config.vision.image_size
    pixels = torch.randn(batch, 3, size, size)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            _, loss = model(ids, pixel_values=pixels, image_mask=image_mask, targets=targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    assert V > 0
    return {
        "setting": setting,
        "dtype": dtype,
        "parameters": total,
        "trainable": n_train,
        "batch": batch,
        "tokens_per_row": ids.shape[1],
        "seconds_per_step": sum(times[1:]) / max(len(times) - 1, 1) if len(times) > 1 else times[0],
        "first_step_seconds": times[0],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def estimate_bytes(setting: str, dtype: str = "float32") -> int:
    """A lower bound from the parameter count: each weight in `dtype`, + 12 B per trained one (its float32
    gradient and two AdamW moments; LoRA's few million are left out)."""
    total, vision = 1_664_485_376, 303_179_776
    trained = {"full": total, "full-frozen-vision": total - vision}.get(setting, 0)
    return (2 if dtype == "bfloat16" else 4) * total + 12 * trained


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--preset", default=PRESET, help="a config preset (tiny: check the script quickly)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(
            json.dumps(
                run_setting(
                    args.child, args.steps, args.batch, args.text, args.threads, args.dtype, args.preset
                )
            )
        )
        return 0
    with open("/proc/loadavg") as f:
        print(f"load average {f.read().split()[:3]}, MemAvailable {available_bytes() / 2**30:.1f} GiB")
    for setting in args.settings:
        need = estimate_bytes(setting, args.dtype)
        if need > available_bytes() and args.preset == PRESET:
            print(
                f"{setting:>20}: skipped, needs at least {need / 2**30:.1f} GiB (weights, gradients, AdamW "
                f"moments), {available_bytes() / 2**30:.1f} GiB available"
            )
            continue
        cmd = [sys.executable, __file__, "--child", setting, "--steps", str(args.steps)]
        cmd += ["--batch", str(args.batch), "--text", str(args.text), "--threads", str(args.threads)]
        cmd += ["--dtype", args.dtype, "--preset", args.preset]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["(no message)"]
            print(f"{setting:>20}: failed (exit {done.returncode}): {tail[0]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{setting:>20}: peak RSS {r['peak_rss_gib']:.1f} GiB, {r['seconds_per_step']:.1f} s/step "
            f"(first {r['first_step_seconds']:.1f} s), trainable {r['trainable'] / 1e6:.2f} M of "
            f"{r['parameters'] / 1e9:.2f} B, batch {r['batch']} x {r['tokens_per_row']} tokens, {r['dtype']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
