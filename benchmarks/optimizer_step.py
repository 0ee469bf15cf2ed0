"""Optimizer step cost: AdamW on everything, torch.optim.Muon + AdamW, and the recipe's Muon + AdamW.

    python benchmarks/optimizer_step.py                   # the default recipe's model, 2 threads
    python benchmarks/optimizer_step.py --steps 20 --threads 1

Both optimizers are built by `kosmos2.train.optim.make_optimizer` over the same fresh model of the
recipe, with the same random gradients; the two alternate step by step after one warm-up step each, so a
machine that slows down hits both alike. Muon's extra cost is its Newton–Schulz orthogonalisation (five
iterations of three small matrix products per weight matrix, in bfloat16). The recipe's Muon is
kosmos2.muon.StackedMuon, which runs those products batched per matrix shape; torch.optim.Muon on the same
matrices is its reference: the script checks that both end with the same weights, bit for bit. Prints the
median seconds a step of each and the ratios; compare with a whole training step (~1.0-1.2 s for the
default recipe's 32 x 4 batch on the 2-core development CPU, docs/DEFAULT_MODEL.md).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--recipe", default="default", help="kosmos2.train.recipes.synthetic recipe whose model to use"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per optimizer (default 10)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)

    import torch

    from kosmos2.train import optim as O
    from kosmos2.train.recipes import synthetic as T

    torch.set_num_threads(args.threads)
    muon_recipe = T.get_recipe(args.recipe, optimizer="muon", tokenizer_corpus_lines=2000)
    adamw_recipe = dataclasses.replace(muon_recipe, optimizer="adamw")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = T.build_tokenizer(muon_recipe, tmp)
    models = {"adamw": T.build_model(adamw_recipe, tokenizer)}
    models["torch-muon"] = copy.deepcopy(models["adamw"])
    models["muon"] = copy.deepcopy(models["adamw"])
    optimizers = {
        "adamw": O.make_optimizer(models["adamw"], adamw_recipe),
        "torch-muon": O.make_optimizer(models["torch-muon"], muon_recipe),
        "muon": O.make_optimizer(models["muon"], muon_recipe),
    }
    stacked = optimizers["torch-muon"].optimizers[1]  # the same matrices and options on torch.optim.Muon
    optimizers["torch-muon"].optimizers[1] = torch.optim.Muon(stacked.param_groups, **stacked.defaults)
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=generator) * 1e-3 for p in models["adamw"].parameters()]
    for model in models.values():
        for p, grad in zip(model.parameters(), grads, strict=True):
            p.grad = grad.clone()
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(args.steps + 1):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            if step:  # the first step of each is warm-up (state allocation)
                times[name].append(time.perf_counter() - start)
    n_muon = sum(len(g["params"]) for g in optimizers["muon"].optimizers[1].param_groups)
    size = sum(p.numel() for p in models["adamw"].parameters()) / 1e6
    print(
        f"recipe {args.recipe}: {size:.2f} M parameters, {n_muon} matrices on Muon; {args.threads} threads,"
        f" median of {args.steps} steps"
    )
    adamw, reference, muon = (statistics.median(times[name]) for name in ("adamw", "torch-muon", "muon"))
    same = all(
        torch.equal(a, b)
        for a, b in zip(models["torch-muon"].parameters(), models["muon"].parameters(), strict=True)
    )
    print(f"adamw                       {adamw * 1e3:8.1f} ms a step")
    print(f"torch.optim.Muon + adamw    {reference * 1e3:8.1f} ms a step   {reference / adamw:.2f}x adamw")
    print(
        f"StackedMuon + adamw         {muon * 1e3:8.1f} ms a step   {muon / adamw:.2f}x adamw,"
        f" {reference / muon:.2f}x faster than torch.optim.Muon; same weights bit for bit: {same}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
