"""Tests for kosmos2.tokenizer.

References: the `sentencepiece` library itself (ids of the test SentencePiece models), transformers'
`Kosmos2Processor` with a tokenizer loaded from the same files (prompt ids, image masks, padded batches,
decoding), and the vocabulary layout of SPEC §2-§3 worked out from the SentencePiece piece count.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from _tokenizer_fixtures import (
    KOSMOS2_TAGS,
    NON_ASCII,
    PATCH_TOKENS,
    corpus,
    sentencepiece_fairseq_ids,
    train_sentencepiece,
    write_checkpoint_tokenizer,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer, models

from kosmos2.tokenizer import Kosmos2Tokenizer, train_tokenizer

PROMPTS = [
    # the task prompts of SPEC §1
    "<grounding>An image of",
    "<grounding>Describe this image in detail:",
    "<grounding><phrase>a red dog</phrase>",
    "<grounding>A man riding <phrase>a bicycle</phrase>",
    "<phrase> It</phrase><object><patch_index_0044><patch_index_0863></object> is",
    "<grounding> Question: what is the cat doing? Answer:",
    "An image of",
    "Describe this image in detail:",
    "Question: what colour is the car? Answer:",
    # grounded markup, several boxes, odd spacing around tags
    "<grounding>An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> "
    "warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>.",
    "<grounding>An image of<phrase> two dogs</phrase><object><patch_index_0001><patch_index_0100>"
    "</delimiter_of_multi_objects/><patch_index_0200><patch_index_1023></object> on the beach",
    "<object><patch_index_0000><patch_index_1023></object>",
    "<phrase>a kite</phrase><object><patch_index_0010><patch_index_0042></delimiter_of_multi_objects/>"
    "<patch_index_0300><patch_index_0400></delimiter_of_multi_objects/><patch_index_0500><patch_index_0600></object>",
    "a <phrase> dog </phrase> <object> <patch_index_0005> <patch_index_0010> </object> .",
    "a<phrase>dog</phrase><object><patch_index_0005><patch_index_0010></object>.",
    "</doc> </chunk> </line> <image> </image>",
    "text with </s> and <s> and <unk> and <pad> inside",
    "<mask> a masked word",
    # whitespace
    "  leading spaces",
    "trailing spaces   ",
    "  both ends  ",
    "in  between   spaces",
    "\tTab and\nnewline\r\n",
    "",
    "   ",
    # non-ASCII and characters the models never saw
    *NON_ASCII,
    "emoji 🐶 and ẞ and 漢",
    "<grounding>Un chien<phrase> près d'un bonhomme</phrase>"
    "<object><patch_index_0100><patch_index_0200></object>",
    "<phrase>一只狗</phrase><object><patch_index_0033><patch_index_0099></object>在海滩上",
    # captions from the training corpus
    *corpus()[::61],
]
EXTRA_TEXTS = [
    "  leading and trailing  ",
    "tab\there",
    "new\nline",
    "unseen 🐶🐱 chars ẞ",
    "a  b   c",
    "",
    " ",
    "x",
]
LOAD_PATHS = ["tokenizer.json", "sentencepiece"]


@pytest.fixture(scope="module")
def sentencepiece_only_dir(kosmos2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sentencepiece_only")
    shutil.copy(kosmos2_tokenizer_dir / "sentencepiece.bpe.model", directory)
    return directory


@pytest.fixture(scope="module")
def from_json(kosmos2_tokenizer_dir: Path) -> Kosmos2Tokenizer:
    return Kosmos2Tokenizer.from_pretrained(kosmos2_tokenizer_dir)


@pytest.fixture(scope="module")
def from_sp(sentencepiece_only_dir: Path) -> Kosmos2Tokenizer:
    return Kosmos2Tokenizer.from_pretrained(sentencepiece_only_dir)


@pytest.fixture(scope="module", params=LOAD_PATHS)
def tokenizer(request: pytest.FixtureRequest) -> Kosmos2Tokenizer:
    """Each test that takes `tokenizer` runs for both loading paths."""
    return request.getfixturevalue("from_json" if request.param == "tokenizer.json" else "from_sp")


@pytest.fixture(scope="module")
def processor(kosmos2_tokenizer_dir: Path):
    """transformers' Kosmos2Processor with the tokenizer transformers loads from the checkpoint directory."""
    transformers = pytest.importorskip("transformers")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(kosmos2_tokenizer_dir)
    return transformers.Kosmos2Processor(transformers.CLIPImageProcessorPil(), hf_tokenizer)


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    return Image.new("RGB", (32, 24), (120, 30, 200))


def _processor_ids(processor, image, text: str, with_image: bool) -> tuple[list[int], list[bool] | None]:
    if not with_image:
        return processor(text=text)["input_ids"], None
    out = processor(images=image, text=text)
    return out["input_ids"], [bool(m) for m in out["image_embeds_position_mask"]]


# ---------------------------------------------------------------- the test tokenizers themselves


def test_fixture_tokenizer_json_matches_sentencepiece(kosmos2_tokenizer_dir: Path) -> None:
    """The checkpoint-style tokenizer.json gives the SentencePiece model's own ids (fairseq numbering)."""
    model = kosmos2_tokenizer_dir / "sentencepiece.bpe.model"
    backend = Tokenizer.from_file(str(kosmos2_tokenizer_dir / "tokenizer.json"))
    assert spm.SentencePieceProcessor(model_file=str(model)).get_piece_size() == 700
    assert backend.get_vocab_size() == 1737  # what conftest's docstring promises
    for text in corpus() + EXTRA_TEXTS:
        assert backend.encode(text, add_special_tokens=False).ids == sentencepiece_fairseq_ids(model, text), (
            text
        )


# ---------------------------------------------------------------- layout and loading paths


def test_layout_follows_the_sentencepiece_vocabulary(
    tokenizer: Kosmos2Tokenizer, kosmos2_tokenizer_dir: Path
):
    sp = spm.SentencePieceProcessor(model_file=str(kosmos2_tokenizer_dir / "sentencepiece.bpe.model"))
    n = sp.get_piece_size()  # SentencePiece ids 0..n-1; 0-2 are unk, bos, eos
    assert (tokenizer.bos_id, tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    assert [tokenizer.id_to_token(k + 1) for k in range(3, n)] == [sp.id_to_piece(k) for k in range(3, n)]
    assert tokenizer.mask_id == n + 1
    assert [tokenizer.token_to_id(t) for t in KOSMOS2_TAGS] == list(range(n + 2, n + 13))
    assert (tokenizer.image_start_id, tokenizer.image_end_id) == (n + 3, n + 4)
    assert (tokenizer.phrase_start_id, tokenizer.phrase_end_id) == (n + 7, n + 8)
    assert (tokenizer.object_start_id, tokenizer.object_end_id) == (n + 9, n + 10)
    assert (tokenizer.delimiter_id, tokenizer.grounding_id) == (n + 11, n + 12)
    assert tokenizer.patch_index_offset == n + 13
    assert tokenizer.token_to_id("<patch_index_1023>") == n + 13 + 1023
    assert tokenizer.vocab_size == len(tokenizer) == n + 1037
    assert tokenizer.first_image_slot_id == 4


def test_load_paths_agree_with_sentencepiece(
    from_json: Kosmos2Tokenizer, from_sp: Kosmos2Tokenizer, sentencepiece_only_dir: Path
) -> None:
    model = sentencepiece_only_dir / "sentencepiece.bpe.model"
    for text in corpus() + EXTRA_TEXTS:
        expected = sentencepiece_fairseq_ids(model, text)
        assert from_sp.encode(text) == expected, text
        assert from_json.encode(text) == expected, text
    for text in PROMPTS:
        assert from_sp.encode(text) == from_json.encode(text), text


@pytest.mark.parametrize(
    "model_type, byte_fallback", [("bpe", True), ("unigram", False), ("unigram", True)], ids=str
)
def test_other_sentencepiece_models_match_the_library(
    tmp_path: Path, model_type: str, byte_fallback: bool
) -> None:
    """Unigram models and byte fallback convert too; ids equal the SentencePiece library's."""
    model = train_sentencepiece(tmp_path / "sentencepiece.bpe.model", model_type, 700, byte_fallback)
    tokenizer = Kosmos2Tokenizer.from_pretrained(tmp_path)
    for text in corpus()[::5] + EXTRA_TEXTS + NON_ASCII:
        assert tokenizer.encode(text) == sentencepiece_fairseq_ids(model, text), text
    if byte_fallback:  # unseen characters come back through their UTF-8 bytes
        assert tokenizer.decode(tokenizer.encode("dog 🐶 ẞ")) == "dog 🐶 ẞ"


_WORDS = sorted({w for line in corpus() for w in line.split()})
_PIECES = _WORDS + KOSMOS2_TAGS + ["<patch_index_0007>", " ", "  ", "\t", "🐶", "ẞ", "</s>", ".", "é"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=12).map("".join))
def test_load_paths_agree_on_random_markup(from_json: Kosmos2Tokenizer, from_sp: Kosmos2Tokenizer, text: str):
    assert from_sp.encode(text) == from_json.encode(text)
    assert from_sp.encode_prompt(text) == from_json.encode_prompt(text)


# Lone combining marks, control and format characters normalise differently in `tokenizers` (transformers'
# conversion differs from SentencePiece there too): left out.
_ORDINARY_CHARACTERS = st.characters(
    exclude_categories=("Mn", "Mc", "Me", "Cc", "Cf", "Cs", "Co", "Zl", "Zp")
)


@settings(max_examples=200, deadline=None)
@given(
    st.text(_ORDINARY_CHARACTERS, max_size=30) | st.lists(st.sampled_from(_PIECES), max_size=12).map("".join)
)
def test_sentencepiece_path_matches_the_library_on_any_text(
    from_sp: Kosmos2Tokenizer, sentencepiece_only_dir: Path, text: str
) -> None:
    if any(t in text for t in ("<s>", "</s>", "<pad>", "<unk>", "<mask>", *KOSMOS2_TAGS, *PATCH_TOKENS)):
        return  # the library has no added tokens
    expected = sentencepiece_fairseq_ids(sentencepiece_only_dir / "sentencepiece.bpe.model", text)
    assert from_sp.encode(text) == expected


# ---------------------------------------------------------------- tags, decoding


def test_tags_swallow_whitespace_before_and_start_a_word_after(tokenizer: Kosmos2Tokenizer) -> None:
    assert tokenizer.encode("a<phrase> dog") == tokenizer.encode("a <phrase> dog")
    assert tokenizer.encode("a   <phrase> dog") == tokenizer.encode("a<phrase> dog")
    ids = tokenizer.encode("<phrase>dog</phrase>")
    assert ids[0] == tokenizer.phrase_start_id and ids[-1] == tokenizer.phrase_end_id
    assert tokenizer.id_to_token(ids[1]).startswith("▁")  # text after a tag starts a new word
    assert ids[1:-1] == tokenizer.encode("dog")
    assert tokenizer.encode("<patch_index_0042>") == [tokenizer.patch_index_offset + 42]


def test_decode_keeps_markup(tokenizer: Kosmos2Tokenizer) -> None:
    text = (
        "<grounding>An image of <phrase>a dog</phrase><object><patch_index_0044><patch_index_0863></object>."
    )
    ids = tokenizer.encode_prompt(text, with_image=False)[0] + [tokenizer.eos_id]
    # Metaspace decoding: "▁" becomes a space, the tag swallowed the space before it in encoding.
    expected = "<grounding> An image of<phrase> a dog</phrase><object><patch_index_0044><patch_index_0863>"
    expected += "</object> ."
    assert tokenizer.decode(ids) == f"<s>{expected}</s>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == expected
    assert tokenizer.decode(torch.tensor(ids)) == f"<s>{expected}</s>"


@pytest.mark.parametrize("text", PROMPTS[:30] + corpus()[::50], ids=range(30 + len(corpus()[::50])))
def test_decode_round_trips(tokenizer: Kosmos2Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text.strip())
    if tokenizer.unk_id in ids:  # characters the model never saw decode to "<unk>": no way back
        assert "<unk>" in tokenizer.decode(ids)
        return
    assert tokenizer.encode(tokenizer.decode(ids)) == ids
    if "<" not in text and "🐶" not in text:  # plain text: back to its normalised self
        assert tokenizer.decode(ids) == " ".join(text.split())


# ---------------------------------------------------------------- prompts and batches (SPEC §3)


def test_prompt_layout(tokenizer: Kosmos2Tokenizer) -> None:
    ids, mask = tokenizer.encode_prompt("  <grounding>An image of  ")
    text_ids = tokenizer.encode("<grounding>An image of")
    assert ids == [0, tokenizer.image_start_id, *range(4, 68), tokenizer.image_end_id, *text_ids]
    assert mask == [False, False] + [True] * 64 + [False] * (1 + len(text_ids))
    assert tokenizer.encode_prompt("An image of", with_image=False) == (
        [0, *tokenizer.encode("An image of")],
        [False] * (1 + len(tokenizer.encode("An image of"))),
    )
    ids, mask = tokenizer.encode_prompt("", num_image_tokens=3)
    assert ids == [0, tokenizer.image_start_id, 4, 5, 6, tokenizer.image_end_id]
    assert mask == [False, False, True, True, True, False]


def test_batch_is_left_padded(tokenizer: Kosmos2Tokenizer) -> None:
    texts = ["An image of", "", "<grounding>A man riding <phrase>a bicycle</phrase>"]
    batch = tokenizer.batch_encode(texts, num_image_tokens=4, add_eos=True)
    rows = [tokenizer.encode_prompt(t, num_image_tokens=4) for t in texts]
    T = max(len(ids) for ids, _ in rows) + 1
    assert batch["input_ids"].shape == (3, T) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.long and batch["image_mask"].dtype == torch.bool
    for b, (ids, mask) in enumerate(rows):
        pad = T - len(ids) - 1
        assert batch["input_ids"][b].tolist() == [1] * pad + ids + [2]
        assert batch["attention_mask"][b].tolist() == [0] * pad + [1] * (len(ids) + 1)
        assert batch["image_mask"][b].tolist() == [False] * pad + mask + [False]


def test_training_sequences(tokenizer: Kosmos2Tokenizer) -> None:
    ids, image_mask, loss_mask = tokenizer.encode_for_training("<grounding>An image of", " a red dog ")
    prompt = tokenizer.encode("<grounding>An image of")
    target = tokenizer.encode("a red dog")
    assert ids == [0, tokenizer.image_start_id, *range(4, 68), tokenizer.image_end_id, *prompt, *target, 2]
    assert image_mask == [False, False] + [True] * 64 + [False] * (len(ids) - 66)
    # Loss on every token after the last image slot (index 65): </image>, text, </s>.
    assert loss_mask == [False] * 66 + [True] * (len(ids) - 66)
    # learn_prompt=False: only the target and </s> (the prompt's tokens end at 67 + len(prompt))
    _, _, target_only = tokenizer.encode_for_training(
        "<grounding>An image of", " a red dog ", learn_prompt=False
    )
    assert target_only == [False] * (67 + len(prompt)) + [True] * (len(target) + 1)
    ids, _, loss_mask = tokenizer.encode_for_training("a red dog", with_image=False)
    assert ids == [0, *target, 2] and loss_mask == [False] + [True] * (len(target) + 1)

    batch = tokenizer.batch_encode_for_training([("An image of", "a dog"), ("", "")], num_image_tokens=2)
    first = tokenizer.encode_for_training("An image of", "a dog", num_image_tokens=2)[0]
    second = [0, tokenizer.image_start_id, 4, 5, tokenizer.image_end_id, 2]
    T = len(first)
    assert batch["input_ids"].tolist() == [first, [1] * (T - 6) + second]
    # targets[t] = ids[t + 1] from the last slot (index 3) on, so the first learned token is </image>.
    assert batch["targets"].tolist() == [
        [-100] * 3 + first[4:] + [-100],
        [-100] * (T - 6 + 3) + [tokenizer.image_end_id, 2, -100],
    ]
    assert batch["image_mask"][0].tolist()[:6] == [False, False, True, True, False, False]
    assert batch["attention_mask"][1].tolist() == [0] * (T - 6) + [1] * 6


# ---------------------------------------------------------------- transformers as the reference


@pytest.mark.reference
@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text-only"])
def test_prompt_ids_equal_kosmos2_processor(tokenizer: Kosmos2Tokenizer, processor, image, with_image: bool):
    assert len(PROMPTS) >= 50
    for text in PROMPTS:
        ids, mask = tokenizer.encode_prompt(text, with_image=with_image)
        expected_ids, expected_mask = _processor_ids(processor, image, text, with_image)
        assert ids == expected_ids, text
        if with_image:
            assert mask == expected_mask, text


@pytest.mark.reference
def test_left_padded_batches_equal_kosmos2_processor(tokenizer: Kosmos2Tokenizer, processor, image) -> None:
    texts = PROMPTS[::6]
    processor.tokenizer.padding_side = "left"
    expected = processor(images=[image] * len(texts), text=texts, padding=True)
    batch = tokenizer.batch_encode(texts)
    assert batch["input_ids"].tolist() == expected["input_ids"]
    assert batch["attention_mask"].tolist() == expected["attention_mask"]
    assert batch["image_mask"].long().tolist() == expected["image_embeds_position_mask"]

    expected = processor(text=texts, padding=True)
    batch = tokenizer.batch_encode(texts, with_image=False)
    assert batch["input_ids"].tolist() == expected["input_ids"]
    assert batch["attention_mask"].tolist() == expected["attention_mask"]


@pytest.mark.reference
def test_decode_equals_transformers(tokenizer: Kosmos2Tokenizer, processor) -> None:
    for text in PROMPTS:
        ids = tokenizer.encode_prompt(text)[0] + [tokenizer.eos_id]
        for skip in (False, True):
            assert tokenizer.decode(ids, skip) == processor.tokenizer.decode(ids, skip_special_tokens=skip), (
                text
            )


@pytest.mark.reference
def test_tokenizer_json_without_kosmos2_tokens_gets_the_processor_layout(tmp_path: Path, image) -> None:
    """A plain XLM-R-style tokenizer.json: the tags are appended where Kosmos2Processor appends them."""
    transformers = pytest.importorskip("transformers")
    directory = write_checkpoint_tokenizer(tmp_path, with_kosmos2_tokens=False)
    processor = transformers.Kosmos2Processor(
        transformers.CLIPImageProcessorPil(), transformers.AutoTokenizer.from_pretrained(directory)
    )
    tokenizer = Kosmos2Tokenizer.from_pretrained(directory)
    assert tokenizer.image_start_id == 703 and tokenizer.patch_index_offset == 713
    for text in PROMPTS[:12]:
        assert tokenizer.encode_prompt(text) == _processor_ids(processor, image, text, with_image=True), text


# ---------------------------------------------------------------- saving, training


def test_save_pretrained_round_trip(
    tmp_path: Path, sentencepiece_only_dir: Path, kosmos2_tokenizer_dir: Path
):
    original = Kosmos2Tokenizer.from_pretrained(sentencepiece_only_dir)
    saved = original.save_pretrained(tmp_path / "saved")
    names = {p.name for p in saved.iterdir()}
    assert names == {
        "tokenizer.json",
        "sentencepiece.bpe.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    assert (saved / "sentencepiece.bpe.model").read_bytes() == (
        sentencepiece_only_dir / "sentencepiece.bpe.model"
    ).read_bytes()
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<s>", "</s>", "<pad>")
    reloaded = Kosmos2Tokenizer.from_pretrained(saved)
    reference = Kosmos2Tokenizer.from_pretrained(kosmos2_tokenizer_dir)
    assert reloaded.vocab_size == reference.vocab_size
    for text in PROMPTS:
        assert reloaded.encode_prompt(text) == reference.encode_prompt(text), text


@pytest.mark.reference
def test_transformers_loads_a_saved_directory(tmp_path: Path, sentencepiece_only_dir: Path, image) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer = Kosmos2Tokenizer.from_pretrained(sentencepiece_only_dir)
    directory = tokenizer.save_pretrained(tmp_path / "saved")
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    assert (hf.bos_token_id, hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    processor = transformers.Kosmos2Processor(transformers.CLIPImageProcessorPil(), hf)
    for text in PROMPTS:
        assert tokenizer.encode_prompt(text) == _processor_ids(processor, image, text, with_image=True), text


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Kosmos2Tokenizer, Path]:
    directory = tmp_path_factory.mktemp("trained")
    return train_tokenizer(corpus(), 400, directory), directory


def test_train_tokenizer_layout(trained: tuple[Kosmos2Tokenizer, Path]) -> None:
    tokenizer, directory = trained
    assert {p.name for p in directory.iterdir()} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    assert [tokenizer.id_to_token(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert tokenizer.mask_id == 400  # the corpus fills the 400-entry base vocabulary
    assert [tokenizer.token_to_id(t) for t in KOSMOS2_TAGS] == list(range(401, 412))
    assert tokenizer.patch_index_offset == 412 and tokenizer.vocab_size == 400 + 1036
    assert tokenizer.token_to_id("<patch_index_1023>") == 412 + 1023
    assert tokenizer.encode("a<phrase> dog") == tokenizer.encode("a <phrase> dog")
    for text in corpus()[::40]:
        assert tokenizer.decode(tokenizer.encode(text)) == " ".join(text.split()), text
    assert tokenizer.encode("🐶") == [tokenizer.token_to_id("▁"), tokenizer.unk_id]
    reloaded = Kosmos2Tokenizer.from_pretrained(directory)
    for text in PROMPTS:
        assert reloaded.encode_prompt(text) == tokenizer.encode_prompt(text), text


@pytest.mark.reference
def test_transformers_loads_a_trained_tokenizer(trained: tuple[Kosmos2Tokenizer, Path], image) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer, directory = trained
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    processor = transformers.Kosmos2Processor(transformers.CLIPImageProcessorPil(), hf)
    for text in PROMPTS:
        assert hf(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text), text
        assert tokenizer.encode_prompt(text) == _processor_ids(processor, image, text, with_image=True), text


# ---------------------------------------------------------------- errors


def test_missing_directory_and_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Kosmos2Tokenizer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        Kosmos2Tokenizer.from_pretrained(tmp_path / "file.txt")
    with pytest.raises(FileNotFoundError) as info:
        Kosmos2Tokenizer.from_pretrained(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "sentencepiece.bpe.model" in message


def test_bad_files(tmp_path: Path, kosmos2_tokenizer_dir: Path) -> None:
    (tmp_path / "sentencepiece.bpe.model").write_bytes(b"\x0a\xff\xff\xff\x7f not a model")
    with pytest.raises(ValueError, match="sentencepiece.bpe.model is not a SentencePiece model"):
        Kosmos2Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match="tokenizer.json is not a readable tokenizers file"):
        Kosmos2Tokenizer.from_pretrained(tmp_path)
    Tokenizer(models.BPE(unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"special tokens \['<s>', '<pad>', '</s>', '<unk>'\] are missing"):
        Kosmos2Tokenizer.from_pretrained(tmp_path)


def test_location_tokens_must_be_consecutive(tmp_path: Path) -> None:
    backend = Tokenizer(models.WordLevel({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}, unk_token="<unk>"))
    backend.add_tokens(["<patch_index_0001>", "<patch_index_0000>"])
    with pytest.raises(ValueError, match="<patch_index_0001> is 4, expected 6"):
        Kosmos2Tokenizer(backend)


@pytest.mark.parametrize("change", ["word model", "user-defined piece"])
def test_unsupported_sentencepiece_models(tmp_path: Path, kosmos2_tokenizer_dir: Path, change: str) -> None:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((kosmos2_tokenizer_dir / "sentencepiece.bpe.model").read_bytes())
    if change == "word model":
        proto.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.WORD
    else:
        proto.pieces[10].type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    (tmp_path / "sentencepiece.bpe.model").write_bytes(proto.SerializeToString())
    with pytest.raises(
        ValueError, match="cannot build a Kosmos-2 .* tokenizer from this SentencePiece model"
    ):
        Kosmos2Tokenizer.from_pretrained(tmp_path)


def test_bad_arguments(kosmos2_tokenizer_dir: Path, tmp_path: Path) -> None:
    tokenizer = Kosmos2Tokenizer.from_pretrained(kosmos2_tokenizer_dir)
    with pytest.raises(TypeError, match="takes a str"):
        tokenizer.encode(["a list"])
    with pytest.raises(ValueError, match=r"\[1737\] is not token ids of this tokenizer"):
        tokenizer.decode([0, 1737])
    with pytest.raises(ValueError, match="not token ids"):
        tokenizer.decode([[0, 1], [2, 3]])
    with pytest.raises(TypeError, match="wrap a single text in a list"):
        tokenizer.batch_encode("one text")
    with pytest.raises(ValueError, match="empty batch"):
        tokenizer.batch_encode([])
    with pytest.raises(ValueError, match="num_image_tokens must be a positive int"):
        tokenizer.encode_prompt("x", num_image_tokens=0)
    with pytest.raises(ValueError, match="beyond this vocabulary"):
        tokenizer.encode_prompt("x", num_image_tokens=5000)
    with pytest.raises(TypeError, match=r"\(prompt, target\) pairs"):
        tokenizer.batch_encode_for_training(["not a pair"])
    with pytest.raises(ValueError, match="vocab_size must be an int >= 68"):
        train_tokenizer(["a dog"], 10, tmp_path / "t")
    with pytest.raises(ValueError, match="yield only"):
        train_tokenizer(["a dog"], 100, tmp_path / "t")
    with pytest.raises(TypeError, match="not a single string"):
        train_tokenizer("a dog", 100, tmp_path / "t")
    with pytest.raises(ValueError, match="at least one non-empty text"):
        train_tokenizer(["", " "], 100, tmp_path / "t")
