"""Grounded markup: boxes <-> location tokens, writing markup into captions, parsing generated text.

Kosmos-2 links phrases to boxes with tags written into ordinary text (SPEC §4):

    An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> warming

The image is a P×P grid (P = 32, cell index = row·P + col); a box (x1, y1, x2, y2), normalised to [0, 1],
is the pair of cells holding its upper-left and lower-right corners. Several boxes for one phrase share one
`<object>`, separated by `</delimiter_of_multi_objects/>`. This module is the only place that reads or
writes that markup; training data, the predictor, the evaluator and the server all call it. It uses only
the standard library.

    box_to_tokens / tokens_to_box     one box <-> (ul, lr) cell indices
    object_markup / markup            boxes and caption spans -> grounded text
    parse                             generated text -> Grounded(caption, entities); never raises on a string
    box_to_pixels / box_to_normalized / iou    box helpers for the predictor and the evaluator

`parse` reproduces transformers' `Kosmos2Processor.post_process_generation` on well-formed text; its
docstring lists where it deliberately differs on malformed text.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

GRID = 32  # cells per side: 32 × 32 = 1024 location tokens
# Normalised coordinates this far outside [0, 1] (pixel rounding) are clamped; further out is an error.
BOX_TOLERANCE = 0.01

Box = tuple[float, float, float, float]  # normalised x1, y1, x2, y2 (or pixels, where a function says so)

# The Kosmos-2 tag tokens, in vocabulary order (ids 64002…64012, SPEC §2).
DOC_END = "</doc>"
IMAGE_START = "<image>"
IMAGE_END = "</image>"
CHUNK_END = "</chunk>"
LINE_END = "</line>"
PHRASE_START = "<phrase>"
PHRASE_END = "</phrase>"
OBJECT_START = "<object>"
OBJECT_END = "</object>"
DELIMITER = "</delimiter_of_multi_objects/>"
GROUNDING = "<grounding>"
TAG_TOKENS = (
    DOC_END,
    IMAGE_START,
    IMAGE_END,
    CHUNK_END,
    LINE_END,
    PHRASE_START,
    PHRASE_END,
    OBJECT_START,
    OBJECT_END,
    DELIMITER,
    GROUNDING,
)
# The fairseq special tokens of the base vocabulary; decoded text may carry them, so parse removes them too.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")

# Every token parse treats as markup: the tags above and `<patch_index_N>` (group 1 holds N's digits). Each
# token starts with "<", ends with ">" and has no other "<" or ">", so text and inserted tags never merge.
_TOKEN_RE = re.compile(
    "|".join(re.escape(t) for t in TAG_TOKENS + SPECIAL_TOKENS) + r"|<patch_index_([0-9]+)>"
)


def patch_token(index: int) -> str:
    """The location token of grid cell `index`: 42 -> "<patch_index_0042>" (at least four digits)."""
    index = _as_int(index, "patch index")
    if index < 0:
        raise ValueError(f"patch index {index} is negative; cell indices are row * grid + col, from 0")
    return f"<patch_index_{index:04d}>"


# ----------------------------------------------------------------------------------------------------------
# One box <-> two cell indices


def box_to_tokens(box: Sequence[float], grid: int = GRID) -> tuple[int, int]:
    """Cell indices (upper-left, lower-right) of a normalised box (x1, y1, x2, y2), SPEC §4.

    col1 = floor(x1·P), row1 = floor(y1·P), col2 = ceil(x2·P − 1), row2 = ceil(y2·P − 1): a corner lying
    exactly on a cell edge belongs to the cell it closes (x2 = 0.5 ends in column 15, not 16), as in
    transformers. Coordinates up to BOX_TOLERANCE outside [0, 1] are clamped into the grid; anything else
    invalid (wrong length, non-finite, empty or inverted, out of range) raises ValueError.
    """
    grid = _check_grid(grid)
    x1, y1, x2, y2 = _normalised_box(box)
    if not (x2 > x1 and y2 > y1):
        raise ValueError(
            f"box {(x1, y1, x2, y2)!r} is empty or inverted: need x2 > x1 and y2 > y1, in the order "
            "(x1, y1, x2, y2) (not x, y, width, height)"
        )
    col1 = _clamp(math.floor(x1 * grid), 0, grid - 1)
    row1 = _clamp(math.floor(y1 * grid), 0, grid - 1)
    # x2 > x1 implies col2 >= col1 in exact arithmetic; max() keeps it so where x·P rounds (grid not 2^k)
    col2 = max(col1, _clamp(math.ceil(x2 * grid - 1), 0, grid - 1))
    row2 = max(row1, _clamp(math.ceil(y2 * grid - 1), 0, grid - 1))
    return row1 * grid + col1, row2 * grid + col2


def tokens_to_box(ul: int, lr: int, grid: int = GRID) -> Box:
    """The normalised box (x1, y1, x2, y2) of an (upper-left, lower-right) cell pair, SPEC §4.

    Corners in different rows and different columns decode to the cell centres; corners in the same cell, row
    or column decode to the cell borders (otherwise the box would have zero width or height). Raises
    ValueError for an index outside [0, grid²) or a lower-right cell above or left of the upper-left one.
    """
    grid = _check_grid(grid)
    ul = _as_int(ul, "upper-left patch index")
    lr = _as_int(lr, "lower-right patch index")
    for name, index in (("upper-left", ul), ("lower-right", lr)):
        if not 0 <= index < grid * grid:
            raise ValueError(
                f"{name} patch index {index} is outside [0, {grid * grid}) for a {grid}×{grid} grid; "
                "pass indices produced by box_to_tokens with the same grid"
            )
    row1, col1 = divmod(ul, grid)
    row2, col2 = divmod(lr, grid)
    if row2 < row1 or col2 < col1:
        raise ValueError(
            f"patch indices ({ul}, {lr}) put the lower-right cell (row {row2}, col {col2}) above or left of "
            f"the upper-left cell (row {row1}, col {col1}); pass them as (upper-left, lower-right)"
        )
    if row1 != row2 and col1 != col2:
        return (col1 + 0.5) / grid, (row1 + 0.5) / grid, (col2 + 0.5) / grid, (row2 + 0.5) / grid
    return col1 / grid, row1 / grid, (col2 + 1) / grid, (row2 + 1) / grid


# ----------------------------------------------------------------------------------------------------------
# Writing markup


def object_markup(boxes: Sequence[Sequence[float]], grid: int = GRID) -> str:
    """`<object><ul><lr></delimiter_of_multi_objects/><ul><lr>…</object>` for one or more normalised boxes.

    Raises ValueError for an empty list, a single box not wrapped in a list, or a bad box.
    """
    if isinstance(boxes, (str, bytes)) or not isinstance(boxes, Iterable):
        raise ValueError(f"boxes {boxes!r} must be a list of boxes (x1, y1, x2, y2)")
    boxes = list(boxes)
    if not boxes:
        raise ValueError("an <object> needs at least one box; leave the phrase unmarked instead")
    if len(boxes) == 4 and all(_is_number(v) for v in boxes):
        raise ValueError(f"boxes {tuple(boxes)!r} looks like a single box; pass a list of boxes: [box]")
    pairs = []
    for box in boxes:
        ul, lr = box_to_tokens(box, grid)
        pairs.append(patch_token(ul) + patch_token(lr))
    return OBJECT_START + DELIMITER.join(pairs) + OBJECT_END


def markup(caption: str, spans: Iterable[Sequence], grid: int = GRID) -> str:
    """Grounded text: `caption` with each span wrapped in phrase tags and followed by its boxes.

    spans: (char_start, char_end, [box, ...]) with end exclusive, boxes normalised. Tags are inserted at
    exactly these offsets and nothing else changes ("of <phrase>a dog</phrase><object>…</object>"), so
    parse(markup(c, spans)).caption == c.strip() and each phrase comes back as c[start:end].strip(). A span
    with start == end is a phrase-less object: `<object>…</object>` inserted at that offset, which parse
    reports as one entity per box, named the way transformers names it ("<patch_index_44><patch_index_863>").

    Spans may come in any order (they are sorted by start, then end; phrase-less objects at one offset keep
    their order). Raises ValueError for a caption that already contains markup tokens, a span out of range,
    overlapping another or covering only whitespace, a span without boxes, or a bad box. `<grounding>` is
    not added: prepend it.
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a str, got {type(caption).__name__}")
    found = _TOKEN_RE.search(caption)
    if found:
        raise ValueError(
            f"caption already contains the markup token {found.group(0)!r} at offset {found.start()}, which "
            "parse would read as a tag; pass plain text (parse(text).caption strips markup)"
        )
    checked = []
    for number, span in enumerate(spans):
        if isinstance(span, (str, bytes)) or not isinstance(span, Sequence) or len(span) != 3:
            raise ValueError(f"span {number} {span!r} must be (char_start, char_end, [box, ...])")
        start = _as_int(span[0], f"span {number} start")
        end = _as_int(span[1], f"span {number} end")
        if not 0 <= start <= end <= len(caption):
            raise ValueError(
                f"span {number} ({start}, {end}) is not a range inside the caption of {len(caption)} "
                "characters; need 0 <= start <= end <= len(caption), end exclusive"
            )
        if start < end and not caption[start:end].strip():
            raise ValueError(
                f"span {number} ({start}, {end}) covers only whitespace {caption[start:end]!r}; a phrase "
                "needs visible text (use start == end for an object without a phrase)"
            )
        try:
            objects = object_markup(span[2], grid)
        except ValueError as err:
            raise ValueError(f"span {number} ({start}, {end}) {caption[start:end]!r}: {err}") from None
        checked.append((start, end, number, objects))

    # sort is stable: phrase-less objects at one offset keep their order
    checked.sort(key=lambda item: (item[0], item[1]))
    parts = []
    cursor = 0  # caption[:cursor] is written; it is also the furthest end so far, since spans may not overlap
    previous = None
    for start, end, number, objects in checked:
        if start < cursor:
            first, last, other = previous
            fix = (
                "give the phrase one span with all its boxes"
                if (start, end) == (first, last)
                else "keep one of the two spans"
            )
            raise ValueError(
                f"span {number} ({start}, {end}) {caption[start:end]!r} overlaps span {other} ({first}, "
                f"{last}) {caption[first:last]!r}: phrases cannot nest; {fix}"
            )
        parts.append(caption[cursor:start])
        if end > start:
            parts.append(PHRASE_START + caption[start:end] + PHRASE_END)
        parts.append(objects)
        cursor = end
        previous = (start, end, number)
    parts.append(caption[cursor:])
    return "".join(parts)


# ----------------------------------------------------------------------------------------------------------
# Parsing generated text


@dataclass
class Entity:
    """A grounded phrase: its text, its [start, end) span in the caption, and its normalised boxes."""

    phrase: str
    span: tuple[int, int]
    boxes: list[Box] = field(default_factory=list)


@dataclass
class Grounded:
    """Parsed grounded text: the caption without markup and its entities in order of appearance."""

    caption: str
    entities: list[Entity] = field(default_factory=list)


def parse(text: str, grid: int = GRID) -> Grounded:
    """Caption and entities of generated grounded text; never raises on a string.

    Same result as transformers' `Kosmos2Processor.post_process_generation` on well-formed text:
    - only the text after the last `</image>` counts;
    - the caption is that text with every markup token removed, then stripped of outer whitespace;
    - `<phrase>P</phrase><object>…</object>` gives Entity(P.strip(), span, boxes), where span indexes
      P.strip() inside the caption; P must be non-empty and contain no markup token;
    - an `<object>` with no phrase right before it gives one entity per box, named
      "<patch_index_UL><patch_index_LR>" with the indices as plain integers (transformers' naming), and the
      empty span at the object's offset;
    - a phrase not followed by an `<object>`, an unclosed phrase or object, and any other malformed markup
      yield no entity (their tags are still removed from the caption).

    Where the reference is wrong or brittle on malformed text, this parser instead:
    - removes only Kosmos-2 vocabulary tokens (the tags, `<s> <pad> </s> <unk> <mask>`, `<patch_index_N>`
      with ASCII digits); transformers deletes every `<…>` run, eating text such as "x <3 y<phrase>";
    - allows whitespace between `</phrase>` and `<object>` and between the tokens inside an object (the
      tokenizer swallows whitespace before a tag, so the tokens are the same); transformers finds no entity
      there. The whitespace stays in the caption, as transformers leaves it;
    - checks each box of an object on its own and keeps the valid ones: a group that is not exactly two
      location tokens, an index >= grid² or a lower-right cell above or left of the upper-left one is
      dropped, and an entity left without boxes is dropped. transformers drops the whole object if one group
      is malformed, and returns out-of-image or inverted boxes for bad indices;
    - clamps spans into the caption: transformers returns negative spans for an object in leading whitespace
      (`<grounding><object>…</object> A dog`) and spans past the end for one in trailing whitespace;
    - gives a whitespace-only phrase the name "" and an empty span (transformers: end before start);
    - treats an index of more than 12 digits as out of range (transformers' int() raises past 4300 digits).
    """
    grid = _check_grid(grid)
    if not isinstance(text, str):
        raise ValueError(f"parse needs the generated text as a str, got {type(text).__name__}")
    cut = text.rfind(IMAGE_END)
    if cut >= 0:
        text = text[cut + len(IMAGE_END) :]

    parts: list[str] = []  # the caption before stripping: every text piece between tokens
    length = 0  # len("".join(parts))
    found: list[tuple[int, int, list[list[str]], bool]] = []  # closed objects: start, end, groups, has_phrase
    phrase_start = None  # offset where an open <phrase>'s text begins
    phrase = None  # (start, end) of a closed, non-empty phrase that an <object> may still claim
    groups = None  # inside an <object>: the location-token groups so far, each a list of digit strings
    object_span = (0, 0)  # the claimed phrase's span, or twice the object's offset if it has no phrase
    object_has_phrase = False

    position = 0
    for token in _TOKEN_RE.finditer(text):
        piece = text[position : token.start()]  # the text before this token
        if piece:
            if not piece.isspace():
                groups = None  # text inside <object>…</object>: not an object
                phrase = None  # text between </phrase> and <object>: the phrase has no object
            parts.append(piece)
            length += len(piece)
        position = token.end()
        tag, digits = token.group(0), token.group(1)

        if groups is not None:
            if digits is not None:
                groups[-1].append(digits)
                continue
            if tag == DELIMITER:
                groups.append([])
                continue
            if tag == OBJECT_END:
                found.append((*object_span, groups, object_has_phrase))
                groups = None
                continue
            groups = None  # any other token breaks the object; it is then read as usual below

        if tag == PHRASE_START:
            phrase_start, phrase = length, None
        elif tag == PHRASE_END:
            phrase = (phrase_start, length) if phrase_start is not None and length > phrase_start else None
            phrase_start = None
        elif tag == OBJECT_START:
            groups = [[]]
            object_has_phrase = phrase is not None
            object_span = phrase if phrase is not None else (length, length)
            phrase_start = phrase = None
        else:  # any other token ends an open phrase and orphans a closed one
            phrase_start = phrase = None
    parts.append(text[position:])

    raw = "".join(parts)
    caption = raw.strip()
    lead = len(raw) - len(raw.lstrip())  # offsets in `raw` minus `lead` are offsets in `caption`

    def clamp(offset: int) -> int:
        return _clamp(offset - lead, 0, len(caption))

    entities = []
    for start, end, digit_groups, has_phrase in found:
        decoded = []  # (ul, lr, box) for each valid group
        for group in digit_groups:
            if len(group) != 2:
                continue
            ul, lr = _index(group[0]), _index(group[1])
            try:
                decoded.append((ul, lr, tokens_to_box(ul, lr, grid)))
            except ValueError:
                continue  # index >= grid² or inverted corners: not a box
        if not decoded:
            continue
        if not has_phrase:
            for ul, lr, box in decoded:
                name = f"<patch_index_{ul}><patch_index_{lr}>"  # transformers' name for a phrase-less box
                entities.append(Entity(name, (clamp(start), clamp(start)), [box]))
            continue
        words = raw[start:end]
        name = words.strip()
        if name:  # the stripped phrase's own offsets; always inside the caption
            span = (
                start + len(words) - len(words.lstrip()) - lead,
                end - (len(words) - len(words.rstrip())) - lead,
            )
        else:
            span = (clamp(start), clamp(start))
        entities.append(Entity(name, span, [box for _, _, box in decoded]))
    return Grounded(caption, entities)


# ----------------------------------------------------------------------------------------------------------
# Checking markup a person wrote (prompts, `kosmos2 draw` text)

# Anything shaped like a tag: `<phrase>`, `</phrase>`, `<patch_index_9999>`, `</delimiter_of_multi_objects/>`,
# `<Phrase>`, `<b>`. Those that are not Kosmos-2 tokens but resemble one are errors; the rest is plain text.
_TAGLIKE_RE = re.compile(r"</?[A-Za-z][A-Za-z0-9_]*/?>")
_TAG_NAMES = {t.strip("</>").lower(): t for t in TAG_TOKENS}
# Tokens a prompt must not contain: the predictor writes the image part and the sequence ends itself.
_LAYOUT_TOKENS = (DOC_END, IMAGE_START, IMAGE_END, *SPECIAL_TOKENS)


def markup_problems(
    text: str, grid: int = GRID, vocabulary: Callable[[str], object] | None = None, prompt: bool = True
) -> list[tuple[int, str]]:
    """Every problem of hand-written grounded markup, as (character offset, message); [] when it is sound.

    Checked: each tag-shaped `<...>` that resembles a Kosmos-2 token is one exactly (`<patch_index_12>`,
    `<Phrase>` are not); location tokens lie on the grid (index < grid²) and, with `vocabulary` (a
    token -> id lookup such as `Kosmos2Tokenizer.token_to_id`, None for absent tokens), in the model's
    vocabulary; `<phrase>` … `</phrase>` pairs are closed, not nested and not empty; an `<object>` holds only
    (upper-left, lower-right) pairs of location tokens separated by the delimiter, each a valid box, and is
    closed; location tokens and delimiters appear only inside an object. prompt=True (a prompt): `<grounding>`
    must open the text and the layout tokens (`<image>`, `</image>`, `</doc>`, `<s>`, `</s>`, `<pad>`, …) are
    refused, since the predictor writes them; prompt=False (generated text to draw): only the text after the
    last `</image>` is read, as `parse` does, and layout tokens are ignored.
    """
    grid = _check_grid(grid)
    if not isinstance(text, str):
        return [(0, f"expected a str, got {type(text).__name__}")]
    base = 0
    if not prompt and text.rfind(IMAGE_END) >= 0:
        base = text.rfind(IMAGE_END) + len(IMAGE_END)
    problems: list[tuple[int, str]] = []
    tokens: list[tuple[int, str, int | None]] = []  # (offset, token, patch index or None)
    for m in _TAGLIKE_RE.finditer(text, base):
        token, at = m.group(0), m.start()
        index = _patch_index(token)
        if index is not None:
            known = len(problems)
            if index >= grid * grid:
                problems.append(
                    (
                        at,
                        f"location token {token!r} is outside the {grid}×{grid} grid: cells run "
                        f"{patch_token(0)} … {patch_token(grid * grid - 1)}",
                    )
                )
            elif token != patch_token(index):
                problems.append((at, f"{token!r} is not a location token: write {patch_token(index)!r}"))
            elif vocabulary is not None and vocabulary(token) is None:
                problems.append((at, f"{token!r} is not in this model's vocabulary"))
            tokens.append((at, token, index if len(problems) == known else -1))  # -1: reported
            continue
        if token in TAG_TOKENS or token in SPECIAL_TOKENS:
            if vocabulary is not None and token in TAG_TOKENS and vocabulary(token) is None:
                problems.append((at, f"{token!r} is not in this model's vocabulary"))
            elif token in _LAYOUT_TOKENS:
                if prompt:
                    problems.append(
                        (at, f"{token!r} belongs to the prompt layout, which the predictor writes; remove it")
                    )
            else:
                tokens.append((at, token, None))
            continue
        name = token.strip("</>").lower()
        near = (token.lower() if token.lower() in TAG_TOKENS else _TAG_NAMES.get(name)) or (
            patch_token(0)
            if name.startswith("patch")
            else DELIMITER
            if name.startswith("delimiter")
            else None
        )
        if near is not None:
            problems.append((at, f"{token!r} is not a Kosmos-2 tag (tags are lower case, e.g. {near!r})"))
    problems += _structure_problems(text, base, tokens, grid, prompt)
    return sorted(problems, key=lambda problem: problem[0])  # stable: a token's own problem first


def check_prompt(text: str, grid: int = GRID, vocabulary: Callable[[str], object] | None = None) -> str:
    """Return `text` if its markup is sound (see `markup_problems`), else raise PromptError naming the
    first problem and its character offset."""
    from kosmos2.errors import PromptError

    problems = markup_problems(text, grid, vocabulary, prompt=True)
    if problems:
        at, message = problems[0]
        more = (
            f" (and {len(problems) - 1} more problem{'s' * (len(problems) > 2)})" if len(problems) > 1 else ""
        )
        shown = text if len(text) <= 120 else text[:117] + "..."
        raise PromptError(f"prompt {shown!r}: at character {at}: {message}{more}")
    return text


def _patch_index(token: str) -> int | None:
    """N of a tag-shaped `<patch_index_N>` (any digits), else None."""
    m = re.fullmatch(r"<patch_index_([0-9]+)>", token)
    return _index(m.group(1)) if m else None


def _structure_problems(
    text: str, base: int, tokens: list[tuple[int, str, int | None]], grid: int, prompt: bool
) -> list[tuple[int, str]]:
    """Pairing and nesting of phrase and object tags; the contents of objects."""
    problems: list[tuple[int, str]] = []
    phrase_at: int | None = None  # offset of the open <phrase>
    object_at: int | None = None  # offset of the open <object>
    groups: list[list[tuple[int, int]]] = []  # inside an object: the (offset, index) groups so far
    cursor = base
    for at, token, index in tokens:
        between = text[cursor:at]
        cursor = at + len(token)
        if object_at is not None and between.strip():
            problems.append((cursor - len(token) - len(between), f"text {between.strip()!r} inside <object>"))
        if token == GROUNDING:
            if prompt and text[:at].strip():
                problems.append((at, f"{GROUNDING!r} must open the prompt"))
        elif token == PHRASE_START:
            if object_at is not None:
                problems.append((at, f"{PHRASE_START!r} inside the <object> opened at character {object_at}"))
            elif phrase_at is not None:
                problems.append((at, f"{PHRASE_START!r} inside the phrase opened at character {phrase_at}"))
            phrase_at = at
        elif token == PHRASE_END:
            if phrase_at is None:
                problems.append((at, f"{PHRASE_END!r} closes no {PHRASE_START}"))
            elif not text[phrase_at + len(PHRASE_START) : at].strip():
                problems.append(
                    (phrase_at, "empty <phrase></phrase>: put the words to ground between the tags")
                )
            phrase_at = None
        elif token == OBJECT_START:
            if phrase_at is not None:
                problems.append((at, f"{OBJECT_START!r} inside the phrase opened at character {phrase_at}"))
                phrase_at = None
            if object_at is not None:
                problems.append((at, f"{OBJECT_START!r} inside the <object> opened at character {object_at}"))
            object_at, groups = at, [[]]
        elif index is not None or token == DELIMITER:
            if object_at is None:
                if index != -1:  # a bad location token is reported once, as itself
                    problems.append((at, f"{token!r} outside <object>…</object>"))
            elif token == DELIMITER:
                groups.append([])
            else:
                groups[-1].append((at, index))
        elif token == OBJECT_END:
            if object_at is None:
                problems.append((at, f"{OBJECT_END!r} closes no {OBJECT_START}"))
            else:
                problems += _object_problems(object_at, groups, grid)
            object_at = None
    if phrase_at is not None:
        problems.append((phrase_at, f"unclosed {PHRASE_START}: add {PHRASE_END} after its words"))
    if object_at is not None:
        problems.append((object_at, f"unclosed {OBJECT_START}: end it with {OBJECT_END}"))
    return problems


def _object_problems(at: int, groups: list[list[tuple[int, int]]], grid: int) -> list[tuple[int, str]]:
    problems = []
    for group in groups:
        if len(group) != 2:
            problems.append(
                (group[0][0] if group else at, f"an object's box is 2 location tokens, found {len(group)}")
            )
            continue
        (ul_at, ul), (_, lr) = group
        if ul < 0 or lr < 0:
            continue  # a bad location token, reported where it stands
        try:
            tokens_to_box(ul, lr, grid)
        except ValueError as e:
            problems.append((ul_at, str(e).split(";")[0]))
    return problems


# ----------------------------------------------------------------------------------------------------------
# Box helpers


def box_to_pixels(box: Sequence[float], width: float, height: float) -> Box:
    """A normalised box (x1, y1, x2, y2) in pixels of a `width` × `height` image (x times width, y height)."""
    width, height = _check_size(width, height)
    x1, y1, x2, y2 = _normalised_box(box)
    return x1 * width, y1 * height, x2 * width, y2 * height


def box_to_normalized(box: Sequence[float], width: float, height: float) -> Box:
    """A pixel box (x1, y1, x2, y2) of a `width` × `height` image, normalised: x over width, y over height.

    Not range-checked: detector boxes a little outside the image stay as they are (box_to_tokens clamps).
    """
    width, height = _check_size(width, height)
    x1, y1, x2, y2 = _finite_box(box)
    return x1 / width, y1 / height, x2 / width, y2 / height


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes in one coordinate system; 0.0 if both are empty.

    An inverted box (x2 < x1 or y2 < y1) has zero area. Continuous coordinates: no "+1" pixel convention.
    """
    ax1, ay1, ax2, ay2 = _finite_box(a)
    bx1, by1, bx2, by2 = _finite_box(b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - inter
    return inter / union if union > 0 else 0.0


# ----------------------------------------------------------------------------------------------------------
# Validation


def _clamp(value: int, low: int, high: int) -> int:
    return min(max(value, low), high)


def _index(digits: str) -> int:
    """The cell index written in a location token; an absurdly long number maps to a value past any grid."""
    significant = digits.lstrip("0") or "0"
    return int(significant) if len(significant) <= 12 else 10**12


def _is_number(value: object) -> bool:
    return not isinstance(value, (str, bytes)) and hasattr(type(value), "__float__")


def _as_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def _check_grid(grid: object) -> int:
    grid = _as_int(grid, "grid")
    if grid < 1:
        raise ValueError(f"grid {grid} must be a positive number of cells per side (Kosmos-2 uses {GRID})")
    return grid


def _finite_box(box: object) -> Box:
    """Four finite floats, or a ValueError naming the box."""
    if isinstance(box, (str, bytes)) or not isinstance(box, Iterable):
        raise ValueError(f"box {box!r} must be 4 numbers (x1, y1, x2, y2)")
    values = tuple(box)
    if len(values) != 4 or not all(_is_number(v) for v in values):
        raise ValueError(f"box {values!r} must be 4 numbers (x1, y1, x2, y2)")
    floats = tuple(float(v) for v in values)
    if not all(math.isfinite(v) for v in floats):
        raise ValueError(f"box {values!r} has a non-finite coordinate; every coordinate must be finite")
    return floats


def _normalised_box(box: object) -> Box:
    """A finite box inside [0, 1] up to BOX_TOLERANCE (not yet clamped), or a ValueError naming the box."""
    floats = _finite_box(box)
    if not all(-BOX_TOLERANCE <= v <= 1 + BOX_TOLERANCE for v in floats):
        raise ValueError(
            f"box {floats!r} has coordinates outside [0, 1]: boxes here are normalised (x1, y1, x2, y2); "
            "convert a pixel box with box_to_normalized(box, width, height)"
        )
    return floats


def _check_size(width: object, height: object) -> tuple[float, float]:
    sizes = []
    for name, value in (("width", width), ("height", height)):
        valid = not isinstance(value, bool) and _is_number(value) and math.isfinite(float(value))
        if not valid or float(value) <= 0:
            raise ValueError(f"image {name} {value!r} must be a positive finite number of pixels")
        sizes.append(float(value))
    return sizes[0], sizes[1]
