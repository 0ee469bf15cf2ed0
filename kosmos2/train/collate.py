"""Samples -> a training batch: token ids with the loss on the target only, images as pixel values.

    Sample(image, prompt, target) ──encode_for_training(learn_prompt=False)──►
        <s> <image> [slots] </image> prompt target </s>      loss on: target, </s>   (SPEC §3 layout)
    ──right padding──► input_ids [B, T], image_mask [B, T], targets [B, T] (shifted; -100 = no loss)
    image ──load_image (path or bytes)──► [centre crop] ──preprocess (model size)──► pixel_values [B, 3, S, S]

The batch is the dict `kosmos2.train.loss.causal_lm_loss` takes (the general loop's plain next-token loss).

Words the tokenizer cannot encode are found before training (`unknown_words`): the run stops with an error
naming them (we do not grow the vocabulary: a resized embedding row starts untrained, and the checkpoint's
tokenizer would no longer match its other copies). A sample that still yields `<unk>` at collation, an image
that cannot be decoded, or a sequence longer than the model's positions is dropped and reported, never
trained on.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

import torch

from kosmos2.data.sources import Report, Sample, words_of
from kosmos2.tokenizer import IGNORE_INDEX, Kosmos2Tokenizer
from kosmos2.train.loss import next_token_targets


class UnknownWordsError(ValueError):
    """Words of the data that the checkpoint's tokenizer maps to `<unk>`."""


def unknown_words(tokenizer: Kosmos2Tokenizer, samples: Iterable[Sample]) -> list[str]:
    """The words of the samples (markup removed) whose encoding contains `<unk>`, sorted."""
    unk = tokenizer.unk_id
    return sorted(w for w in words_of(samples) if unk in tokenizer.encode(w))


def check_vocabulary(tokenizer: Kosmos2Tokenizer, samples: Iterable[Sample], model_dir: str = "") -> None:
    """Raise UnknownWordsError naming every word the tokenizer cannot encode (before any training)."""
    bad = unknown_words(tokenizer, samples)
    if bad:
        shown = ", ".join(repr(w) for w in bad[:20]) + (f" and {len(bad) - 20} more" if len(bad) > 20 else "")
        missing = sorted({c for w in bad for c in w if tokenizer.unk_id in tokenizer.encode(c)})
        raise UnknownWordsError(
            f"the tokenizer of {model_dir or 'the model'} cannot encode {len(bad)} word(s) of the data: "
            f"{shown} (characters it lacks: {''.join(missing) or '?'}); rename those words in the data, or "
            "fine-tune a checkpoint whose vocabulary covers them (the official one covers all text)"
        )


def _image(sample: Sample):
    """The decoded RGB image of a sample (centre-cropped to a square when the sample asks)."""
    from kosmos2.image import load_image

    image = load_image(io.BytesIO(sample.image) if isinstance(sample.image, bytes) else sample.image)
    if sample.center_crop:
        from kosmos2.data.grit_reader import resize_and_crop

        image = resize_and_crop(image, min(image.size))
    return image


class Collator:
    """Turns a list of Samples into a batch for one model; drops (and reports) samples it cannot use."""

    def __init__(
        self,
        tokenizer: Kosmos2Tokenizer,
        image_size: int,
        num_image_tokens: int = 64,
        max_length: int = 512,
        report: Report | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.report = report if report is not None else Report()

    def encode(self, sample: Sample) -> tuple[list[int], list[bool], list[int]] | None:
        """(ids, image_mask, targets) of one sample, targets already shifted; None (reported) if unusable."""
        tok = self.tokenizer
        ids, image_mask, loss_mask = tok.encode_for_training(
            sample.prompt, sample.target, num_image_tokens=self.num_image_tokens, learn_prompt=False
        )
        if tok.unk_id in ids:
            self.report.bad(sample.where, sample.task, "encodes to <unk> (words the tokenizer lacks)")
            return None
        if len(ids) > self.max_length:
            self.report.bad(
                sample.where, sample.task, f"{len(ids)} tokens, over the model's {self.max_length}"
            )
            return None
        # loss on the target and </s> only (learn_prompt=False); targets[t] is the token after t
        return ids, image_mask, next_token_targets(ids, loss_mask)

    def __call__(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor] | None:
        """The batch of the usable samples: input_ids, image_mask, targets [B, T] (right padded) and
        pixel_values [B, 3, S, S]; None when none is usable."""
        from kosmos2.image import ImageError, preprocess

        rows, images = [], []
        for sample in samples:
            encoded = self.encode(sample)
            if encoded is None:
                continue
            try:
                image = _image(sample)
            except (ImageError, OSError, ValueError) as e:
                self.report.bad(sample.where, sample.task, f"image cannot be used ({e})")
                continue
            rows.append(encoded)
            images.append(image)
        if not rows:
            return None
        T = max(len(ids) for ids, _, _ in rows)
        B = len(rows)
        input_ids = torch.full((B, T), self.tokenizer.pad_id, dtype=torch.long)
        image_mask = torch.zeros((B, T), dtype=torch.bool)
        targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for b, (ids, mask, tgt) in enumerate(rows):  # right padding: causality hides the pads
            input_ids[b, : len(ids)] = torch.tensor(ids)
            image_mask[b, : len(ids)] = torch.tensor(mask)
            targets[b, : len(ids)] = torch.tensor(tgt)
        pixel_values = preprocess(images, size=self.image_size)
        return {
            "input_ids": input_ids,
            "image_mask": image_mask,
            "targets": targets,
            "pixel_values": pixel_values,
        }
