"""The Kosmos-2 vocabulary: a SentencePiece BPE with fairseq ids, plus tag and location tokens (SPEC §2-§3).

Layout (the released model's numbers; a smaller base vocabulary shifts everything after it):

    <s> 0, <pad> 1, </s> 2, <unk> 3            fairseq specials
    SentencePiece piece k at k+1               4 … 64000 (the model's pieces 3 … 63999)
    <mask>                                     64001
    </doc> <image> </image> </chunk> </line>   64002 … 64006
    <phrase> </phrase> <object> </object>      64007 … 64010
    </delimiter_of_multi_objects/> <grounding> 64011, 64012
    <patch_index_0000> … <patch_index_1023>    64013 … 65036           (vocabulary 65037)

Tags and location tokens are ordinary added tokens: decoding keeps them, whitespace before one is swallowed
(lstrip), and the text after one starts a new SentencePiece word (Metaspace prepends "▁" to every segment).

Everything runs on the `tokenizers` library. `Kosmos2Tokenizer.from_pretrained` loads `tokenizer.json` as it
is (the file transformers ships, so ids equal transformers'). When a directory has only
`sentencepiece.bpe.model`, the model proto is read here (a small protobuf wire-format reader, no protobuf
dependency) and turned into the equivalent `tokenizers` model: for a BPE model, the merges are every split of
a piece into two pieces, ranked by the merged piece's score, the order in which SentencePiece's BPE applies
them. The ids equal the SentencePiece library's on ordinary text; on lone combining marks and control
characters the `tokenizers` normaliser differs from SentencePiece's, and the ids then equal transformers' own
conversion (the same `tokenizers` components) instead.

Prompts follow SPEC §3: `<s> <image> [64 slots: ids 4…67] </image> text` with the text stripped and no `</s>`;
the slot ids only hold places, the model overwrites their embeddings with the image embeddings.

`train_tokenizer` trains a small BPE of the same kind (Metaspace "▁" words, NFKC) on captions and adds the
same layout after it; `save_pretrained` writes the Hugging Face tokenizer files, loadable by transformers'
`AutoTokenizer` and usable in `Kosmos2Processor`.
"""

from __future__ import annotations

import json
import numbers
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from kosmos2.fileio import atomic_write, atomic_write_text
from kosmos2.grounding import GRID, TAG_TOKENS, patch_token

if TYPE_CHECKING:
    import torch

TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "sentencepiece.bpe.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
FAIRSEQ_SPECIALS = (BOS, PAD, EOS, UNK)  # ids 0, 1, 2, 3 in fairseq's dictionary
# The tag tokens, in the order that fixes their ids (Kosmos-2 appended them after <mask>), and the location
# tokens: both defined once, in the markup module.
NUM_PATCH_TOKENS = GRID * GRID  # a 32 x 32 grid, always (SPEC §4)
PATCH_TOKENS = tuple(patch_token(i) for i in range(NUM_PATCH_TOKENS))
MODEL_MAX_LENGTH = 2048  # the decoder's position table (text_config.max_position_embeddings)
IGNORE_INDEX = -100  # targets the loss skips (torch's cross_entropy default)


class Kosmos2Tokenizer:
    """Text <-> ids for Kosmos-2 over a `tokenizers.Tokenizer` that carries the Kosmos-2 layout.

    Build one with `from_pretrained(directory)` or `train_tokenizer(...)`. The constructor takes a
    `tokenizers.Tokenizer` that has the fairseq specials; tag and location tokens it lacks are appended, in
    the layout order, the way `Kosmos2Processor` adds them (lstrip, not normalised).
    """

    def __init__(self, tokenizer: Tokenizer, sentencepiece_model: bytes | None = None) -> None:
        missing = [t for t in FAIRSEQ_SPECIALS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(
                f"not a Kosmos-2 tokenizer: the special tokens {missing} are missing; a Kosmos-2 tokenizer "
                f"has {', '.join(FAIRSEQ_SPECIALS)} (fairseq ids 0-3)"
            )
        absent = [t for t in TAG_TOKENS + PATCH_TOKENS if tokenizer.token_to_id(t) is None]
        tokenizer.add_tokens([AddedToken(t, lstrip=True, rstrip=False, normalized=False) for t in absent])
        self.backend = tokenizer
        self.sentencepiece_model = sentencepiece_model  # the raw `sentencepiece.bpe.model`, copied on save

        ids = tokenizer.token_to_id
        self.bos_id, self.pad_id, self.eos_id, self.unk_id = (ids(t) for t in FAIRSEQ_SPECIALS)
        self.mask_id: int | None = ids(MASK)
        (
            self.doc_end_id,
            self.image_start_id,
            self.image_end_id,
            self.chunk_end_id,
            self.line_end_id,
            self.phrase_start_id,
            self.phrase_end_id,
            self.object_start_id,
            self.object_end_id,
            self.delimiter_id,
            self.grounding_id,
        ) = (ids(t) for t in TAG_TOKENS)
        # Location token i is patch_index_offset + i; code that maps ids to grid cells relies on it.
        self.patch_index_offset = ids(PATCH_TOKENS[0])
        scattered = [(i, t) for i, t in enumerate(PATCH_TOKENS) if ids(t) != self.patch_index_offset + i]
        if scattered:
            i, token = scattered[0]
            raise ValueError(
                f"the location tokens of this tokenizer do not have consecutive ids: {token} is "
                f"{ids(token)}, expected {self.patch_index_offset + i}; "
                "a Kosmos-2 tokenizer numbers <patch_index_0000> ... <patch_index_1023> consecutively"
            )
        self.num_patch_tokens = NUM_PATCH_TOKENS
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        # The processor's choice (unk + 1): the 64 image slots hold the ordinary ids 4, 5, ... (SPEC §3).
        self.first_image_slot_id = self.unk_id + 1

    # ---------------------------------------------------------------- loading and saving

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> Kosmos2Tokenizer:
        """Load from a directory holding `tokenizer.json` or, failing that, `sentencepiece.bpe.model`."""
        path = Path(directory)
        if not path.is_dir():
            what = "is a file, not a directory" if path.exists() else "does not exist"
            raise FileNotFoundError(
                f"tokenizer directory {str(path)!r} {what}; pass the directory that holds {TOKENIZER_FILE} "
                f"or {SENTENCEPIECE_FILE} (a Kosmos-2 checkpoint directory)"
            )
        json_path, sp_path = path / TOKENIZER_FILE, path / SENTENCEPIECE_FILE
        sp_model = sp_path.read_bytes() if sp_path.is_file() else None
        if json_path.is_file():
            try:
                backend = Tokenizer.from_file(str(json_path))
            except Exception as e:  # the Rust side raises a bare Exception for malformed files
                raise ValueError(f"{json_path} is not a readable tokenizers file: {e}") from e
        elif sp_model is not None:
            backend = tokenizer_from_sentencepiece(sp_model, source=str(sp_path))
        else:
            raise FileNotFoundError(
                f"no tokenizer in {str(path)!r}: looked for {TOKENIZER_FILE} and {SENTENCEPIECE_FILE}, found "
                f"neither; point to a Kosmos-2 checkpoint directory or build one with train_tokenizer()"
            )
        return cls(backend, sentencepiece_model=sp_model)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write the Hugging Face tokenizer files into `directory` (created if needed); return its path.

        `tokenizer_config.json` names `PreTrainedTokenizerFast` (the plain `tokenizer.json` loader in both
        transformers 4 and 5): transformers 5's `XLMRobertaTokenizer` would rebuild a BPE file as a Unigram
        model, which tokenises differently.
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / TOKENIZER_FILE, self.backend.to_str())
        if self.sentencepiece_model is not None:
            sp = self.sentencepiece_model
            atomic_write(path / SENTENCEPIECE_FILE, lambda f: f.write(sp))
        special_tokens = {
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": UNK,
            "sep_token": EOS,
            "pad_token": PAD,
            "cls_token": BOS,
        }
        if self.mask_id is not None:
            special_tokens["mask_token"] = MASK
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "processor_class": "Kosmos2Processor",
            "model_max_length": MODEL_MAX_LENGTH,
            "clean_up_tokenization_spaces": False,
            **special_tokens,
        }
        atomic_write_text(path / TOKENIZER_CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        atomic_write_text(path / SPECIAL_TOKENS_MAP_FILE, json.dumps(special_tokens, indent=2) + "\n")
        return path

    # ---------------------------------------------------------------- text <-> ids

    def encode(self, text: str) -> list[int]:
        """Ids of `text` alone: no `<s>`, no `</s>`, no stripping. Tags in the text become their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int] | Any, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, tuple or 1-D tensor/array). Tags and location tokens are kept;
        `skip_special_tokens` drops only `<s>`, `<pad>`, `</s>`, `<unk>` and `<mask>`."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # torch.Tensor, numpy.ndarray
        V = self.vocab_size
        bad = [i for i in ids if not isinstance(i, numbers.Integral) or isinstance(i, bool) or not 0 <= i < V]
        if bad:
            raise ValueError(
                f"decode(): {bad[:5]} {'is' if len(bad) == 1 else 'are'} not token ids of this tokenizer "
                f"(integers in 0..{self.vocab_size - 1}); pass one sequence of ids, not a batch"
            )
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self.backend.id_to_token(id)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Kosmos2Tokenizer(vocab_size={self.vocab_size}, image_start_id={self.image_start_id}, "
            f"patch_index_offset={self.patch_index_offset})"
        )

    # ---------------------------------------------------------------- prompts (SPEC §3)

    def encode_prompt(
        self, text: str, with_image: bool = True, num_image_tokens: int = 64
    ) -> tuple[list[int], list[bool]]:
        """`<s> <image> [slots] </image> text` (text stripped, no `</s>`) and the mask of the image slots.

        Without an image: `<s> text`. Equals `Kosmos2Processor(images=..., text=text)["input_ids"]` and its
        `image_embeds_position_mask`. One known difference: the processor tokenises `"</image> " + text`, so
        with an empty text and a tokenizer.json whose normaliser keeps trailing spaces (older conversions) it
        ends in a lone "▁"; here an empty text adds nothing, as in the original (fairseq) prompts.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode_prompt() takes a str, got {type(text).__name__}")
        ids, image_mask = self._prefix(with_image, num_image_tokens)
        text_ids = self.encode(text.strip())
        return ids + text_ids, image_mask + [False] * len(text_ids)

    def encode_for_training(
        self,
        prompt: str,
        target: str = "",
        with_image: bool = True,
        num_image_tokens: int = 64,
        learn_prompt: bool = True,
    ) -> tuple[list[int], list[bool], list[bool]]:
        """`<s> <image> [slots] </image> prompt target </s>` for training: (ids, image_mask, loss_mask).

        prompt and target are each stripped and encoded on their own, so the target starts a new word exactly
        as generated text does after the prompt at inference. `loss_mask[t]` marks the tokens the model learns
        to predict: every token after the last image slot (`</image>`, prompt, target, `</s>`; SPEC §3), or
        every token after `<s>` without an image. For pre-training-style data put the whole caption in
        `prompt`. `learn_prompt=False` leaves the prompt out of the loss: only the target and `</s>` are
        learned (instruction-tuning style).
        """
        ids, image_mask = self.encode_prompt(prompt, with_image, num_image_tokens)
        if not isinstance(target, str):
            raise TypeError(f"encode_for_training(): target must be a str, got {type(target).__name__}")
        prompt_length = len(ids)
        ids = ids + self.encode(target.strip()) + [self.eos_id]
        image_mask = image_mask + [False] * (len(ids) - len(image_mask))
        first_learned = (max(i for i, m in enumerate(image_mask) if m) if with_image else 0) + 1
        if not learn_prompt:
            first_learned = prompt_length
        loss_mask = [t >= first_learned for t in range(len(ids))]
        return ids, image_mask, loss_mask

    def batch_encode(
        self,
        texts: Sequence[str],
        with_image: bool = True,
        num_image_tokens: int = 64,
        add_eos: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Prompts of a batch, LEFT-padded with `pad_id`.

        Returns `input_ids` LongTensor[B, T], `attention_mask` LongTensor[B, T] (1 = token, 0 = padding) and
        `image_mask` BoolTensor[B, T] (the image slots). `add_eos` appends `</s>` to every row (training
        data).
        """
        rows, masks = [], []
        for text in _check_batch(texts, "batch_encode"):
            ids, image_mask = self.encode_prompt(text, with_image, num_image_tokens)
            if add_eos:
                ids, image_mask = ids + [self.eos_id], image_mask + [False]
            rows.append(ids)
            masks.append(image_mask)
        return self._left_pad(rows, masks)

    def batch_encode_for_training(
        self,
        examples: Sequence[tuple[str, str]],
        with_image: bool = True,
        num_image_tokens: int = 64,
    ) -> dict[str, torch.Tensor]:
        """`encode_for_training` over (prompt, target) pairs, LEFT-padded, with next-token targets.

        Returns `input_ids`, `attention_mask`, `image_mask` as `batch_encode` does, plus `targets`
        LongTensor[B, T]: `targets[b, t]` is the token to predict at position t (`input_ids[b, t + 1]` where
        the loss covers it, else -100), the convention of `Kosmos2.forward(targets=...)`.
        """
        if isinstance(examples, (str, bytes)) or not all(
            isinstance(e, (tuple, list)) and len(e) == 2 for e in examples
        ):
            raise TypeError("batch_encode_for_training() takes a sequence of (prompt, target) pairs of str")
        rows, image_masks, targets = [], [], []
        for prompt, target in _check_batch(examples, "batch_encode_for_training"):
            ids, image_mask, loss_mask = self.encode_for_training(
                prompt, target, with_image, num_image_tokens
            )
            rows.append(ids)
            image_masks.append(image_mask)
            targets.append(
                [i if learn else IGNORE_INDEX for i, learn in zip(ids[1:], loss_mask[1:], strict=True)]
                + [IGNORE_INDEX]
            )
        batch = self._left_pad(rows, image_masks)
        batch["targets"] = self._left_pad(targets, image_masks, pad_id=IGNORE_INDEX)["input_ids"]
        return batch

    def _prefix(self, with_image: bool, num_image_tokens: int) -> tuple[list[int], list[bool]]:
        """`<s>` or `<s> <image> [slots] </image>` and its image mask."""
        if not with_image:
            return [self.bos_id], [False]
        if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(
                f"num_image_tokens must be a positive int (64 for Kosmos-2), got {num_image_tokens!r}"
            )
        if self.first_image_slot_id + num_image_tokens > self.vocab_size:
            last = self.first_image_slot_id + num_image_tokens - 1
            raise ValueError(
                f"num_image_tokens={num_image_tokens} needs slot ids {self.first_image_slot_id}..{last}, "
                f"beyond this vocabulary ({self.vocab_size})"
            )
        slots = list(range(self.first_image_slot_id, self.first_image_slot_id + num_image_tokens))
        ids = [self.bos_id, self.image_start_id, *slots, self.image_end_id]
        return ids, [False, False, *([True] * num_image_tokens), False]

    def _left_pad(
        self, rows: list[list[int]], image_masks: list[list[bool]], pad_id: int | None = None
    ) -> dict[str, torch.Tensor]:
        import torch

        pad_id = self.pad_id if pad_id is None else pad_id
        T = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
        image_mask = torch.zeros((len(rows), T), dtype=torch.bool)
        for b, (row, mask) in enumerate(zip(rows, image_masks, strict=True)):
            start = T - len(row)  # left padding: the row ends at the last column
            input_ids[b, start:] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, start:] = 1
            image_mask[b, start:] = torch.tensor(mask, dtype=torch.bool)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "image_mask": image_mask}


def _check_batch(items: Sequence[Any], where: str) -> Sequence[Any]:
    if isinstance(items, (str, bytes)):
        raise TypeError(f"{where}() takes a list of texts; wrap a single text in a list")
    if len(items) == 0:
        raise ValueError(f"{where}() got an empty batch")
    return items


# ---------------------------------------------------------------- training a tokenizer


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, directory: str | os.PathLike[str]
) -> Kosmos2Tokenizer:
    """Train a SentencePiece-style BPE on `texts`, add the Kosmos-2 layout, save it in `directory`, return it.

    `vocab_size` counts the base vocabulary: the four fairseq specials plus the learned pieces (fewer when the
    texts cannot fill it). After it come `<mask>`, the 11 tags and the 1024 location tokens, so the final
    `vocab_size` is `vocab_size + 1036`. Text is NFKC-normalised, whitespace runs become one space, words
    start with "▁" (Metaspace), characters never seen in training become `<unk>`.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError("train_tokenizer() takes an iterable of texts, not a single string")
    texts = list(texts)
    not_str = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if not_str:
        raise TypeError(
            f"train_tokenizer(): texts[{not_str[0]}] is {type(texts[not_str[0]]).__name__}, not str"
        )
    if not any(t.strip() for t in texts):
        raise ValueError("train_tokenizer() needs at least one non-empty text")
    min_size = len(FAIRSEQ_SPECIALS) + 64  # room for the 64 image slot ids 4..67 among ordinary pieces
    if not isinstance(vocab_size, int) or vocab_size < min_size:
        raise ValueError(f"train_tokenizer(): vocab_size must be an int >= {min_size}, got {vocab_size!r}")

    backend = Tokenizer(models.BPE(unk_token=UNK, fuse_unk=True))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )
    _set_metaspace(backend, prepend=True)
    # The specials come first in the trained vocabulary, in this order: fairseq ids 0..3.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(FAIRSEQ_SPECIALS), show_progress=False
    )
    backend.train_from_iterator(texts, trainer=trainer)
    _add_specials_and_template(backend)
    tokenizer = Kosmos2Tokenizer(backend)
    if tokenizer.mask_id < min_size:
        raise ValueError(
            f"train_tokenizer(): the texts yield only {tokenizer.mask_id} base tokens, fewer than "
            f"{min_size}; train on more (or more varied) text"
        )
    tokenizer.save_pretrained(directory)
    return tokenizer


# ---------------------------------------------------------------- SentencePiece -> tokenizers


def tokenizer_from_sentencepiece(data: bytes, source: str = SENTENCEPIECE_FILE) -> Tokenizer:
    """The `tokenizers` equivalent of a SentencePiece model (bytes of the `.model` file) in fairseq ids.

    BPE and Unigram models are supported, with or without byte fallback. The Kosmos-2 tags are not added here
    (`Kosmos2Tokenizer` appends them).
    """
    sp = _read_sentencepiece(data, source)
    # Fairseq dictionary: specials 0..3, SentencePiece pieces 3.. at k+1, <mask> after them.
    vocab = [(t, 0.0) for t in FAIRSEQ_SPECIALS] + [(p.piece, p.score) for p in sp.pieces[3:]] + [(MASK, 0.0)]
    if len({t for t, _ in vocab}) != len(vocab):
        raise ValueError(
            f"{source}: a piece repeats a fairseq special token ({', '.join(FAIRSEQ_SPECIALS)}, {MASK})"
        )
    if sp.model_type == _BPE:
        ids = {t: i for i, (t, _) in enumerate(vocab)}
        model = models.BPE(
            vocab=ids, merges=_bpe_merges(sp), unk_token=UNK, fuse_unk=True, byte_fallback=sp.byte_fallback
        )
    else:
        model = models.Unigram(vocab, unk_id=FAIRSEQ_SPECIALS.index(UNK), byte_fallback=sp.byte_fallback)
    backend = Tokenizer(model)

    # SentencePiece's normaliser: the precompiled character map (nmt_nfkc by default), then whitespace.
    steps = [normalizers.Precompiled(sp.precompiled_charsmap)] if sp.precompiled_charsmap else []
    if sp.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if steps:
        backend.normalizer = normalizers.Sequence(steps)
    _set_metaspace(backend, prepend=sp.add_dummy_prefix, byte_fallback=sp.byte_fallback)
    _add_specials_and_template(backend)
    return backend


_UNIGRAM, _BPE = 1, 2  # TrainerSpec.ModelType
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type


@dataclass
class _Piece:
    piece: str
    score: float = 0.0
    type: int = _NORMAL


@dataclass
class _SentencePieceModel:
    """The parts of `sentencepiece_model.proto`'s ModelProto the conversion needs (proto2 defaults)."""

    pieces: list[_Piece]
    model_type: int = _UNIGRAM
    byte_fallback: bool = False
    split_by_whitespace: bool = True
    treat_whitespace_as_suffix: bool = False
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _read_sentencepiece(data: bytes, source: str) -> _SentencePieceModel:
    """Decode the protobuf ModelProto (field numbers from sentencepiece_model.proto) and check it fits."""
    try:
        sp = _SentencePieceModel(pieces=[])
        for number, value in _proto_fields(data):
            if number == 1:  # repeated SentencePiece pieces
                piece = _Piece("")
                for n, v in _proto_fields(value):
                    if n == 1:
                        piece.piece = v.decode("utf-8")
                    elif n == 2:
                        piece.score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        piece.type = v
                sp.pieces.append(piece)
            elif number == 2:  # TrainerSpec
                for n, v in _proto_fields(value):
                    if n == 3:
                        sp.model_type = v
                    elif n == 35:
                        sp.byte_fallback = bool(v)
                    elif n == 22:
                        sp.split_by_whitespace = bool(v)
                    elif n == 24:
                        sp.treat_whitespace_as_suffix = bool(v)
            elif number == 3:  # NormalizerSpec
                for n, v in _proto_fields(value):
                    if n == 2:
                        sp.precompiled_charsmap = bytes(v)
                    elif n == 3:
                        sp.add_dummy_prefix = bool(v)
                    elif n == 4:
                        sp.remove_extra_whitespaces = bool(v)
                    elif n == 5:
                        sp.escape_whitespaces = bool(v)
    except (ValueError, IndexError, struct.error, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{source} is not a SentencePiece model (could not decode its protobuf: {e})") from e

    problems = []
    if len(sp.pieces) < 4:
        problems.append(f"it has {len(sp.pieces)} pieces")
    if sp.model_type not in (_UNIGRAM, _BPE):
        problems.append(f"model type {sp.model_type} (only BPE and Unigram have a tokenizers equivalent)")
    if not (sp.split_by_whitespace and sp.escape_whitespaces) or sp.treat_whitespace_as_suffix:
        problems.append("non-default whitespace handling (split_by_whitespace / escape_whitespaces / suffix)")
    # The fairseq layout replaces SentencePiece ids 0-2 (unk, bos, eos) with <s> <pad> </s> <unk>.
    if any(p.type not in (_UNKNOWN, _CONTROL) for p in sp.pieces[:3]):
        problems.append("its first three pieces are not the unk/bos/eos symbols")
    odd = [p.piece for p in sp.pieces[3:] if p.type not in (_NORMAL, _UNUSED, _BYTE)]
    if odd:
        problems.append(f"control or user-defined pieces after the first three, e.g. {odd[:3]}")
    if problems:
        raise ValueError(
            f"{source}: cannot build a Kosmos-2 (fairseq-layout) tokenizer from this SentencePiece model: "
            + "; ".join(problems)
            + f". Provide a {TOKENIZER_FILE} instead."
        )
    return sp


def _proto_fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of each field of one protobuf message: an int for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            if value >= 1 << 63:  # negative int32/int64 (e.g. pad_id = -1) are 64-bit two's complement
                value -= 1 << 64
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        elif wire in (1, 5):  # fixed 64 / 32 bit
            n = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + n], pos + n
        else:
            raise ValueError(f"unsupported wire type {wire} for field {number}")
        if pos > len(buf):
            raise ValueError("truncated message")
        yield number, value


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _bpe_merges(sp: _SentencePieceModel) -> list[tuple[str, str]]:
    """BPE merges from a SentencePiece BPE vocabulary.

    SentencePiece's BPE repeatedly joins the adjacent pair whose union is the highest-scoring piece. So every
    split of a normal piece into two normal pieces is a merge, ranked by the union's score (higher first; ties
    by id), which is the rank order `tokenizers.models.BPE` applies.
    """
    normal = {p.piece: k for k, p in enumerate(sp.pieces) if p.type == _NORMAL and k >= 3}
    ranked = []
    for piece, k in normal.items():
        score = sp.pieces[k].score
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in normal and right in normal:
                ranked.append((-score, k, normal[left], normal[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _set_metaspace(backend: Tokenizer, prepend: bool, byte_fallback: bool = False) -> None:
    """Spaces become "▁" and start words; every text segment (also after an added token) starts with "▁"."""
    scheme = "always" if prepend else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=True)
    decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme, split=True)
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoder]) if byte_fallback else decoder


def _add_specials_and_template(backend: Tokenizer) -> None:
    """Mark the fairseq specials and `<mask>` as special tokens and give the tokenizer XLM-R's template.

    The template (`<s> $A </s>`) only matters to transformers callers (`add_special_tokens=True`); this module
    always encodes without it. `<mask>` gets the next id when the vocabulary lacks it.
    """
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in FAIRSEQ_SPECIALS])
    backend.add_special_tokens([AddedToken(MASK, lstrip=True, normalized=False, special=True)])
    bos, eos = backend.token_to_id(BOS), backend.token_to_id(EOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} {EOS} $B {EOS}",
        special_tokens=[(BOS, bos), (EOS, eos)],
    )
