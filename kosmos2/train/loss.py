"""The next-token loss: cross-entropy where a row's targets say, with SPEC §3's mask.

A training row is `tokenizer.encode_for_training(prompt, target)`: ids, the image-slot mask and the loss
mask (SPEC §3: the tokens after the image that are learned; with learn_prompt=False the target and `</s>`
only). `next_token_targets` turns the loss mask into shifted targets (position t predicts ids[t + 1] where
the loss covers it, -100 elsewhere), and `next_token_loss` computes the cross-entropy at those positions
only (the output head is applied there alone: most positions of a row are prompt or image).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100  # a position outside the loss


def next_token_targets(ids: Sequence[int], loss_mask: Sequence[bool]) -> list[int]:
    """targets[t] = ids[t + 1] where loss_mask[t + 1] (the token there is learned), else IGNORE; the last
    position predicts nothing."""
    return [n if learn else IGNORE for n, learn in zip(ids[1:], loss_mask[1:], strict=True)] + [IGNORE]


@dataclass
class TokenLoss:
    """Summed cross-entropy over the learned positions (`total`, `tokens` of them), and the same over the
    positions whose target is a location token (`location_total`, detached: a diagnostic; chance ln 1024)."""

    total: torch.Tensor
    tokens: int
    location_total: torch.Tensor
    location_tokens: int


def next_token_loss(
    lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, location_start: int | None = None
) -> TokenLoss:
    """Cross-entropy of `lm_head(hidden)` [R,T,C] against `targets` [R,T] (IGNORE outside the loss), in
    float32, summed; the output head runs only where the loss is. Location tokens are ids >=
    `location_start` (None: no location diagnostic)."""
    learned = targets != IGNORE
    picked = targets[learned]
    logits = lm_head(hidden[learned])
    ce = F.cross_entropy(logits.float(), picked, reduction="none")
    if location_start is None:
        zero = ce.new_zeros(())
        return TokenLoss(ce.sum(), int(picked.numel()), zero, 0)
    is_location = picked >= location_start
    return TokenLoss(ce.sum(), int(picked.numel()), ce[is_location].detach().sum(), int(is_location.sum()))


def causal_lm_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loss of a plain batch for the loop (`TrainTask.loss`): {"loss": mean cross-entropy over the
    learned tokens}. batch: input_ids, targets [B,T] (right padded), pixel_values [B_img,3,H,W] or none,
    image_mask [B,T]. Pair it with `weight=lambda b: int((b["targets"] != IGNORE).sum())`."""
    from kosmos2.model import make_positions

    ids = batch["input_ids"]
    pixels = batch.get("pixel_values")
    embeds = model.encode_image(pixels) if pixels is not None else None
    positions = make_positions(ids, model.config.text.pad_token_id)
    hidden = model.text_model.model(ids, positions, None, embeds, batch.get("image_mask"))
    part = next_token_loss(model.text_model.lm_head, hidden, batch["targets"])
    return {"loss": part.total / max(part.tokens, 1)}
