"""Training step speed: one row per sample against samples behind a shared image prefix, same batches.

    python benchmarks/train_step.py                 # the default recipe's batches (32 scenes x 4 samples)
    python benchmarks/train_step.py --steps 4 --threads 1
    python benchmarks/train_step.py --checkpoint runs/default/checkpoint.pt   # trained weights

Each mode runs forward + backward (bf16 autocast, as the recipe trains) on the same seeded model and the
same `--steps` batches, after one warm-up batch; the modes alternate per batch so that a machine that slows
down hits all of them alike. Modes:

- `rows`: every sample in a row of its own, its image prefix included (`share_prefix=False`, SPEC §3's
  layout): the reference the shared path must equal (tests/test_train_synthetic.py checks loss and gradients);
- `shared`: `share_prefix=True` as shipped: each scene's prefix runs once (`recipes/shared_prefix.py`),
  attention by PyTorch's plain-matmul kernel on CPU (the kernel the default model was trained with);
- `shared-fused`: the same with PyTorch's fused attention kernel, in the decoder and in the vision
  encoder and connector (which train with the plain kernel on CPU: its backward is ~3x faster there);
- `shared-16rows`: the same with the rows cut into chunks of 16 (the fixed cut before `chunk_bounds`);
- `shared-prefix-kept`: the same with the prefix run through the last decoder block too (its queries,
  attention output and MLP, which the loss does not read: `forward_shared(prefix_out=True)`).

In the decoder the two kernels were within the noise of each other on the development machine, on fresh
weights and on the default recipe's trained weights (`--checkpoint`, a `kosmos2 train` checkpoint of the same
recipe; docs/DEFAULT_MODEL.md has the numbers); the plain one stays because the default model is trained
with it: other rounding makes another model.

Prints seconds a step, samples a second and the ratio to `rows`, and the loss of each mode on the first
batch in eval mode (they must agree).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="default", help="kosmos2.train.recipes.synthetic recipe to time")
    parser.add_argument("--steps", type=int, default=8, help="timed batches per mode (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--checkpoint", help="time with these weights (a checkpoint.pt of the recipe)")
    args = parser.parse_args(argv)

    import torch

    import kosmos2.model as km
    from kosmos2.train.loop import load_checkpoint
    from kosmos2.train.recipes import shared_prefix
    from kosmos2.train.recipes import slots as SL
    from kosmos2.train.recipes import synthetic as T
    from kosmos2.train.recipes import synthetic_batches as B

    torch.set_num_threads(args.threads)
    recipe = T.get_recipe(args.recipe, share_prefix=True, tokenizer_corpus_lines=2000)
    rows_recipe = dataclasses.replace(recipe, share_prefix=False)
    if args.checkpoint:  # the run's own tokenizer, beside its checkpoint
        from kosmos2.tokenizer import Kosmos2Tokenizer

        tokenizer = Kosmos2Tokenizer.from_pretrained(Path(args.checkpoint).parent / T.TOKENIZER_DIR)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = T.build_tokenizer(recipe, tmp)
    model = T.build_model(recipe, tokenizer)
    head = SL.build_slot_head(model.config.text.width) if recipe.slot_loss_weight > 0 else None
    if args.checkpoint:
        state = load_checkpoint(Path(args.checkpoint))
        model.load_state_dict(state["model"])
        if head is not None:
            head.load_state_dict(state["heads"])
    config = model.config
    grid = SL.patch_grid(config) if head is not None else None

    def batches(r):
        size, slots = config.vision.image_size, config.latent_query_num
        return [B.make_batch(r, s, tokenizer, size, slots, grid) for s in range(args.steps + 1)]

    data = {"rows": batches(rows_recipe), "shared": batches(recipe)}
    data["shared-fused"] = data["shared-prefix-kept"] = data["shared"]
    saved_bounds = B.chunk_bounds
    B.chunk_bounds = lambda n, cost=0: [(i, min(i + 16, len(n))) for i in range(0, len(n), 16)]
    data["shared-16rows"] = batches(recipe)
    B.chunk_bounds = saved_bounds

    @contextlib.contextmanager
    def fused():
        saved = km.sdpa_kernel
        km.sdpa_kernel = shared_prefix.sdpa_kernel = lambda *a, **k: contextlib.nullcontext()
        try:
            yield
        finally:
            km.sdpa_kernel = shared_prefix.sdpa_kernel = saved

    @contextlib.contextmanager
    def prefix_kept():
        whole = T.forward_shared
        T.forward_shared = lambda *a, prefix_out=True, **k: whole(*a, prefix_out=True, **k)
        try:
            yield
        finally:
            T.forward_shared = whole

    def patched(mode: str):
        # the model picks the plain kernel on CPU itself; for "shared-fused" undo that choice
        return {"shared-fused": fused, "shared-prefix-kept": prefix_kept}.get(mode, contextlib.nullcontext)()

    def step(mode: str, i: int) -> float:
        with patched(mode):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
                losses = T.compute_losses(model, data[mode][i], head, recipe.slot_loss_weight)
            losses["loss"].backward()
            seconds = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return seconds

    modes = list(data)
    model.eval()
    check = {}
    for m in modes:
        with torch.no_grad(), patched(m):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
                check[m] = float(T.compute_losses(model, data[m][0], head)["lm"])
    model.train()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for m in modes:
        step(m, 0)  # warm-up
    for i in range(1, args.steps + 1):
        for m in modes:
            times[m].append(step(m, i))
    samples = statistics.mean(len(b.tasks) for b in data["rows"][1:])
    base = statistics.median(times["rows"])
    shared = statistics.median(times["shared"])
    print(f"recipe {args.recipe!r}, {samples:.0f} samples a step, {args.threads} threads, {args.steps} steps")
    print(f"{'mode':<20}{'s/step':>8}{'samples/s':>11}{'vs rows':>9}{'shared vs':>11}{'eval loss':>11}")
    for m in modes:
        t = statistics.median(times[m])
        print(f"{m:<20}{t:>8.3f}{samples / t:>11.1f}{base / t:>8.2f}x{t / shared:>10.2f}x{check[m]:>11.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
