"""Tests for kosmos2.grounding: the box <-> location-token codec, markup writing and parsing.

Expected values come from arithmetic worked out by hand (in the comments) and from transformers' Kosmos-2
processor functions (tests marked `reference`); fuzz and round-trip tests check invariants with hypothesis.
"""

from __future__ import annotations

import functools
import math
import random
import re
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kosmos2.grounding import (
    DELIMITER,
    GRID,
    OBJECT_END,
    OBJECT_START,
    PHRASE_END,
    PHRASE_START,
    SPECIAL_TOKENS,
    TAG_TOKENS,
    Entity,
    Grounded,
    box_to_normalized,
    box_to_pixels,
    box_to_tokens,
    iou,
    markup,
    object_markup,
    parse,
    patch_token,
    tokens_to_box,
)

C = 1 / 32  # one cell of the 32 × 32 grid; every value below is a multiple of C / 2, so exact in binary


@pytest.fixture(scope="module")
def hf():
    """transformers' Kosmos-2 processing module (the behavioural reference)."""
    return pytest.importorskip("transformers.models.kosmos2.processing_kosmos2")


# ----------------------------------------------------------------------------------------------------------
# Tag constants and location tokens


def test_tags_are_the_vocabulary_tokens_in_order():
    # SPEC §2: ids 64002…64012 in this order
    assert TAG_TOKENS == (
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
    )
    assert GRID == 32


def test_patch_token():
    assert patch_token(0) == "<patch_index_0000>"
    assert patch_token(42) == "<patch_index_0042>"
    assert patch_token(1023) == "<patch_index_1023>"
    assert patch_token(4095) == "<patch_index_4095>"  # a 64 × 64 grid still fits in four digits
    with pytest.raises(ValueError, match="negative"):
        patch_token(-1)
    with pytest.raises(ValueError, match="integer"):
        patch_token(1.0)


# ----------------------------------------------------------------------------------------------------------
# box_to_tokens, worked by hand: col1 = floor(32·x1), row1 = floor(32·y1), col2 = ceil(32·x2 − 1),
# row2 = ceil(32·y2 − 1), index = 32·row + col, each clamped into [0, 31].


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        # whole image: floor(0) = 0, ceil(32 − 1) = 31 -> ul 0, lr 31·32 + 31 = 1023
        ((0.0, 0.0, 1.0, 1.0), (0, 1023)),
        # exact cell edges: x1 = 0.5 -> floor(16) = 16; y1 = 0.25 -> 8; x2 = 0.75 -> ceil(24 − 1) = 23;
        # y2 = 0.5 -> ceil(16 − 1) = 15: the edge belongs to the cell it closes.
        # ul 8·32 + 16 = 272, lr 15·32 + 23 = 503
        ((0.5, 0.25, 0.75, 0.5), (272, 503)),
        # just past an edge: x2 = y2 = 0.5 + 1/64 -> ceil(16.5 − 1) = 16: ul 272, lr 16·32 + 16 = 528
        ((0.5, 0.25, 0.515625, 0.515625), (272, 528)),
        # inside cells: x1 = y1 = 0.03 -> floor(0.96) = 0; x2 = y2 = 0.04 -> ceil(1.28 − 1) = 1:
        # ul 0, lr 32 + 1 = 33
        ((0.03, 0.03, 0.04, 0.04), (0, 33)),
        # a box inside one cell: 3.2 -> 3 and ceil(3.52 − 1) = 3: ul = lr = 3·32 + 3 = 99
        ((0.1, 0.1, 0.11, 0.11), (99, 99)),
        # a sliver at the origin: ceil(0.032 − 1) = ceil(−0.968) = 0: ul = lr = 0
        ((0.0, 0.0, 0.001, 0.001), (0, 0)),
        # the last cell: floor(31.04) = 31, ceil(32 − 1) = 31: ul = lr = 1023
        ((0.97, 0.97, 1.0, 1.0), (1023, 1023)),
        # the top row, full width: rows floor(0) = 0 and ceil(1 − 1) = 0; columns 0 and 31: ul 0, lr 31
        ((0.0, 0.0, 1.0, C), (0, 31)),
        # the left column, full height: columns 0 and 0, rows 0 and 31: ul 0, lr 31·32 = 992
        ((0.0, 0.0, C, 1.0), (0, 992)),
        # slightly outside [0, 1] is clamped: floor(−0.16) = −1 -> 0 and ceil(32.128 − 1) = 32 -> 31
        ((-0.005, -0.005, 1.004, 1.004), (0, 1023)),
        # one cell in: x1 = 1/32 -> floor(1) = 1; x2 = 2/32 -> ceil(2 − 1) = 1; same for y: 33, 33
        ((C, C, 2 * C, 2 * C), (33, 33)),
    ],
)
def test_box_to_tokens_by_hand(box, expected):
    assert box_to_tokens(box) == expected


def test_box_to_tokens_other_grid():
    # grid 4: x1 = 0.3 -> floor(1.2) = 1, y1 = 0.6 -> floor(2.4) = 2, x2 = 0.9 -> ceil(3.6 − 1) = 3,
    # y2 = 1.0 -> ceil(4 − 1) = 3: ul 2·4 + 1 = 9, lr 3·4 + 3 = 15
    assert box_to_tokens((0.3, 0.6, 0.9, 1.0), grid=4) == (9, 15)
    # grid 1: everything is cell 0
    assert box_to_tokens((0.2, 0.2, 0.3, 0.3), grid=1) == (0, 0)


def test_box_to_tokens_accepts_lists_ints_and_other_number_types():
    from fractions import Fraction

    assert box_to_tokens([0, 0, 1, 1]) == (0, 1023)
    assert box_to_tokens((Fraction(1, 2), 0.25, 0.75, 0.5)) == (272, 503)


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ((0.5, 0.2, 0.5, 0.6), "empty or inverted"),  # zero width
        ((0.1, 0.6, 0.5, 0.2), "empty or inverted"),  # y2 < y1
        ((0.6, 0.1, 0.2, 0.5), "empty or inverted"),  # x2 < x1
        ((0.1, 0.1, float("nan"), 0.5), "non-finite"),
        ((0.1, float("-inf"), 0.5, 0.5), "non-finite"),
        ((12, 30, 200, 180), "box_to_normalized"),  # pixel coordinates
        ((-0.02, 0.1, 0.5, 0.5), "outside \\[0, 1\\]"),  # beyond the 0.01 tolerance
        ((0.1, 0.1, 1.02, 0.5), "outside \\[0, 1\\]"),
        ((0.1, 0.2, 0.3), "4 numbers"),
        ((0.1, 0.2, 0.3, 0.4, 0.5), "4 numbers"),
        ("abcd", "4 numbers"),
        ((0.1, "0.2", 0.3, 0.4), "4 numbers"),
        (None, "4 numbers"),
    ],
)
def test_box_to_tokens_rejects_bad_boxes(box, message):
    with pytest.raises(ValueError, match=message):
        box_to_tokens(box)


def test_bad_grid():
    with pytest.raises(ValueError, match="positive"):
        box_to_tokens((0, 0, 1, 1), grid=0)
    with pytest.raises(ValueError, match="integer"):
        tokens_to_box(0, 0, grid=32.0)


# ----------------------------------------------------------------------------------------------------------
# tokens_to_box, worked by hand: row, col = divmod(index, 32); centres (col + ½)/32 when the corners differ
# in row and column, else borders col/32 … (col + 1)/32.


@pytest.mark.parametrize(
    ("ul", "lr", "expected"),
    [
        # same cell: 99 = 3·32 + 3 -> borders 3/32 … 4/32
        (99, 99, (3 * C, 3 * C, 4 * C, 4 * C)),
        # same row: 99 (row 3, col 3), 106 (row 3, col 10) -> borders x 3/32 … 11/32, y 3/32 … 4/32
        (99, 106, (3 * C, 3 * C, 11 * C, 4 * C)),
        # same column: 99 (row 3, col 3), 643 = 20·32 + 3 (row 20, col 3) -> x 3/32 … 4/32, y 3/32 … 21/32
        (99, 643, (3 * C, 3 * C, 4 * C, 21 * C)),
        # general: 44 = 1·32 + 12, 863 = 26·32 + 31 -> centres (12.5, 1.5, 31.5, 26.5)/32
        # = (0.390625, 0.046875, 0.984375, 0.828125), the example in transformers' documentation
        (44, 863, (0.390625, 0.046875, 0.984375, 0.828125)),
        # the grid corners: 0 (row 0, col 0), 1023 (row 31, col 31) -> centres 0.5/32 … 31.5/32
        (0, 1023, (0.5 * C, 0.5 * C, 31.5 * C, 31.5 * C)),
        # first and last cell alone: borders
        (0, 0, (0.0, 0.0, C, C)),
        (1023, 1023, (31 * C, 31 * C, 1.0, 1.0)),
        # the top row (0 … 31) and the left column (0 … 992 = 31·32): borders, so the full side
        (0, 31, (0.0, 0.0, 1.0, C)),
        (0, 992, (0.0, 0.0, C, 1.0)),
        # neighbours across both a row and a column edge: 0 (row 0, col 0), 33 (row 1, col 1) -> centres
        (0, 33, (0.5 * C, 0.5 * C, 1.5 * C, 1.5 * C)),
    ],
)
def test_tokens_to_box_by_hand(ul, lr, expected):
    assert tokens_to_box(ul, lr) == expected


def test_tokens_to_box_other_grid():
    # grid 4: 9 = 2·4 + 1, 15 = 3·4 + 3 -> centres (1.5, 2.5, 3.5, 3.5)/4
    assert tokens_to_box(9, 15, grid=4) == (0.375, 0.625, 0.875, 0.875)


@pytest.mark.parametrize(
    ("ul", "lr", "message"),
    [
        (1024, 1024, "outside \\[0, 1024\\)"),
        (0, 1024, "outside \\[0, 1024\\)"),
        (-1, 5, "outside \\[0, 1024\\)"),
        (863, 44, "above or left"),  # swapped
        (31, 32, "above or left"),  # 31 = (row 0, col 31), 32 = (row 1, col 0): column goes left
        (1.0, 5, "integer"),
        (True, 5, "integer"),
    ],
)
def test_tokens_to_box_rejects_bad_indices(ul, lr, message):
    with pytest.raises(ValueError, match=message):
        tokens_to_box(ul, lr)


# ----------------------------------------------------------------------------------------------------------
# The codec against transformers on random boxes


def _random_box(rng: random.Random, grid: int) -> tuple[float, float, float, float]:
    """A random box in [0, 1]; a third of them with corners exactly on cell edges, some touching 0 or 1."""
    coords = []
    for _ in range(2):
        kind = rng.random()
        if kind < 0.33:
            a = rng.randint(0, grid - 1)
            b = rng.randint(a + 1, grid)
            coords.append((a / grid, b / grid))
        elif kind < 0.4:
            coords.append((0.0, 1.0))
        else:
            a, b = rng.random(), rng.random()
            while a == b:
                b = rng.random()
            coords.append((min(a, b), max(a, b)))
    (x1, x2), (y1, y2) = coords
    return x1, y1, x2, y2


@pytest.mark.reference
def test_codec_matches_transformers_on_random_boxes(hf):
    rng = random.Random(20230626)
    for _ in range(10_000):
        box = _random_box(rng, 32)
        ul, lr = box_to_tokens(box)
        assert (ul, lr) == hf.coordinate_to_patch_index(box, 32), box
        assert tokens_to_box(ul, lr) == hf.patch_index_to_coordinate(ul, lr, 32), (ul, lr)


@pytest.mark.reference
def test_decode_matches_transformers_on_random_valid_pairs(hf):
    rng = random.Random(7)
    for _ in range(10_000):
        r1, c1 = rng.randrange(32), rng.randrange(32)
        r2, c2 = rng.randint(r1, 31), rng.randint(c1, 31)
        ul, lr = 32 * r1 + c1, 32 * r2 + c2
        assert tokens_to_box(ul, lr) == hf.patch_index_to_coordinate(ul, lr, 32), (ul, lr)


@pytest.mark.reference
@pytest.mark.parametrize("grid", [1, 7, 16, 24, 64])
def test_codec_matches_transformers_on_other_grids(hf, grid):
    rng = random.Random(grid)
    for _ in range(2_000):
        box = _random_box(rng, grid)
        ul, lr = box_to_tokens(box, grid)
        assert (ul, lr) == hf.coordinate_to_patch_index(box, grid), box
        # (col + ½)/P here against col·(1/P) + (1/P)/2 there: equal up to rounding for grids not a power of 2
        ours, theirs = tokens_to_box(ul, lr, grid), hf.patch_index_to_coordinate(ul, lr, grid)
        close = [math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15) for a, b in zip(ours, theirs, strict=True)]
        assert all(close), (ours, theirs)


# ----------------------------------------------------------------------------------------------------------
# parse: hand-written cases, including every documented difference from transformers


def _entities(grounded: Grounded) -> list[tuple]:
    return [(e.phrase, e.span, e.boxes) for e in grounded.entities]


SNOWMAN = (
    "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>"
    " warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>."
)


def test_parse_snowman_example():
    # transformers' documented example: 'An image of a snowman warming himself by a fire.'
    # "a snowman" = caption[12:21]; 44/863 decode as above. "a fire" = caption[41:47]; 5 = (row 0, col 5),
    # 911 = 28·32 + 15 -> centres (5.5, 0.5, 15.5, 28.5)/32 = (0.171875, 0.015625, 0.484375, 0.890625)
    grounded = parse(SNOWMAN)
    assert grounded.caption == "An image of a snowman warming himself by a fire."
    assert _entities(grounded) == [
        ("a snowman", (12, 21), [(0.390625, 0.046875, 0.984375, 0.828125)]),
        ("a fire", (41, 47), [(0.171875, 0.015625, 0.484375, 0.890625)]),
    ]
    assert grounded.caption[12:21] == "a snowman" and grounded.caption[41:47] == "a fire"


def test_parse_keeps_only_text_after_the_last_image_end():
    before = "<s><image>junk<phrase>x</phrase><object><patch_index_0000><patch_index_0001></object></image>"
    text = before + SNOWMAN
    assert parse(text) == parse(SNOWMAN)
    assert parse("a</image>b</image> c d").caption == "c d"


def test_parse_multiple_boxes_and_phraseless_objects():
    text = (
        "<grounding><phrase>Two dogs</phrase><object><patch_index_0000><patch_index_0033>"
        "</delimiter_of_multi_objects/><patch_index_0099><patch_index_0099></object> and"
        "<object><patch_index_0044><patch_index_0863></delimiter_of_multi_objects/>"
        "<patch_index_0000><patch_index_0031></object> more"
    )
    grounded = parse(text)
    # caption "Two dogs and more": the phrase-less object sits at offset 12, after "Two dogs and"
    assert grounded.caption == "Two dogs and more"
    assert _entities(grounded) == [
        ("Two dogs", (0, 8), [(0.5 * C, 0.5 * C, 1.5 * C, 1.5 * C), (3 * C, 3 * C, 4 * C, 4 * C)]),
        ("<patch_index_44><patch_index_863>", (12, 12), [(0.390625, 0.046875, 0.984375, 0.828125)]),
        ("<patch_index_0><patch_index_31>", (12, 12), [(0.0, 0.0, 1.0, C)]),
    ]


def test_parse_drops_what_cannot_be_decoded():
    box = [(0.390625, 0.046875, 0.984375, 0.828125)]
    cases = {
        # a phrase with no object, an unclosed phrase, an unclosed object, one location token, three tokens
        "a<phrase> dog</phrase> runs": [],
        "a<phrase> dog": [],
        "a<phrase> dog</phrase><object><patch_index_0044><patch_index_0863>": [],
        "a<phrase> dog</phrase><object><patch_index_0044></object>": [],
        "a<phrase> dog</phrase><object><patch_index_0044><patch_index_0863><patch_index_0863></object>": [],
        # index past the grid, corners swapped
        "a<phrase> dog</phrase><object><patch_index_1024><patch_index_1025></object>": [],
        "a<phrase> dog</phrase><object><patch_index_0863><patch_index_0044></object>": [],
        # text or another tag inside the object
        "a<phrase> dog</phrase><object><patch_index_0044> x <patch_index_0863></object>": [],
        "a<phrase> dog</phrase><object><patch_index_0044></s><patch_index_0863></object>": [],
        # an empty phrase: the object counts as phrase-less (transformers' rule)
        "a<phrase></phrase><object><patch_index_0044><patch_index_0863></object>": [
            ("<patch_index_44><patch_index_863>", (1, 1), box)
        ],
        # a tag between </phrase> and <object>, or a phrase containing a tag, orphans the phrase
        "a<phrase> dog</phrase><grounding><object><patch_index_0044><patch_index_0863></object>": [
            ("<patch_index_44><patch_index_863>", (5, 5), box)
        ],
        "a<phrase> d<s>og</phrase><object><patch_index_0044><patch_index_0863></object>": [
            ("<patch_index_44><patch_index_863>", (5, 5), box)
        ],
        # nested phrase: the inner one is the phrase
        "<phrase>a<phrase> dog</phrase><object><patch_index_0044><patch_index_0863></object>": [
            ("dog", (2, 5), box)
        ],
    }
    for text, expected in cases.items():
        grounded = parse(text)
        assert grounded.caption.startswith("a"), text
        assert _entities(grounded) == expected, text


def test_parse_differences_from_transformers():
    box = (0.390625, 0.046875, 0.984375, 0.828125)  # 44, 863
    # only vocabulary tokens are removed: transformers would delete "<3 y<phrase>" and lose "y"
    g = parse("x <3 y<phrase>z</phrase><object><patch_index_0044><patch_index_0863></object> <b>w</b>")
    assert g.caption == "x <3 yz <b>w</b>"
    assert _entities(g) == [("z", (6, 7), [box])]
    # whitespace between </phrase> and <object> and inside the object (the tokenizer swallows it)
    g = parse("a<phrase> dog</phrase> <object> <patch_index_0044>\n<patch_index_0863> </object> runs")
    assert g.caption == "a dog  \n  runs"  # the whitespace stays in the caption, as in transformers
    assert _entities(g) == [("dog", (2, 5), [box])]
    # each box on its own: the bad index, the single token and the swapped pair go, the good box stays
    g = parse(
        "<phrase>it</phrase><object><patch_index_1024><patch_index_1030></delimiter_of_multi_objects/>"
        "<patch_index_0044></delimiter_of_multi_objects/><patch_index_0863><patch_index_0044>"
        "</delimiter_of_multi_objects/><patch_index_0044><patch_index_0863></delimiter_of_multi_objects/></object>"
    )
    assert _entities(g) == [("it", (0, 2), [box])]
    # spans clamped into the caption: transformers gives (-1, -1) and (3, 3) for a 2-character caption
    assert _entities(parse("<grounding><object><patch_index_0044><patch_index_0863></object> A dog")) == [
        ("<patch_index_44><patch_index_863>", (0, 0), [box])
    ]
    assert _entities(parse("a<phrase>b</phrase>. <object><patch_index_0044><patch_index_0863></object>")) == [
        ("<patch_index_44><patch_index_863>", (3, 3), [box])
    ]
    # a whitespace-only phrase: empty name, empty span where it stood (transformers: end before start)
    g = parse("<phrase> </phrase><object><patch_index_0044><patch_index_0863></object> dog")
    assert _entities(g) == [("", (0, 0), [box])]
    assert _entities(parse("a<phrase> </phrase><object><patch_index_0044><patch_index_0863></object>b")) == [
        ("", (1, 1), [box])
    ]
    # a huge index is out of range, not a crash (int() refuses more than 4300 digits)
    g = parse("a<phrase>b</phrase><object><patch_index_" + "9" * 5000 + "><patch_index_0001></object>")
    assert g == Grounded("ab", [])
    # leading zeros are fine
    assert parse("<object><patch_index_000000000000000044><patch_index_863></object>").entities == [
        Entity("<patch_index_44><patch_index_863>", (0, 0), [box])
    ]


def test_parse_grid_argument():
    # grid 4: 9 and 15 decode to centres (see test_tokens_to_box_other_grid); 16 is past a 4 × 4 grid
    text = "<phrase>a</phrase><object><patch_index_0009><patch_index_0015></object><phrase>b</phrase><object>"
    text += "<patch_index_0009><patch_index_0016></object>"
    assert _entities(parse(text, grid=4)) == [("a", (0, 1), [(0.375, 0.625, 0.875, 0.875)])]


def test_parse_removes_special_tokens_and_stray_tags():
    g = parse("<s><grounding> a <unk> dog<pad></chunk></line></doc><mask><patch_index_0003>.</s>")
    assert g.caption == "a  dog."
    assert g.entities == []


def test_parse_rejects_non_strings():
    with pytest.raises(ValueError, match="str"):
        parse(None)
    with pytest.raises(ValueError, match="str"):
        parse(b"<phrase>")


# ----------------------------------------------------------------------------------------------------------
# parse against transformers' post_process_generation on random well-formed grounded text

WORDS = "a dog Snowman red car, über 東京 x>y 42 (left) it's — . café é".split()


def _random_object(rng: random.Random) -> str:
    pairs = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        r1, c1 = rng.randrange(32), rng.randrange(32)
        r2, c2 = rng.randint(r1, 31), rng.randint(c1, 31)
        pairs.append(f"<patch_index_{32 * r1 + c1:04d}><patch_index_{32 * r2 + c2:04d}>")
    return OBJECT_START + DELIMITER.join(pairs) + OBJECT_END


def _random_words(rng: random.Random, low: int, high: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
    return "".join(rng.choice([" ", " ", "  ", "\n", "\t"]) + w for w in words)


def _random_grounded_text(rng: random.Random) -> str:
    """Well-formed grounded text as the model writes it, with every construct the format allows."""
    prefix = rng.choice(
        [
            "",
            "<grounding>",
            "<grounding> ",
            " ",
            "<s><image>" + _random_words(rng, 0, 5) + "</image><grounding>",
            "<s><image>" + "<phrase>x</phrase>" + _random_object(rng) + "</image>",
        ]
    )
    parts = [prefix]
    for _ in range(rng.randint(0, 8)):
        kind = rng.random()
        if kind < 0.35:  # plain text
            parts.append(_random_words(rng, 1, 4))
        elif kind < 0.7:  # a phrase with its object; the phrase often starts with a space, as generated
            parts.append(PHRASE_START + rng.choice(["", " "]) + _random_words(rng, 1, 3).lstrip())
            parts.append(rng.choice(["", " "]) + PHRASE_END + _random_object(rng))
        elif kind < 0.85:  # an object without a phrase
            parts.append(_random_object(rng))
        else:  # a phrase without an object, followed by text
            parts.append(PHRASE_START + _random_words(rng, 1, 2) + PHRASE_END + rng.choice(WORDS))
    parts.append(rng.choice(["", ".", "</s>", "\n", " "]))
    return "".join(parts)


@pytest.mark.reference
def test_parse_matches_transformers_post_process_generation(hf):
    # post_process_generation reads only self.eoi_token, so the real method runs on a stand-in processor
    processor = types.SimpleNamespace(eoi_token="</image>")
    rng = random.Random(2306)
    seen = {"phrase": 0, "phraseless": 0, "multi": 0}
    for _ in range(400):
        text = _random_grounded_text(rng)
        caption, entities = hf.Kosmos2Processor.post_process_generation(processor, text)

        # the one documented difference on well-formed text: spans clamped into the caption
        n = len(caption)
        expected = [(name, (min(max(s, 0), n), min(max(e, 0), n)), boxes) for name, (s, e), boxes in entities]
        grounded = parse(text)
        assert grounded.caption == caption, text
        assert _entities(grounded) == expected, text
        for name, _, boxes in entities:
            seen["phraseless" if name.startswith("<patch_index_") else "phrase"] += 1
            seen["multi"] += len(boxes) > 1
    assert min(seen.values()) > 50, seen  # the generator exercised every construct


# ----------------------------------------------------------------------------------------------------------
# parse never raises

_FUZZ_ATOMS = [
    *TAG_TOKENS,
    *SPECIAL_TOKENS,
    "<patch_index_0000>",
    "<patch_index_1023>",
    "<patch_index_1024>",
    "<patch_index_44>",
    "<patch_index_00000000000000000012>",
    "<patch_index_" + "9" * 5000 + ">",
    "<patch_index_",
    "<patch_index_٤٤>",  # Arabic-Indic digits: not a location token here
    "<",
    ">",
    "/>",
    " ",
    "\n",
    "\t",
    "phrase",
    " a dog",
    "東京",
]
_fuzz_text = st.lists(
    st.one_of(
        st.sampled_from(_FUZZ_ATOMS),
        st.integers(0, 1100).map(patch_token),
        st.text(max_size=4),
    ),
    max_size=24,
).map("".join)


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_fuzz_text, grid=st.sampled_from([32, 32, 1, 7]))
def test_parse_never_raises(text, grid):
    grounded = parse(text, grid)
    n = len(grounded.caption)
    assert grounded.caption == grounded.caption.strip()
    for entity in grounded.entities:
        start, end = entity.span
        assert 0 <= start <= end <= n
        assert grounded.caption[start:end] == entity.phrase or (
            start == end and re.fullmatch(r"<patch_index_\d+><patch_index_\d+>", entity.phrase)
        )
        assert entity.boxes
        for x1, y1, x2, y2 in entity.boxes:
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1


# ----------------------------------------------------------------------------------------------------------
# Writing markup


def test_object_markup():
    # boxes from test_box_to_tokens_by_hand: (272, 503) and (0, 1023)
    assert object_markup([(0.5, 0.25, 0.75, 0.5)]) == "<object><patch_index_0272><patch_index_0503></object>"
    assert object_markup([(0.5, 0.25, 0.75, 0.5), (0, 0, 1, 1)]) == (
        "<object><patch_index_0272><patch_index_0503></delimiter_of_multi_objects/>"
        "<patch_index_0000><patch_index_1023></object>"
    )
    with pytest.raises(ValueError, match="at least one box"):
        object_markup([])
    with pytest.raises(ValueError, match="single box"):
        object_markup((0.1, 0.1, 0.2, 0.2))
    with pytest.raises(ValueError, match="list of boxes"):
        object_markup(None)


def test_markup_by_hand():
    caption = "An image of a snowman warming himself by a fire."
    # spans given out of order; a phrase-less object at offset 0 and another right after "a fire"
    text = markup(
        caption,
        [
            (41, 47, [(5.5 * C, 0.5 * C, 15.5 * C, 28.5 * C)]),
            (12, 21, [(12.5 * C, 1.5 * C, 31.5 * C, 26.5 * C)]),
            (0, 0, [(0, 0, 1, 1)]),
            (47, 47, [(0.1, 0.1, 0.11, 0.11)]),
        ],
    )
    assert text == (
        "<object><patch_index_0000><patch_index_1023></object>An image of <phrase>a snowman</phrase>"
        "<object><patch_index_0044><patch_index_0863></object> warming himself by <phrase>a fire</phrase>"
        "<object><patch_index_0005><patch_index_0911></object><object><patch_index_0099><patch_index_0099></object>."
    )
    assert markup(caption, []) == caption


@pytest.mark.parametrize(
    ("caption", "spans", "message"),
    [
        ("a dog", [(0, 6, [(0, 0, 1, 1)])], "not a range inside the caption of 5 characters"),
        ("a dog", [(3, 2, [(0, 0, 1, 1)])], "not a range"),
        ("a dog", [(-1, 2, [(0, 0, 1, 1)])], "not a range"),
        ("a dog", [(0, 5, [(0, 0, 1, 1)]), (2, 5, [(0, 0, 1, 1)])], "overlaps span 0 .*keep one"),
        ("a dog", [(2, 5, [(0, 0, 1, 1)]), (2, 5, [(0, 0, 0.5, 0.5)])], "one span with all its boxes"),
        ("a dog", [(0, 5, [(0, 0, 1, 1)]), (3, 3, [(0, 0, 1, 1)])], "overlaps"),
        ("a dog", [(1, 2, [(0, 0, 1, 1)])], "only whitespace"),
        ("a dog", [(2, 5, [])], "span 0 \\(2, 5\\) 'dog': an <object> needs at least one box"),
        ("a dog", [(2, 5, (0.1, 0.1, 0.5, 0.5))], "single box"),
        ("a dog", [(2, 5, [(10, 10, 50, 50)])], "span 0 \\(2, 5\\) 'dog': box .*box_to_normalized"),
        ("a dog", [(2, 5, [(0.5, 0.1, 0.4, 0.5)])], "empty or inverted"),
        ("a dog", [(2, 5)], "must be \\(char_start, char_end, \\[box, ...\\]\\)"),
        ("a dog", [(2.0, 5, [(0, 0, 1, 1)])], "span 0 start must be an integer"),
        ("a <phrase>dog", [(0, 1, [(0, 0, 1, 1)])], "already contains the markup token '<phrase>'"),
        ("a dog</s>", [], "'</s>' at offset 5"),
        ("a <patch_index_0001>", [], "markup token"),
        (None, [], "caption must be a str"),
    ],
)
def test_markup_rejects_bad_input(caption, spans, message):
    with pytest.raises(ValueError, match=message):
        markup(caption, spans)


@pytest.mark.reference
def test_markup_matches_transformers_object_insertion(hf):
    # transformers' processor writes "<object> <a> <b> </delimiter_of_multi_objects/> … </object>" after each
    # <phrase>…</phrase> in the text; without those spaces (the tokenizer swallows them) it must equal ours
    stand_in = types.SimpleNamespace(num_patch_index_tokens=1024)
    stand_in._convert_bbox_to_patch_index_tokens = functools.partial(
        hf.Kosmos2Processor._convert_bbox_to_patch_index_tokens, stand_in
    )
    rng = random.Random(11)
    for _ in range(300):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
        caption = " ".join(words)
        starts = [0] + [m.end() + 1 for m in re.finditer(r"\S(?= )", caption)]  # word starts
        chosen = sorted(rng.sample(range(len(words)), rng.randint(0, min(4, len(words)))))
        spans, tagged, cursor = [], [], 0
        for k in chosen:
            start = starts[k]
            end = start + len(words[k])
            boxes = [_random_box(rng, 32) for _ in range(rng.choice([1, 1, 2, 3]))]
            spans.append((start, end, boxes))
            tagged += [caption[cursor:start], PHRASE_START, caption[start:end], PHRASE_END]
            cursor = end
        tagged.append(caption[cursor:])
        insert = hf.Kosmos2Processor._insert_patch_index_tokens
        theirs = insert(stand_in, "".join(tagged), [s[2] for s in spans])
        theirs = re.sub(r"<object>.*?</object>", lambda m: m.group(0).replace(" ", ""), theirs)
        assert markup(caption, spans) == theirs


# ----------------------------------------------------------------------------------------------------------
# markup -> parse round trip

# No letters that could spell a tag, so any caption drawn from this alphabet is plain text
_CAPTION_ALPHABET = "ab <>/_.é\n\t"
_coordinate_pairs = st.tuples(st.floats(0, 1), st.floats(0, 1)).filter(lambda p: p[0] != p[1]).map(sorted)
_boxes = st.lists(
    st.tuples(_coordinate_pairs, _coordinate_pairs).map(lambda xy: (xy[0][0], xy[1][0], xy[0][1], xy[1][1])),
    min_size=1,
    max_size=3,
)


@st.composite
def _caption_and_spans(draw):
    caption = draw(st.text(alphabet=_CAPTION_ALPHABET, max_size=40))
    cuts = sorted(draw(st.lists(st.integers(0, len(caption)), max_size=8)))
    spans = []
    for start, end in zip(cuts[::2], cuts[1::2], strict=False):  # an odd last cut is handled below
        if not caption[start:end].strip():
            end = start  # a whitespace-only range becomes a phrase-less object
        spans.append((start, end, draw(_boxes)))
    if len(cuts) % 2:
        spans.append((cuts[-1], cuts[-1], draw(_boxes)))
    return caption, draw(st.permutations(spans))


@settings(max_examples=500, deadline=None)
@given(_caption_and_spans())
def test_markup_parse_round_trip(caption_and_spans):
    caption, spans = caption_and_spans
    text = markup(caption, spans)
    grounded = parse(text)
    stripped = caption.strip()
    lead = len(caption) - len(caption.lstrip())
    assert grounded.caption == stripped

    expected = []
    for start, end, boxes in sorted(spans, key=lambda s: (s[0], s[1])):
        decoded = [tokens_to_box(*box_to_tokens(b)) for b in boxes]
        if start < end:
            words = caption[start:end]
            s = start + len(words) - len(words.lstrip()) - lead
            e = end - (len(words) - len(words.rstrip())) - lead
            expected.append((words.strip(), (s, e), decoded))
        else:
            offset = min(max(start - lead, 0), len(stripped))
            for b, d in zip(boxes, decoded, strict=True):
                ul, lr = box_to_tokens(b)
                expected.append((f"<patch_index_{ul}><patch_index_{lr}>", (offset, offset), [d]))
    assert _entities(grounded) == expected
    for phrase, (s, e), _ in expected:
        assert s == e or stripped[s:e] == phrase


@given(_boxes)
def test_box_survives_the_round_trip_within_one_cell(boxes):
    for box in boxes:
        decoded = tokens_to_box(*box_to_tokens(box))
        assert all(abs(a - b) <= C + 1e-12 for a, b in zip(box, decoded, strict=True))


# ----------------------------------------------------------------------------------------------------------
# Box helpers


def test_box_to_pixels_and_back():
    # x by the width 640, y by the height 480
    assert box_to_pixels((0.25, 0.5, 0.75, 1.0), 640, 480) == (160.0, 240.0, 480.0, 480.0)
    assert box_to_normalized((160, 240, 480, 480), 640, 480) == (0.25, 0.5, 0.75, 1.0)
    # pixel boxes slightly outside the image are kept as they are
    assert box_to_normalized((-3.2, 0, 640, 481), 640, 480) == (-0.005, 0.0, 1.0, 481 / 480)
    with pytest.raises(ValueError, match="box_to_normalized"):
        box_to_pixels((160, 240, 480, 480), 640, 480)  # already pixels
    with pytest.raises(ValueError, match="width 0 must be a positive"):
        box_to_pixels((0, 0, 1, 1), 0, 480)
    with pytest.raises(ValueError, match="height -1 must be a positive"):
        box_to_normalized((0, 0, 1, 1), 640, -1)
    with pytest.raises(ValueError, match="height inf"):
        box_to_normalized((0, 0, 1, 1), 640, float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        box_to_normalized((0, 0, float("nan"), 1), 640, 480)


def test_iou():
    # (0,0,2,2) and (1,1,3,3): intersection 1×1 = 1, union 4 + 4 − 1 = 7
    assert iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert iou((0.1, 0.2, 0.5, 0.9), (0.1, 0.2, 0.5, 0.9)) == 1.0
    # (0,0,4,2) contains (1,0,3,2): intersection 4, union 8
    assert iou((0, 0, 4, 2), (1, 0, 3, 2)) == 0.5
    assert iou((0, 0, 1, 1), (1, 0, 2, 1)) == 0.0  # touching edges
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # both empty
    assert iou((2, 2, 0, 0), (0, 0, 2, 2)) == 0.0  # an inverted box has no area
    with pytest.raises(ValueError, match="4 numbers"):
        iou((0, 0, 1), (0, 0, 1, 1))


# ----------------------------------------------------------------------------------------------------------
# Checking hand-written markup (prompts, `kosmos2 draw` text): what is wrong and where, by hand


@pytest.mark.parametrize(
    "text, offset, message",
    [
        # "<grounding>An image of" is 22 characters: the bad token starts at 22
        ("<grounding>An image of<patch_index_9999>", 22, r"outside the 32×32 grid.*<patch_index_1023>"),
        ("<grounding><phrase>the circle", 11, r"unclosed <phrase>: add </phrase>"),
        ("<grounding><phrase></phrase>", 11, r"empty <phrase></phrase>"),
        ("<grounding><phrase>   </phrase>", 11, r"empty <phrase></phrase>"),
        ("<grounding></phrase>", 11, r"'</phrase>' closes no <phrase>"),
        ("<phrase>a <phrase>b</phrase>", 10, r"'<phrase>' inside the phrase opened at character 0"),
        (
            "<phrase>a<object><patch_index_0000><patch_index_0001></object>",
            9,
            r"'<object>' inside the phrase",
        ),
        ("a <object><patch_index_0001></object>", 10, r"an object's box is 2 location tokens, found 1"),
        ("a <object><patch_index_0001><patch_index_0002>", 2, r"unclosed <object>"),
        ("a <patch_index_0001> b", 2, r"outside <object>"),
        ("a </object>", 2, r"closes no <object>"),
        ("a <object>x</object>", 2, r"box is 2 location tokens, found 0"),
        # cell 811 = row 25, col 11 above-left of cell 517 = row 16, col 5: inverted
        ("<phrase>a</phrase><object><patch_index_0811><patch_index_0517></object>", 26, r"above or left"),
        ("<patch_index_12>", 0, r"not a location token: write '<patch_index_0012>'"),
        ("<Phrase>x</Phrase>", 0, r"not a Kosmos-2 tag.*'<phrase>'"),
        ("An image of<grounding>", 11, r"'<grounding>' must open the prompt"),
        ("<image>An image of", 0, r"prompt layout"),
        ("An image of</s>", 11, r"prompt layout"),
    ],
)
def test_markup_problems_say_what_and_where(text, offset, message):
    from kosmos2.errors import PromptError
    from kosmos2.grounding import check_prompt, markup_problems

    problems = markup_problems(text)
    assert problems and problems[0][0] == offset, problems
    assert re.search(message, problems[0][1]), problems
    with pytest.raises(PromptError, match=rf"at character {offset}: .*" + message):
        check_prompt(text)
    with pytest.raises(ValueError):  # a PromptError is a ValueError for Python callers
        check_prompt(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<grounding>An image of",
        "<grounding>Describe this image in detail:",
        "<grounding> Question: What is it? Answer:",
        "<grounding><phrase>a red ball</phrase>",
        "<phrase> It</phrase><object><patch_index_0000><patch_index_1023></object> is",
        "<grounding>a <phrase>dog</phrase><object><patch_index_0044><patch_index_0863>"
        "</delimiter_of_multi_objects/><patch_index_0001><patch_index_0002></object> and",
        "a heart <3 and <b>bold</b> text",  # tag-shaped but not Kosmos-2 tokens: plain text
    ],
)
def test_sound_prompts_pass(text):
    from kosmos2.grounding import check_prompt, markup_problems

    assert markup_problems(text) == []
    assert check_prompt(text) == text


def test_markup_problems_against_a_vocabulary_and_a_grid():
    from kosmos2.grounding import markup_problems

    vocabulary = {patch_token(i): i for i in range(16)} | {t: 100 + i for i, t in enumerate(TAG_TOKENS)}
    text = "<phrase>a</phrase><object><patch_index_0003><patch_index_0015></object>"
    assert markup_problems(text, grid=4, vocabulary=vocabulary.get) == []
    # on a 4 x 4 grid cell 16 is off the grid; a vocabulary without <patch_index_0014> refuses it
    assert "outside the 4×4 grid" in markup_problems(text.replace("0015", "0016"), grid=4)[0][1]
    del vocabulary[patch_token(14)]
    problems = markup_problems(text.replace("0015", "0014"), grid=4, vocabulary=vocabulary.get)
    assert problems == [(44, "'<patch_index_0014>' is not in this model's vocabulary")]


def test_markup_problems_of_generated_text_to_draw():
    from kosmos2.grounding import markup_problems

    # generated text: only what follows the last </image> counts, and layout tokens are not errors
    text = "<s><image>x</image><grounding> a <phrase>b</phrase>"
    text += "<object><patch_index_0001><patch_index_0034></object></s>"
    assert markup_problems(text, prompt=False) == []
    assert markup_problems(text, prompt=True)  # as a prompt, <s> and <image> are refused
