"""Box metrics against values worked out by hand (every IoU here is exact in binary floating point)."""

from __future__ import annotations

import pytest

from kosmos2.eval import metrics


def test_iou_exactly_half_counts_as_correct() -> None:
    # [0,0,2,1] vs [0,0,1,1]: intersection 1, union 2 + 1 - 1 = 2 -> exactly 0.5
    assert metrics.best_iou([(0, 0, 2, 1)], [(0, 0, 1, 1)]) == 0.5
    s = metrics.score_rec([(0, 0, 2, 1)], [(0, 0, 1, 1)])
    assert s.iou_first == 0.5 and s.correct("first") and s.correct("any") and s.correct("mean")
    # just below: [0,0,2.0000001,1] vs [0,0,1,1] -> 1 / 2.0000001 < 0.5 -> a miss
    assert not metrics.score_rec([(0, 0, 2.0000001, 1)], [(0, 0, 1, 1)]).correct("first")


def test_no_box_is_a_miss_not_a_skip() -> None:
    s = metrics.score_rec([], [(0, 0, 4, 4)])
    assert (s.iou_first, s.iou_any, s.iou_mean, s.decoded) == (0.0, 0.0, 0.0, False)
    summary = metrics.rec_summary([s, metrics.score_rec([(0, 0, 4, 4)], [(0, 0, 4, 4)])])
    assert summary["count"] == 2 and summary["acc_first"] == 50.0 and summary["undecodable"] == 1


def test_first_any_mean_box_variants() -> None:
    # truth (40,40,64,64); first box (1,1,3,3) misses, second (41,41,63,63) covers 22x22 of 24x24
    s = metrics.score_rec([(1, 1, 3, 3), (41, 41, 63, 63)], [(40, 40, 64, 64)])
    assert s.iou_first == 0.0
    assert s.iou_any == 484 / 576
    assert s.iou_mean == 0.0  # mean box (21,21,33,33) does not touch the truth
    assert (s.correct("first"), s.correct("any"), s.correct("mean")) == (False, True, False)
    # truth (4,4,34,34): both boxes miss, their mean (9,9,31,31) lies inside: 22*22 / 30*30
    s = metrics.score_rec([(1, 1, 15, 15), (17, 17, 47, 47)], [(4, 4, 34, 34)])
    assert s.iou_first == 121 / 975 and s.iou_any == 289 / 1511 and s.iou_mean == 484 / 900
    assert (s.correct("first"), s.correct("any"), s.correct("mean")) == (False, False, True)


def test_several_ground_truth_boxes_best_one_counts() -> None:
    truth = [(0, 0, 10, 10), (30, 30, 60, 60)]
    assert metrics.best_iou([(31, 31, 59, 59)], truth) == 784 / 900
    ious = metrics.recall_ious([(41, 1, 51, 11), (31, 31, 59, 59)], truth)
    assert ious == {1: 0.0, 5: 784 / 900, 10: 784 / 900}


def test_recall_summary_by_type_by_hand() -> None:
    items = [
        ({1: 0.0, 5: 0.9, 10: 0.9}, ["people"]),
        ({1: 0.5, 5: 0.5, 10: 0.5}, ["clothing"]),
        ({1: 0.0, 5: 0.0, 10: 0.0}, ["bodyparts", "other"]),  # two types: counted in both
    ]
    s = metrics.recall_summary(items)
    assert s["all"] == {"count": 3, "R@1": 100 / 3, "R@5": 200 / 3, "R@10": 200 / 3}
    assert s["people"] == {"count": 1, "R@1": 0.0, "R@5": 100.0, "R@10": 100.0}
    assert s["bodyparts"]["count"] == 1 and s["other"]["R@1"] == 0.0
    assert list(s) == ["all", "bodyparts", "clothing", "other", "people"]


def test_mean_box_and_conversions() -> None:
    assert metrics.mean_box([(0, 0, 2, 2), (2, 4, 6, 8)]) == (1.0, 2.0, 4.0, 5.0)
    assert metrics.xywh_to_xyxy([10, 20, 30, 40]) == (10.0, 20.0, 40.0, 60.0)
    with pytest.raises(ValueError, match="at least one"):
        metrics.mean_box([])


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="ground-truth"):
        metrics.score_rec([(0, 0, 1, 1)], [])
    with pytest.raises(ValueError, match="phrases without boxes"):
        metrics.recall_ious([(0, 0, 1, 1)], [])
    with pytest.raises(ValueError, match="ann 7: box .* has no area"):
        metrics.check_box((5, 5, 5, 9), "ann 7")
    with pytest.raises(ValueError, match="4 finite numbers"):
        metrics.check_box((0, 0, float("nan"), 1), "x")
