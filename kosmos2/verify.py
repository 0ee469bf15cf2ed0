"""Checking a located box against the expression with the model's own answers about boxes.

A model that answers questions about a marked box ("What color is this object?" with the box in the
prompt: grounded VQA) can check a REC answer: ask it the questions whose answers the expression names and
read the probability it gives to the named answer. "the green triangle" located on a green square gets
p(shape = triangle) near 0, whatever the location tokens' probabilities said. `Predictor.locate` does this
for a model with `BoxQuestions` (the built-in default model: size, colour, shape) and an expression made of
their answers, with at most one spatial qualifier:

    the [size] [colour] (shape | object) [on the left | on the right | at the top | at the bottom]
    the [size] [colour] (shape | object) (left of | right of | above | below) the <description>

Proposals. The objects the head description ("the red circle") might mean are found by the model's own REC
answers: to the head itself and to the head with each extreme added ("the red circle on the left", …, which
the model was trained to resolve), plus the original answer; the same for a relation's landmark. Boxes
overlapping with IoU >= 0.5 are one object.

Scores. match(box) = the smallest, over the attributes the description names, of p(named answer | box),
the next-token distribution after the question restricted to the kind's answers (each one token). A
candidate's score then follows the qualifier:
    none       match(box)
    extreme    match(box) for the member (match >= 0.5) decisively most extreme (by EXTREME_GAP of the
               image side); members beaten, or all members when none is decisive, keep match(box) too, so
               an undecided extreme reads as ambiguous; beaten members get 0
    relation   match(box) * max over landmark proposals L (not the same object) of match(L) where
               "box rel L" holds (centre gap >= RELATION_GAP * the mean of the two sides on that axis)
`found` = the best candidate's score; `ambiguity` = the second best's (0 with one candidate).
Geometry is in normalised coordinates. Everything here but `check` (the model calls) is torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from kosmos2 import grounding

EXTREMES = ("on the left", "on the right", "at the top", "at the bottom")
RELATIONS = ("left of", "right of", "above", "below")
EXTREME_GAP = 0.075  # the extreme member's centre leads the next member's by this much (of the side)
RELATION_GAP = 0.35  # "A left of B": B.cx - A.cx >= this x (A.w + B.w) / 2 (likewise on the y axis)
MEMBER = 0.5  # a proposal whose match reaches this fits the description (for extremes)
SAME_OBJECT_IOU = 0.5
BOX_PHRASE = " this object"  # the phrase of a box question that carries the box


@dataclass(frozen=True)
class BoxQuestions:
    """Questions a model answers about a marked box, the answers each can have, and the word for "any
    object" in its expressions. Answers are single tokens of the model's vocabulary."""

    questions: Mapping[str, str]  # kind -> question with BOX_PHRASE: "color" -> "What color is this object?"
    answers: Mapping[str, tuple[str, ...]]  # kind -> its answers, e.g. "color" -> ("red", "green", ...)
    noun: str = "object"
    nouns: tuple[str, ...] = ()  # the kind whose answers are nouns (the last word): e.g. ("shape",)

    def kind_of(self, word: str) -> str | None:
        for kind, answers in self.answers.items():
            if word in answers:
                return kind
        return None


def synthetic_questions() -> BoxQuestions:
    """The built-in default model's box questions: the synthetic world's size, colour and shape."""
    from kosmos2.data import synthetic as world

    kinds = ("size", "color", "shape")
    return BoxQuestions(
        questions={k: world.GROUNDED_QUESTIONS[k] for k in kinds},
        answers={"size": tuple(world.SIZES), "color": tuple(world.COLOURS), "shape": tuple(world.SHAPES)},
        noun="object",
        nouns=("shape",),
    )


@dataclass(frozen=True)
class Description:
    """A noun phrase of attributes: "large red circle" -> (("size", "large"), ("color", "red"), ...)."""

    words: str
    attributes: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Expression:
    head: Description
    extreme: str | None = None
    relation: str | None = None
    landmark: Description | None = None

    def descriptions(self) -> list[Description]:
        return [self.head] + ([self.landmark] if self.landmark is not None else [])


def _description(words: list[str], q: BoxQuestions) -> Description | None:
    if not words:
        return None
    attributes: dict[str, str] = {}
    for i, w in enumerate(words):
        if w == q.noun and i == len(words) - 1:
            continue
        kind = q.kind_of(w)
        if kind is None or kind in attributes:
            return None
        if kind in q.nouns and i != len(words) - 1:
            return None  # a noun ends the phrase
        attributes[kind] = w
    if not attributes or (words[-1] != q.noun and q.kind_of(words[-1]) not in q.nouns):
        return None
    return Description(" ".join(words), tuple(attributes.items()))


def _strip_article(words: list[str]) -> list[str]:
    return words[1:] if words and words[0] in ("the", "a", "an") else words


def parse_expression(text: str, q: BoxQuestions) -> Expression | None:
    """The expression's head description and qualifier, or None when it is not made of `q`'s answers and
    one qualifier (then `locate` falls back to its other signals)."""
    words = _strip_article(text.lower().strip().rstrip(".?!").split())
    joined = " ".join(words)
    for where in EXTREMES:
        if joined.endswith(" " + where):
            head = _description(joined[: -len(where) - 1].split(), q)
            return None if head is None else Expression(head, extreme=where)
    for rel in RELATIONS:
        key = f" {rel} "
        if key in f" {joined} ":
            left, _, right = f" {joined} ".partition(key)
            head = _description(left.split(), q)
            landmark = _description(_strip_article(right.split()), q)
            if head is None or landmark is None:
                return None
            return Expression(head, relation=rel, landmark=landmark)
    head = _description(words, q)
    return None if head is None else Expression(head)


def rewrites(d: Description) -> list[str]:
    """The REC expressions whose answers propose the objects description `d` might mean."""
    return [f"the {d.words}"] + [f"the {d.words} {where}" for where in EXTREMES]


def _centre(box: Sequence[float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def holds(a: Sequence[float], b: Sequence[float], rel: str) -> bool:
    """Whether "a rel b" ("left of", "right of", "above", "below") holds for normalised boxes a, b."""
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    if rel in ("left of", "right of"):
        gap = bx - ax if rel == "left of" else ax - bx
        side = ((a[2] - a[0]) + (b[2] - b[0])) / 2
    else:
        gap = by - ay if rel == "above" else ay - by
        side = ((a[3] - a[1]) + (b[3] - b[1])) / 2
    return gap >= RELATION_GAP * side


def _extreme_key(box: Sequence[float], where: str) -> float:
    x, y = _centre(box)
    return {"on the left": x, "on the right": -x, "at the top": y, "at the bottom": -y}[where]


T = TypeVar("T")


def distinct(items: Sequence[T], box: Callable[[T], grounding.Box]) -> list[T]:
    """The items in order, dropping any whose box overlaps an earlier one's with IoU >= SAME_OBJECT_IOU."""
    out: list[T] = []
    for item in items:
        if all(grounding.iou(box(item), box(o)) < SAME_OBJECT_IOU for o in out):
            out.append(item)
    return out


@dataclass
class Checked:
    """The outcome for one expression: candidate boxes with their scores, best first (ties keep
    proposal order), and the found / ambiguity scores."""

    boxes: list[grounding.Box] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    box_scores: list[float | None] = field(default_factory=list)  # each box's location score, if known

    @property
    def order(self) -> list[int]:
        """The order to offer the boxes in: by score x location score (a partial box of a matching object
        matches as well as the whole one; the model's location tokens are less sure of it)."""
        known = self.box_scores or [None] * len(self.boxes)
        return sorted(range(len(self.boxes)), key=lambda k: -self.scores[k] * (known[k] or 1.0))

    @property
    def found(self) -> float:
        return self.scores[0] if self.scores else 0.0

    @property
    def ambiguity(self) -> float:
        return self.scores[1] if len(self.scores) > 1 else 0.0


def combine(
    e: Expression,
    head: Sequence[tuple[grounding.Box, float]],
    landmark: Sequence[tuple[grounding.Box, float]] = (),
) -> Checked:
    """Candidate scores from the head proposals' matches (and the landmark's) and the qualifier."""
    scores = [m for _, m in head]
    if e.extreme is not None:
        members = [i for i, (_, m) in enumerate(head) if m >= MEMBER]
        if len(members) >= 2:
            order = sorted(members, key=lambda i: _extreme_key(head[i][0], e.extreme))
            gap = _extreme_key(head[order[1]][0], e.extreme) - _extreme_key(head[order[0]][0], e.extreme)
            if gap >= EXTREME_GAP:
                for i in order[1:]:
                    scores[i] = 0.0
    elif e.relation is not None:
        for i, (box, m) in enumerate(head):
            support = [
                lm
                for lbox, lm in landmark
                if grounding.iou(box, lbox) < SAME_OBJECT_IOU and holds(box, lbox, e.relation)
            ]
            scores[i] = m * max(support, default=0.0)
    order = sorted(range(len(head)), key=lambda i: -scores[i])
    return Checked([head[i][0] for i in order], [scores[i] for i in order])


# -- the model calls (Predictor.locate) ------------------------------------------------------------------


def check(predictor, results: Sequence, embeds, expressions: Sequence[str]) -> list[Checked | None]:
    """For each REC result (its image's embedding is `embeds[i]`), the Checked outcome of its expression,
    or None when the expression does not parse. One greedy REC pass over every proposal prompt (with the
    scoring pass when the predictor scores), and one prefill over every (box, question)."""
    import torch

    from kosmos2.generate import generate, token_logprobs

    q: BoxQuestions = predictor.box_questions
    tok = predictor.tokenizer
    parsed = [parse_expression(e, q) for e in expressions]
    # 1. proposals: the model's REC answers to each description and its extreme rewrites
    jobs = [(i, d, text) for i, e in enumerate(parsed) if e is not None for d in e.descriptions()
            for text in rewrites(d)]  # fmt: skip
    proposals: dict[tuple[int, Description], list[tuple[grounding.Box, float | None]]] = {}
    for i, e in enumerate(parsed):
        first = results[i].entities[0] if results[i].entities else None
        if e is not None and first is not None and first.boxes:  # the answer itself, first
            score = first.scores[0] if first.scores else None
            proposals[(i, e.head)] = [(first.boxes[0], score)]
    cfg = predictor._options({"max_new_tokens": 12, "do_sample": False, "num_beams": 1}, {})
    for start in range(0, len(jobs), 64):
        part = jobs[start : start + 64]
        prompts = [
            f"{grounding.GROUNDING}{grounding.PHRASE_START} {t}{grounding.PHRASE_END}" for _, _, t in part
        ]
        rows = embeds[[i for i, _, _ in part]]
        batch = tok.batch_encode(prompts, num_image_tokens=predictor.num_image_tokens)
        batch = {k: v.to(predictor.device) for k, v in batch.items()}
        ids, mask, image_mask = batch["input_ids"], batch["attention_mask"], batch["image_mask"]
        new = generate(predictor.model, ids, mask, rows, image_mask, cfg)
        logprobs = (
            token_logprobs(predictor.model, ids, mask, rows, image_mask, new)
            if predictor.scores
            else [None] * len(new)
        )
        for (i, d, _), p, n, lp in zip(part, prompts, new, logprobs, strict=True):
            r = predictor._result(p, n, results[i].image_size, lp)
            for ent in r.entities[:1]:
                for k, box in enumerate(ent.boxes[:1]):
                    s = ent.scores[k] if ent.scores and k < len(ent.scores) else None
                    proposals.setdefault((i, d), []).append((box, s))
    for key, found in proposals.items():
        proposals[key] = distinct(found, box=lambda proposal: proposal[0])
    # 2. match(box): p(named answer | box, question), the smallest over the named attributes
    asks = [(key, j, kind, value) for key, found in proposals.items() for j in range(len(found))
            for kind, value in key[1].attributes]  # fmt: skip
    answer_ids = {k: [tok.encode(a)[0] for a in answers] for k, answers in q.answers.items()}
    probs: list[float] = []
    for start in range(0, len(asks), 128):
        part = asks[start : start + 128]
        prompts = []
        for key, j, kind, _ in part:
            question = f"Question: {q.questions[kind]} Answer:"
            at = question.index(BOX_PHRASE)  # the phrase takes its leading space (SPEC §1)
            box = proposals[key][j][0]
            prompts.append(
                f"{grounding.GROUNDING} " + grounding.markup(question, [(at, at + len(BOX_PHRASE), [box])])
            )
        logp = predictor._next_logp(embeds[[key[0] for key, _, _, _ in part]], prompts)
        for row, (_, _, kind, value) in enumerate(part):
            choice = torch.softmax(logp[row, answer_ids[kind]].float(), dim=-1)
            probs.append(float(choice[q.answers[kind].index(value)]))
    match: dict[tuple[tuple[int, Description], int], float] = {}
    for (key, j, _, _), p in zip(asks, probs, strict=True):
        match[(key, j)] = min(match.get((key, j), 1.0), p)
    out: list[Checked | None] = []
    for i, e in enumerate(parsed):
        if e is None or (i, e.head) not in proposals:
            out.append(None)
            continue
        head = [(b, match[((i, e.head), j)]) for j, (b, _) in enumerate(proposals[(i, e.head)])]
        landmark = (
            [(b, match[((i, e.landmark), j)]) for j, (b, _) in enumerate(proposals.get((i, e.landmark), []))]
            if e.landmark is not None
            else []
        )
        c = combine(e, head, landmark)
        box_scores = {tuple(b): s for b, s in proposals[(i, e.head)]}
        c.box_scores = [box_scores.get(tuple(b)) for b in c.boxes]
        out.append(c)
    return out
