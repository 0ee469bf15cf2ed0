"""Builders for the small Kosmos-2 tokenizers the tests use, written independently of `kosmos2.tokenizer`.

A real Kosmos-2 checkpoint carries `sentencepiece.bpe.model` (a SentencePiece BPE model) and a
`tokenizer.json` that transformers 4.x converted from it. These helpers make a small copy of that layout:

- `train_sentencepiece` trains a SentencePiece model on `corpus()` (English captions plus non-ASCII text)
  with the `sentencepiece` library itself;
- `tokenizer_from_sentencepiece` builds the `tokenizers` BPE from the model's vocabulary and merges the way
  transformers 4.x's `SpmConverter` / `XLMRobertaConverter` did: fairseq ids (`<s>`=0, `<pad>`=1, `</s>`=2,
  `<unk>`=3, piece k -> k+1, `<mask>` last), the SentencePiece normaliser (precompiled charsmap, right strip,
  runs of spaces collapsed), Metaspace pre-tokenisation, then the Kosmos-2 tags and 1024 location tokens added
  the way `Kosmos2Processor.__init__` adds them (lstrip, not normalised);
- `write_checkpoint_tokenizer` writes the checkpoint-style directory (both files plus the HF config files).

The model proto is read with `sentencepiece_model_pb2` (protobuf), not with the package's own reader, so the
package's SentencePiece conversion is checked against an independent construction.
"""

from __future__ import annotations

import io
import itertools
import json
import os
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

FAIRSEQ_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
KOSMOS2_TAGS = [
    "</doc>",
    "<image>",
    "</image>",
    "</chunk>",
    "</line>",
    "<phrase>",
    "</phrase>",
    "<object>",
    "</object>",
    "</delimiter_of_multi_objects/>",
    "<grounding>",
]
PATCH_TOKENS = [f"<patch_index_{i:04d}>" for i in range(1024)]

_COLOURS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange", "purple", "grey"]
_THINGS = [
    "dog", "cat", "horse", "bicycle", "car", "snowman", "table", "umbrella", "giraffe", "elephant", "boat",
    "kite", "bench", "clock", "pizza", "train", "sheep", "zebra", "laptop", "banana",
]  # fmt: skip
_PLACES = [
    "on the beach", "in a kitchen", "next to a tree", "under the bridge", "near the window", "in the snow",
    "on a street", "in the park", "beside a river", "at the station",
]  # fmt: skip
NON_ASCII = [
    "Un chien brun joue dans la neige près d'un bonhomme de neige.",
    "Ein Mädchen fährt Fahrrad über die Brücke; Größe und Übermut!",
    "Una niña come una manzana en la cocina, ¿verdad? ¡Sí!",
    "Собака бежит по пляжу рядом с морем.",
    "Ένας σκύλος τρέχει στην παραλία.",
    "一只狗在海滩上奔跑。",
    "雪だるまが火のそばで暖まっている。",
    "고양이가 창문 옆에 앉아 있다.",
    "Café, naïve, façade, crème brûlée, São Paulo, Zürich.",
    "Ｆｕｌｌｗｉｄｔｈ letters and ① circled digits and ﬁ ligatures.",
    "Prices: 5€, 10£, 3¥ — “quoted” and ‘single’ … done.",
]


def corpus() -> list[str]:
    """Training text for the test SentencePiece models: ~2,000 English captions and some non-ASCII lines."""
    lines = [
        f"A {colour} {thing} {place}."
        for colour, thing, place in itertools.product(_COLOURS, _THINGS, _PLACES)
        if (len(colour) + len(thing) + len(place)) % 3 == 0
    ]
    lines += [f"An image of two {thing}s and a {colour} {other}." for thing, colour, other in
              zip(_THINGS, itertools.cycle(_COLOURS), reversed(_THINGS))]  # fmt: skip
    lines += ["Describe this image in detail:", "Question: what is the man holding? Answer: an umbrella"]
    lines += NON_ASCII * 3
    return lines


def train_sentencepiece(
    path: Path, model_type: str = "bpe", vocab_size: int = 700, byte_fallback: bool = False
) -> Path:
    """Train a SentencePiece model on `corpus()` with the library defaults (nmt_nfkc, unk/bos/eos 0/1/2)."""
    buffer = io.BytesIO()
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus()),
            model_writer=buffer,
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=1.0,
            hard_vocab_limit=False,
            byte_fallback=byte_fallback,
            num_threads=1,
            logstream=quiet,
        )
    path.write_bytes(buffer.getvalue())
    return path


def sentencepiece_fairseq_ids(model_path: Path, text: str) -> list[int]:
    """What the SentencePiece library itself gives for `text`, in fairseq ids (piece k -> k+1, unk -> 3)."""
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    return [3 if i == sp.unk_id() else i + 1 for i in sp.encode(text)]


def tokenizer_from_sentencepiece(model_path: Path, with_kosmos2_tokens: bool = True) -> Tokenizer:
    """The `tokenizers` BPE that transformers 4.x's XLM-R converter built from a SentencePiece BPE model."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    assert proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    pieces = [p.piece for p in proto.pieces]
    assert [proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id] == [0, 1, 2]

    # Fairseq dictionary: the four specials, then SentencePiece ids 3.. shifted by one, then <mask>.
    vocab = {token: i for i, token in enumerate(FAIRSEQ_SPECIALS)}
    vocab.update({piece: k + 1 for k, piece in enumerate(pieces) if k >= 3})
    vocab["<mask>"] = len(pieces) + 1

    # Merges: every split of a piece into two pieces, in the order SentencePiece learned the pieces (its ids).
    sp_ids = {piece: k for k, piece in enumerate(pieces) if k >= 3}
    merges = []
    for piece in sorted(sp_ids, key=sp_ids.get):
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))]
        splits = [(a, b) for a, b in splits if a in sp_ids and b in sp_ids]
        merges += sorted(splits, key=lambda ab: (sp_ids[ab[0]], sp_ids[ab[1]]))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
            normalizers.Strip(left=False, right=True),
            normalizers.Replace(Regex(" {2,}"), "▁"),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in FAIRSEQ_SPECIALS])
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, normalized=False, special=True)])
    if with_kosmos2_tokens:
        tok.add_tokens(
            [AddedToken(t, lstrip=True, rstrip=False, normalized=False) for t in KOSMOS2_TAGS + PATCH_TOKENS]
        )
    return tok


def write_checkpoint_tokenizer(directory: Path, with_kosmos2_tokens: bool = True) -> Path:
    """A checkpoint-style tokenizer directory: SentencePiece model, tokenizer.json and the HF config files."""
    directory.mkdir(parents=True, exist_ok=True)
    model_path = train_sentencepiece(directory / "sentencepiece.bpe.model")
    tokenizer_from_sentencepiece(model_path, with_kosmos2_tokens).save(str(directory / "tokenizer.json"))
    specials = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "cls_token": "<s>",
        "sep_token": "</s>",
        "mask_token": "<mask>",
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048, **specials}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return directory
