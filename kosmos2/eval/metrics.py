"""Box metrics of the official Kosmos-2 evaluation (SPEC §11): REC accuracy and phrase-grounding recall.

Everything here is plain Python on pixel boxes (x1, y1, x2, y2), with no model and no dataset in sight, so the
numbers can be checked by hand. IoU is `kosmos2.grounding.iou` (continuous coordinates, no +1 pixel). The
protocol follows the released evaluation scripts:

- A prediction is correct when IoU ≥ 0.5 (the paper writes "> 0.5"; the code compares with ≥).
- The predicted boxes of a query are those the model attached to the queried phrase, in the order generated.
  When there are none (nothing generated, markup that does not decode, boxes on another phrase) the query is
  scored with no box, that is IoU 0: a miss, never a skipped query.
- REC (RefCOCO/+/g), three variants reported separately:
  *first* (the official number) uses the first generated box; *any* takes the best of all generated boxes (an
  upper bound); *mean* averages the generated boxes coordinate-wise and scores that one box.
- Phrase grounding (Flickr30k Entities), ANY-box protocol: a phrase may have several ground-truth boxes and
  R@k counts it found when any of the first k generated boxes reaches IoU ≥ 0.5 with any of them.
  Several ground-truth boxes for a REC query are treated the same way (the best one counts).

For the synthetic world (kosmos2/eval/synthetic.py), beyond the official protocol:

- Text answers (REG, VQA, captions) are compared after `normalize_answer`: lower case, whitespace collapsed,
  trailing periods dropped.
- Grounded-caption entities are scored as (phrase, box) pairs: a predicted pair is a true positive when its
  phrase equals a ground-truth phrase after `normalize_answer` and its box is paired one-to-one (a maximum
  matching, `max_matching`) with a true box of that phrase at IoU ≥ 0.5. Precision counts over predicted
  pairs, recall over true pairs, both summed over all queries before dividing (micro average).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from kosmos2.grounding import iou

Box = tuple[float, float, float, float]  # x1, y1, x2, y2

IOU_THRESHOLD = 0.5
RECALL_KS = (1, 5, 10)


def best_iou(predicted: Sequence[Sequence[float]], truth: Sequence[Sequence[float]]) -> float:
    """Largest IoU between any predicted box and any ground-truth box; 0 when either list is empty."""
    return max((iou(p, t) for p in predicted for t in truth), default=0.0)


def mean_box(boxes: Sequence[Sequence[float]]) -> Box:
    """Coordinate-wise mean of one or more boxes (the REC "mean box" variant)."""
    if not boxes:
        raise ValueError("mean_box needs at least one box, got none")
    n = len(boxes)
    x1, y1, x2, y2 = (sum(float(b[i]) for b in boxes) / n for i in range(4))
    return (x1, y1, x2, y2)


def xywh_to_xyxy(box: Sequence[float]) -> Box:
    """COCO [x, y, width, height] → (x1, y1, x2, y2)."""
    x, y, w, h = (float(v) for v in box)
    return (x, y, x + w, y + h)


def check_box(box: Sequence[float], where: str) -> Box:
    """Validate a ground-truth box: 4 finite numbers with x2 > x1 and y2 > y1; the error names `where`."""
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: a box must be 4 numbers (x1, y1, x2, y2), got {box!r}") from e
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{where}: a box must be 4 finite numbers (x1, y1, x2, y2), got {box!r}")
    x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"{where}: box {box!r} has no area (need x2 > x1 and y2 > y1)")
    return values  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------------
# Per-query scores


@dataclass(frozen=True)
class RecScore:
    """IoUs of one REC query under the three variants, and whether the model produced any box at all."""

    iou_first: float
    iou_any: float
    iou_mean: float
    decoded: bool

    def correct(self, variant: str = "first", threshold: float = IOU_THRESHOLD) -> bool:
        return {"first": self.iou_first, "any": self.iou_any, "mean": self.iou_mean}[variant] >= threshold


def score_rec(predicted: Sequence[Sequence[float]], truth: Sequence[Sequence[float]]) -> RecScore:
    """Score one REC query. predicted: the generated boxes in order (may be empty); truth: ≥ 1 boxes."""
    if not truth:
        raise ValueError(
            "score_rec needs at least one ground-truth box; queries without one cannot be scored"
        )
    if not predicted:
        return RecScore(0.0, 0.0, 0.0, decoded=False)
    return RecScore(
        iou_first=best_iou(predicted[:1], truth),
        iou_any=best_iou(predicted, truth),
        iou_mean=best_iou([mean_box(predicted)], truth),
        decoded=True,
    )


def recall_ious(
    predicted: Sequence[Sequence[float]], truth: Sequence[Sequence[float]], ks: Sequence[int] = RECALL_KS
) -> dict[int, float]:
    """ANY-box IoU at each k: best IoU between the first k predicted boxes and any ground-truth box."""
    if not truth:
        raise ValueError(
            "recall_ious needs at least one ground-truth box; phrases without boxes are left out of the "
            "phrase-grounding evaluation"
        )
    return {k: best_iou(predicted[:k], truth) for k in ks}


# ------------------------------------------------------------------------------------------------------------
# Aggregates


def rec_summary(scores: Iterable[RecScore], threshold: float = IOU_THRESHOLD) -> dict[str, float | int]:
    """Accuracy (percent) of the first/any/mean variants, the undecodable count and the mean first-box IoU."""
    scores = list(scores)
    n = len(scores)
    if n == 0:
        return {"count": 0, "acc_first": 0.0, "acc_any": 0.0, "acc_mean": 0.0, "undecodable": 0, "miou": 0.0}
    return {
        "count": n,
        "acc_first": 100.0 * sum(s.correct("first", threshold) for s in scores) / n,
        "acc_any": 100.0 * sum(s.correct("any", threshold) for s in scores) / n,
        "acc_mean": 100.0 * sum(s.correct("mean", threshold) for s in scores) / n,
        "undecodable": sum(not s.decoded for s in scores),
        "miou": 100.0 * sum(s.iou_first for s in scores) / n,
    }


def recall_summary(
    items: Iterable[tuple[Mapping[int, float], Sequence[str]]],
    ks: Sequence[int] = RECALL_KS,
    threshold: float = IOU_THRESHOLD,
) -> dict[str, dict[str, float | int]]:
    """R@k (percent) over all phrases and per phrase type.

    items: (recall IoUs by k, the phrase's types) per phrase; a phrase with several types counts in each
    (as in the official script). Returns {"all": {"count": n, "R@1": ..}, "<type>": {...}, ...}.
    """
    hits: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    counts: dict[str, int] = defaultdict(int)
    for ious, types in items:
        for group in ("all", *types):
            counts[group] += 1
            for k in ks:
                hits[group][k] += ious[k] >= threshold
    out: dict[str, dict[str, float | int]] = {}
    for group in ["all", *sorted(g for g in counts if g != "all")]:
        n = counts.get(group, 0)
        row: dict[str, float | int] = {"count": n}
        for k in ks:
            row[f"R@{k}"] = 100.0 * hits[group][k] / n if n else 0.0
        out[group] = row
    return out


# ------------------------------------------------------------------------------------------------------------
# Text answers and grounded-caption entities (the synthetic world; not part of the official protocol)


def normalize_answer(text: str) -> str:
    """Text as exact-match scoring compares it: lower case, inner whitespace runs collapsed to one space,
    outer whitespace and trailing periods dropped ("The  red circle ." -> "the red circle")."""
    t = " ".join(text.lower().split())
    while t.endswith("."):
        t = t[:-1].rstrip()
    return t


def max_matching(
    predicted: Sequence[Sequence[float]], truth: Sequence[Sequence[float]], threshold: float = IOU_THRESHOLD
) -> int:
    """The largest number of one-to-one (predicted, true) box pairs whose IoU is ≥ threshold.

    A maximum bipartite matching by augmenting paths (Kuhn's algorithm). Exact, unlike pairing greedily by
    IoU, which can pair a predicted box with the one true box another prediction needed and so undercount.
    """
    edges = [[j for j, t in enumerate(truth) if iou(p, t) >= threshold] for p in predicted]
    owner = [-1] * len(truth)  # owner[j]: the predicted box paired with true box j, -1 while unpaired

    def augment(i: int, seen: set[int]) -> bool:
        for j in edges[i]:
            if j in seen:
                continue
            seen.add(j)
            if owner[j] < 0 or augment(owner[j], seen):
                owner[j] = i
                return True
        return False

    return sum(augment(i, set()) for i in range(len(predicted)))


@dataclass(frozen=True)
class PairCounts:
    """(phrase, box) pairs of one query: matched one-to-one, predicted, and in the ground truth."""

    matched: int
    predicted: int
    true: int


def entity_pair_counts(
    predicted: Sequence[tuple[str, Sequence[Sequence[float]]]],
    truth: Sequence[tuple[str, Sequence[Sequence[float]]]],
    threshold: float = IOU_THRESHOLD,
) -> PairCounts:
    """Score the entities of one grounded caption: each side a list of (phrase, boxes).

    Every box of an entity is one (phrase, box) pair. Pairs are grouped by normalised phrase
    (`normalize_answer`; entities repeating a phrase pool their boxes); within a phrase, predicted and true
    boxes are paired one-to-one (`max_matching`, IoU ≥ threshold). Boxes under a phrase the truth lacks, and
    extra boxes under a right phrase, are unmatched predicted pairs; true boxes nobody matched are misses.
    """
    groups: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for side, entities in ((0, predicted), (1, truth)):
        for phrase, boxes in entities:
            groups[normalize_answer(phrase)][side].extend(boxes)
    matched = sum(max_matching(p, t, threshold) for p, t in groups.values() if p and t)
    return PairCounts(
        matched=matched,
        predicted=sum(len(boxes) for _, boxes in predicted),
        true=sum(len(boxes) for _, boxes in truth),
    )


def precision_recall(counts: Iterable[PairCounts]) -> dict[str, float | int]:
    """Micro-averaged precision, recall and F1 over queries: pairs summed first, then divided.

    A denominator of 0 gives 0.0 (no predicted pairs: precision 0; no true pairs: recall 0).
    """
    matched = predicted = true = 0
    for c in counts:
        matched, predicted, true = matched + c.matched, predicted + c.predicted, true + c.true
    precision = matched / predicted if predicted else 0.0
    recall = matched / true if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "matched": matched,
        "predicted": predicted,
        "true": true,
    }


# ------------------------------------------------------------------------------------------------------------
# Past one threshold: accuracy over IoU thresholds, AP with the scores, the pointing game, calibration, AUROC
#
# Each query contributes its answer box's IoU with the truth (0 when it has none) and, where the model gave
# one, that box's score (kosmos2.predictor.EntityResult.scores). A query without a box is a miss at every
# threshold and takes no place in a ranking.

IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.50, 0.55, ..., 0.95 (COCO)
CALIBRATION_BINS = 10


def accuracy_over_thresholds(
    ious: Sequence[float], thresholds: Sequence[float] = IOU_THRESHOLDS
) -> dict[str, float]:
    """Acc@t for each threshold t (the share of queries with IoU ≥ t) and their mean, "mean" (COCO's
    0.5:0.95 averaging applied to accuracy). Keys: "0.50", "0.55", ..., "mean"."""
    n = len(ious)
    out = {f"{t:.2f}": (sum(i >= t for i in ious) / n if n else 0.0) for t in thresholds}
    out["mean"] = sum(out.values()) / len(thresholds) if thresholds else 0.0
    return out


def average_precision(
    scores: Sequence[float | None], hits: Sequence[bool], total: int | None = None
) -> float:
    """AP of answers ranked by score: all-point interpolated area under the precision-recall curve.

    scores[i], hits[i]: query i's answer score (None: no answer, left out of the ranking) and whether it is
    right. total: the number of true objects to recall (default: the number of queries, one object each).
    Ranks by score, highest first (ties keep the given order); precision at rank k = right answers among the
    first k / k, recall = right answers among the first k / total; AP = Σ_k (r_k − r_{k−1}) · max_{j ≥ k} p_j.
    """
    if len(scores) != len(hits):
        raise ValueError(f"average_precision: {len(scores)} scores but {len(hits)} hit flags")
    total = len(scores) if total is None else total
    ranked = sorted(
        ((s, h) for s, h in zip(scores, hits, strict=True) if s is not None), key=lambda sh: -sh[0]
    )
    if not total or not ranked:
        return 0.0
    precisions, recalls, right = [], [], 0
    for k, (_, hit) in enumerate(ranked, 1):
        right += bool(hit)
        precisions.append(right / k)
        recalls.append(right / total)
    for k in range(len(precisions) - 2, -1, -1):  # the envelope: best precision at this recall or beyond
        precisions[k] = max(precisions[k], precisions[k + 1])
    ap, previous = 0.0, 0.0
    for p, r in zip(precisions, recalls, strict=True):
        ap += (r - previous) * p
        previous = r
    return ap


def ap_over_thresholds(
    scores: Sequence[float | None], ious: Sequence[float], thresholds: Sequence[float] = IOU_THRESHOLDS
) -> dict[str, float]:
    """average_precision at each IoU threshold (a hit is IoU ≥ t) and their mean "mean" (COCO's AP)."""
    out = {f"{t:.2f}": average_precision(scores, [i >= t for i in ious]) for t in thresholds}
    out["mean"] = sum(out.values()) / len(thresholds) if thresholds else 0.0
    return out


def box_centre(box: Sequence[float]) -> tuple[float, float]:
    return ((float(box[0]) + float(box[2])) / 2, (float(box[1]) + float(box[3])) / 2)


def pointing_hit(predicted: Sequence[float] | None, truth: Sequence[Sequence[float]]) -> bool:
    """The pointing game: the predicted box's centre lies inside (or on the border of) a true box."""
    if predicted is None:
        return False
    x, y = box_centre(predicted)
    return any(t[0] <= x <= t[2] and t[1] <= y <= t[3] for t in truth)


def reliability(
    confidences: Sequence[float], hits: Sequence[bool], bins: int = CALIBRATION_BINS
) -> list[dict[str, float | int]]:
    """Equal-width confidence bins over [0, 1] (the last closed): per bin its range, count, mean confidence
    and accuracy (0 for an empty bin). Scores outside [0, 1] raise."""
    if len(confidences) != len(hits):
        raise ValueError(f"reliability: {len(confidences)} confidences but {len(hits)} hit flags")
    rows: list[dict[str, float | int]] = []
    groups: list[list[tuple[float, bool]]] = [[] for _ in range(bins)]
    for c, h in zip(confidences, hits, strict=True):
        if not 0.0 <= c <= 1.0:
            raise ValueError(f"reliability: confidence {c!r} is outside [0, 1]")
        groups[min(int(c * bins), bins - 1)].append((c, bool(h)))
    for b, group in enumerate(groups):
        n = len(group)
        rows.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "n": n,
                "confidence": sum(c for c, _ in group) / n if n else 0.0,
                "accuracy": sum(h for _, h in group) / n if n else 0.0,
            }
        )
    return rows


def expected_calibration_error(
    confidences: Sequence[float], hits: Sequence[bool], bins: int = CALIBRATION_BINS
) -> float:
    """ECE = Σ_b (n_b / N) · |accuracy_b − mean confidence_b| over the `reliability` bins."""
    n = len(confidences)
    if n == 0:
        return 0.0
    return sum(
        r["n"] / n * abs(r["accuracy"] - r["confidence"]) for r in reliability(confidences, hits, bins)
    )


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random negative (ties
    count half). Mann–Whitney U / (n_pos · n_neg), by ranks in O(n log n)."""
    if not positives or not negatives:
        raise ValueError("auroc needs at least one positive and one negative score")
    values = sorted([(float(s), 1) for s in positives] + [(float(s), 0) for s in negatives])
    rank_sum, i = 0.0, 0
    while i < len(values):
        j = i
        while j < len(values) and values[j][0] == values[i][0]:
            j += 1
        mid = (i + 1 + j) / 2  # average rank of the tie group (ranks from 1)
        rank_sum += mid * sum(label for _, label in values[i:j])
        i = j
    p, q = len(positives), len(negatives)
    return (rank_sum - p * (p + 1) / 2) / (p * q)


def best_threshold(positives: Sequence[float], negatives: Sequence[float]) -> dict[str, float]:
    """The threshold t (decide positive when score ≥ t) with the highest balanced accuracy
    (TPR + TNR) / 2 on these scores, placed midway between the two scores it separates; with its TPR and
    TNR. Fit it on a calibration split and measure it on another."""
    if not positives or not negatives:
        raise ValueError("best_threshold needs at least one positive and one negative score")
    values = sorted(set(positives) | set(negatives))
    cuts = [values[0] - 1.0] + [(a + b) / 2 for a, b in pairwise(values)] + [values[-1] + 1.0]
    best: dict[str, float] = {}
    for t in cuts:
        tpr = sum(s >= t for s in positives) / len(positives)
        tnr = sum(s < t for s in negatives) / len(negatives)
        if not best or (tpr + tnr) / 2 > best["balanced_accuracy"]:
            best = {"threshold": t, "tpr": tpr, "tnr": tnr, "balanced_accuracy": (tpr + tnr) / 2}
    return best


def _mean_flag(flags: Sequence[bool]) -> float:
    return sum(bool(f) for f in flags) / len(flags) if flags else 0.0


def threshold_metrics(
    ious: Sequence[float],
    scores: Sequence[float | None],
    boxes: Sequence[Sequence[float] | None],
    truths: Sequence[Sequence[Sequence[float]]],
) -> dict[str, Any]:
    """REC or phrase grounding past one threshold: Acc@0.5, accuracy over IoU 0.5:0.95, AP over those
    thresholds ranked by the scores, the pointing game, and the scores' calibration against IoU ≥ 0.5
    (reliability bins, ECE). Per query: its answer box's IoU, score (None: unscored), box (None: no
    answer) and true boxes, all in one frame. AP and calibration only when some answer has a score."""
    hits = [i >= IOU_THRESHOLD for i in ious]
    scored = [(s, h) for s, h in zip(scores, hits, strict=True) if s is not None]
    out: dict[str, Any] = {
        "n": len(ious),
        "accuracy": _mean_flag(hits),
        "accuracy_by_iou": accuracy_over_thresholds(ious),
        "pointing": _mean_flag([pointing_hit(b, t) for b, t in zip(boxes, truths, strict=True)]),
        "scored": len(scored),
    }
    if scored:
        out["ap_by_iou"] = ap_over_thresholds(scores, ious)
        confidences, flags = [s for s, _ in scored], [h for _, h in scored]
        out["ece"] = expected_calibration_error(confidences, flags)
        out["reliability"] = reliability(confidences, flags)
    return out
