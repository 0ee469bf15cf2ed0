"""A small task for the general training loop's tests (tests/test_train_loop.py, tests/test_train_ddp.py):
the tiny Kosmos-2 with a 512-token vocabulary, and a fixed set of rows (an image and random text after it)
served as `TrainTask.batches`. Run as a script (under torchrun) it trains the task into OUT:

    python -m torch.distributed.run --nproc-per-node 2 tests/_train_fixtures.py OUT [--grad-accum N]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from kosmos2.config import Kosmos2Config
from kosmos2.model import Kosmos2
from kosmos2.train.config import TrainConfig
from kosmos2.train.loop import TrainTask, fit
from kosmos2.train.loss import IGNORE, causal_lm_loss

VOCAB = 512
SLOTS = 64  # the tiny preset's image slots
GLOBAL_ROWS = 8  # rows a step


def tiny_config() -> Kosmos2Config:
    config = Kosmos2Config.from_preset("tiny")
    text = dataclasses.replace(config.text, vocab_size=VOCAB, dropout=0.0, attention_dropout=0.0)
    text = dataclasses.replace(text, activation_dropout=0.0)
    return dataclasses.replace(config, text=text)


def tiny_model(seed: int = 0) -> Kosmos2:
    torch.manual_seed(seed)
    return Kosmos2(tiny_config())


@dataclasses.dataclass
class Rows:
    """Step s's global batch: rows s * GLOBAL_ROWS .. + GLOBAL_ROWS of a fixed random set, each `<s> <image>
    slots </image>` then 3 to 12 random text tokens; part p of P holds the rows i with i % P == p, right
    padded, the loss on the text after `</image>`. A pure function of (step, part, parts)."""

    seed: int = 0

    def row(self, index: int) -> tuple[list[int], torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + index)
        n = int(torch.randint(3, 13, (1,), generator=g))
        text = torch.randint(10, VOCAB, (n,), generator=g).tolist()
        size = tiny_config().vision.image_size
        return [0, 5, *([4] * SLOTS), 6, *text, 2], torch.randn(3, size, size, generator=g)

    def __call__(self, step: int, part: int = 0, parts: int = 1) -> dict[str, torch.Tensor]:
        rows = [self.row(step * GLOBAL_ROWS + i) for i in range(part, GLOBAL_ROWS, parts)]
        T = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), T), 1)
        targets = torch.full((len(rows), T), IGNORE)
        image_mask = torch.zeros((len(rows), T), dtype=torch.bool)
        for r, (ids, _) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            targets[r, SLOTS + 2 : len(ids) - 1] = torch.tensor(ids[SLOTS + 3 :])  # after </image>
            image_mask[r, 2 : 2 + SLOTS] = True
        pixels = torch.stack([p for _, p in rows])
        return {"input_ids": input_ids, "targets": targets, "image_mask": image_mask, "pixel_values": pixels}


def loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["targets"] != IGNORE).sum())


def tiny_task(model: Kosmos2 | None = None, **kwargs) -> TrainTask:
    from kosmos2.checkpoint import save_pretrained

    fields = {
        "batches": Rows(),
        "loss": causal_lm_loss,
        "weight": loss_tokens,
        "describe": lambda b: {"rows": len(b["input_ids"]), "tokens": int((b["input_ids"] != 1).sum())},
        "export": lambda m, d: save_pretrained(m, d),
    }
    return TrainTask(model=model if model is not None else tiny_model(), **{**fields, **kwargs})


def tiny_train_config(**overrides) -> TrainConfig:
    fields = dict(steps=4, lr=3e-3, warmup_steps=1, checkpoint_every=2, log_every=1, export_dtype="float32")
    return TrainConfig(**{**fields, **overrides}).validate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--fsdp", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = tiny_train_config(grad_accum=args.grad_accum, steps=args.steps, fsdp=args.fsdp)
    fit(tiny_task(), config, args.out, stop_after=args.stop_after, progress=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
