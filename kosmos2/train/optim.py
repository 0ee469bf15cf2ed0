"""Optimizers and the learning-rate schedule: AdamW, or AdamW and Muon (kosmos2/muon.py), stepped as one.

make_optimizer(model, config, heads) ─► Optimizers([AdamW(decay, no decay)[, StackedMuon(layer matrices)]])
every step: optimizers.set_lr(lr_factor(step, config)) ─► optimizers.step()
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from kosmos2.train.config import TrainConfig


class Optimizers:
    """The run's optimizers (AdamW, or AdamW and Muon over disjoint parameters), stepped as one.

    The LR schedule is set on every parameter group before each step: lr = peak (the group's
    "initial_lr") × `lr_factor(step)`, the floats `torch.optim.lr_scheduler.LambdaLR` would set.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def set_lr(self, factor: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self) -> list[dict[str, Any]]:
        return [optimizer.state_dict() for optimizer in self.optimizers]

    def load_state_dict(self, states: Sequence[dict[str, Any]]) -> None:
        if len(states) != len(self.optimizers):
            raise ValueError(
                f"the checkpoint holds {len(states)} optimizer states, this run has {len(self.optimizers)}"
            )
        for optimizer, state in zip(self.optimizers, states, strict=True):
            optimizer.load_state_dict(state)


def muon_parameter(name: str, parameter: torch.Tensor) -> bool:
    """Whether optimizer="muon" trains this model parameter with Muon: the 2-D weights of the transformer
    layers (ViT, decoder) and of the connector, not embeddings or latent queries."""
    inside = ".layers." in name or name.startswith("image_to_text_projection.")
    return parameter.dim() == 2 and inside and "latent_query" not in name


def make_optimizer(
    model: torch.nn.Module, config: TrainConfig, heads: torch.nn.Module | None = None
) -> Optimizers:
    """AdamW with weight decay on matrices (linear, embedding, latent queries), none on biases and norms;
    over the trainable (requires_grad) parameters of `model` and of `heads` (training-only read-outs, named
    "head.*"). With config.optimizer "muon", the layers' 2-D weights (`muon_parameter`) go to Muon instead:
    torch.optim.Muon's algorithm and floats, its orthogonalisation batched per matrix shape
    (kosmos2.muon.StackedMuon)."""
    import torch

    from kosmos2.muon import StackedMuon

    decay, no_decay, muon = [], [], []
    named = itertools.chain(model.named_parameters(), heads.named_parameters(prefix="head") if heads else ())
    for name, p in named:
        if not p.requires_grad:
            continue
        if config.optimizer == "muon" and muon_parameter(name, p):
            muon.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizers = [torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)]
    if muon:
        optimizers.append(
            StackedMuon(
                muon,
                lr=config.muon_lr,
                weight_decay=config.weight_decay,
                momentum=config.muon_momentum,
                adjust_lr_fn="match_rms_adamw",
            )
        )
    return Optimizers(optimizers)


def lr_factor(step: int, config: TrainConfig) -> float:
    """LR multiplier at `step`: linear warm-up from 1/warmup to 1, then cosine to `final_lr_fraction`."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    floor = config.final_lr_fraction
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
