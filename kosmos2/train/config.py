"""The training loop's settings: `TrainConfig`, a dataclass that a recipe extends with its own fields.

Everything that decides the numbers of a run is a field, so the same config gives the same weights; a run
folder keeps its config as JSON and a resumed run must match it. `--set FIELD=VALUE` overrides any field
(`parse_overrides`, `with_overrides`), checked against the field's type.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

OPTIMIZERS = ("adamw", "muon")

C = TypeVar("C", bound="TrainConfig")


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


@dataclass
class TrainConfig:
    """How the loop trains (kosmos2/train/loop.py); a recipe subclasses it with what its data and model need.

    Steps and batches: `steps` optimizer steps, each over one global batch (the recipe decides its size),
    split into `grad_accum` micro-batches per process (and across processes under torchrun).
    Optimizer: AdamW (betas, eps, weight decay on matrices only), or with `optimizer` "muon" Muon on the
    transformer layers' matrices at peak LR `muon_lr` and AdamW on the rest; LR linear warm-up over
    `warmup_steps` to `lr`, then cosine decay to `lr * final_lr_fraction`; gradients clipped to norm
    `grad_clip`. `ema_decay` > 0: an exponential moving average of the weights is kept and exported.
    """

    steps: int = 3000
    lr: float = 1e-3
    final_lr_fraction: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0
    # "adamw": AdamW on every parameter. "muon": torch.optim.Muon (momentum, then the update orthogonalised
    # by Newton-Schulz, its size matched to AdamW's: adjust_lr_fn="match_rms_adamw") on the 2-D weights of
    # the ViT, connector and decoder layers at peak LR `muon_lr`; AdamW on the rest (embeddings, latent
    # queries, the patch convolution, norms, biases, training-only heads). Same schedule for both
    optimizer: str = "adamw"
    muon_lr: float = 1e-3
    muon_momentum: float = 0.95
    bf16: bool = False  # autocast the loss's forward pass to bfloat16 (weights and optimizer stay float32)
    seed: int = 0
    # exponential moving average of the weights, exported instead of the last step's (0 = off): after each
    # step ema += (1 - d) * (weights - ema) with d = min(ema_decay, (1 + step) / (10 + step)); the checkpoint
    # keeps both, so a resumed run ends the same
    ema_decay: float = 0.0
    grad_accum: int = 1  # micro-batches per process per step (the global batch is split, not repeated)
    # parameters whose name starts with one of these are frozen (not trained, not in the optimizer), e.g.
    # ["vision_model", "image_to_text_projection"]
    freeze: tuple[str, ...] = ()
    gradient_checkpointing: bool = False  # recompute each transformer block in backward (less memory)
    # under torchrun: shard parameters, gradients and AdamW state over the processes (FSDP2 `fully_shard`,
    # one unit per transformer block) instead of replicating them (DDP), for a model too big for one GPU;
    # AdamW only, no moving average; checkpoints and exports hold the gathered, whole weights
    fsdp: bool = False
    checkpoint_every: int = 100
    log_every: int = 10
    eval_every: int = 0  # run the recipe's evaluation every N steps and at the end (0: never)
    best_metric: str = ""  # keep the model with the highest value of this evaluation metric in OUT/best
    export_dtype: str = "bfloat16"  # dtype of the exported model's weights

    def validate(self: C) -> C:
        for name in ("steps", "checkpoint_every", "log_every", "grad_accum"):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not self.lr > 0 or not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(
                f"lr must be > 0 and final_lr_fraction in [0, 1], got {self.lr}, {self.final_lr_fraction}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        if not self.muon_lr > 0 or not 0 <= self.muon_momentum < 1:
            raise ValueError(
                f"muon_lr must be > 0 and muon_momentum in [0, 1), got {self.muon_lr}, {self.muon_momentum}"
            )
        if self.warmup_steps < 0 or self.grad_clip <= 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps and weight_decay must be >= 0 and grad_clip > 0")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ValueError(f"eval_every must be an int >= 0 (0: no evaluation), got {self.eval_every!r}")
        if not all(isinstance(p, str) and p for p in self.freeze):
            raise ValueError(f"freeze must list parameter name prefixes, got {self.freeze!r}")
        if self.fsdp and (self.optimizer != "adamw" or self.ema_decay > 0):
            raise ValueError("fsdp trains with AdamW and no moving average; set optimizer=adamw, ema_decay=0")
        if self.export_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"export_dtype {self.export_dtype!r}: use float32, bfloat16 or float16")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for f in dataclasses.fields(self):
            if isinstance(d[f.name], tuple):
                d[f.name] = list(d[f.name])
        return d

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown fields {unknown}; known: {sorted(known)}")
        defaults = cls()
        return cls(**{k: _typed(k, v, getattr(defaults, k)) for k, v in d.items()}).validate()


def with_overrides(config: C, **overrides: Any) -> C:
    """`config` with some fields replaced (each checked against its field's type), validated."""
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown fields {unknown}; known: {sorted(known)}")
    typed = {name: _typed(name, value, getattr(config, name)) for name, value in overrides.items()}
    return dataclasses.replace(config, **typed).validate()


def _typed(name: str, value: Any, default: Any) -> Any:
    """`value` for field `name` as the type of its `default` (an int where a float goes becomes a float; a
    list where a tuple goes, a tuple), or a ValueError naming the field."""
    if default is None:  # an optional field: the config's validate() checks it
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is tuple and isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{name} must be {kind.__name__} (like {default!r}), got {value!r}")
    return value


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`--set FIELD=VALUE` items as overrides: VALUE parsed as JSON where it is JSON, else a string
    (`with_overrides` checks each against its field's type)."""
    overrides: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set {item!r}: write FIELD=VALUE, e.g. --set optimizer=muon")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        overrides[name.strip()] = value
    return overrides
