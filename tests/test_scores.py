"""Scores from the model's own probabilities, locate's candidates and found / ambiguous, to_supervision, COCO
results, and the evaluation past one IoU threshold.

Model tests run the built-in default model (5.77 M parameters, its real tokenizer) and compare with an
independent teacher-forced forward (`Kosmos2.forward` over the whole sequence, no cache, no padding); metric
tests use fixtures whose values are worked out by hand in the comments.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch

from kosmos2 import grounding
from kosmos2.eval import metrics
from kosmos2.generate import location_candidates, token_logprobs
from kosmos2.predictor import THRESHOLDS, EntityResult, GroundingResult, LocateResult, Predictor

SHAPES = "examples/shapes.png"  # a large blue square, a large orange circle, a large purple diamond


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.from_pretrained()


@pytest.fixture(scope="module")
def unchecked() -> Predictor:
    """The default model without its box questions: locate's search and question signals alone (what a
    model without `BoxQuestions`, such as the official weights, gets; the check is tests/test_verify.py)."""
    p = Predictor.from_pretrained()
    p.box_questions = None
    return p


def _reference_logp(p: Predictor, image, prompt: str, new_ids: list[int]) -> list[float]:
    """log p of each continuation token by one plain forward over <s><image>…</image>prompt+continuation."""
    ids, mask = p.tokenizer.encode_prompt(prompt, num_image_tokens=p.num_image_tokens)
    embeds, _ = p.encode_images([image])
    with torch.no_grad():
        logits, _ = p.model(
            torch.tensor([ids + new_ids]),
            image_embeds=embeds,
            image_mask=torch.tensor([mask + [False] * len(new_ids)]),
        )
    logp = torch.log_softmax(logits[0].float(), dim=-1)
    T = len(ids)
    return [float(logp[T - 1 + i, t]) for i, t in enumerate(new_ids)]


# -- token log-probabilities and box scores ------------------------------------------------------------------


def test_token_logprobs_equal_a_plain_forward_in_a_left_padded_batch(predictor):
    p = predictor
    prompts = ["<grounding>An image of", "<grounding><phrase> the large orange circle</phrase>"]
    results = p.ground([SHAPES, SHAPES], prompts)
    embeds, _ = p.encode_images([SHAPES, SHAPES])
    batch = p.tokenizer.batch_encode(prompts, num_image_tokens=p.num_image_tokens)
    assert batch["attention_mask"].min() == 0  # the shorter prompt is left padded
    got = token_logprobs(
        p.model,
        batch["input_ids"],
        batch["attention_mask"],
        embeds,
        batch["image_mask"],
        [r.token_ids for r in results],
    )
    for prompt, r, row in zip(prompts, results, got, strict=True):
        want = _reference_logp(p, SHAPES, prompt, r.token_ids)
        assert len(row) == len(r.token_ids) > 0
        np.testing.assert_allclose(row, want, atol=2e-4)


def test_box_and_phrase_scores_are_the_geometric_means_of_their_tokens(predictor):
    p = predictor
    r = p.ground(SHAPES)
    want = _reference_logp(p, SHAPES, r.prompt, r.token_ids)
    ids = r.token_ids
    tok = p.tokenizer
    loc = [i for i, t in enumerate(ids) if t >= tok.patch_index_offset]
    starts = [i for i, t in enumerate(ids) if t == tok.token_to_id(grounding.PHRASE_START)]
    ends = [i for i, t in enumerate(ids) if t == tok.token_to_id(grounding.PHRASE_END)]
    assert len(r.entities) == 3 and len(loc) == 6  # three phrases with one box each
    for k, e in enumerate(r.entities):
        a, b = loc[2 * k], loc[2 * k + 1]
        assert e.scores == [pytest.approx(math.exp((want[a] + want[b]) / 2), rel=1e-3)]
        words = want[starts[k] + 1 : ends[k]]
        assert e.phrase_score == pytest.approx(math.exp(sum(words) / len(words)), rel=1e-3)


def test_a_box_given_in_the_prompt_has_no_score(predictor):
    r = predictor.describe_region(SHAPES, (10, 20, 110, 120))
    assert r.entities[0].phrase == "It" and r.entities[0].scores == [None]


def test_scores_off_leaves_the_answer_and_gives_no_scores(predictor):
    plain = Predictor(predictor.model, predictor.tokenizer, predictor.generation, scores=False)
    a, b = plain.ground(SHAPES), predictor.ground(SHAPES)
    assert a.text == b.text and all(e.scores == [] for e in a.entities)


# -- candidates, found, ambiguous ---------------------------------------------------------------------------


def test_location_candidates_match_a_plain_forward_and_the_grid_constraint(predictor):
    p = predictor
    prompt = "<grounding><phrase>the large orange circle</phrase>"
    embeds, _ = p.encode_images([SHAPES])
    batch = p.tokenizer.batch_encode([prompt], num_image_tokens=p.num_image_tokens)
    obj = p.tokenizer.token_to_id(grounding.OBJECT_START)
    off = p.tokenizer.patch_index_offset
    logp_object, found = location_candidates(
        p.model, batch["input_ids"], batch["attention_mask"], embeds, batch["image_mask"], obj, off, 32, 8
    )
    assert len(found[0]) == 8
    ref = _reference_logp(p, SHAPES, prompt, [obj])
    assert logp_object[0] == pytest.approx(ref[0], abs=2e-4)
    for c in found[0]:
        assert (
            c.lr // 32 >= c.ul // 32 and c.lr % 32 >= c.ul % 32
        )  # lower-right not above / left of upper-left
        want = _reference_logp(p, SHAPES, prompt, [obj, off + c.ul, off + c.lr])
        assert (c.logp_ul, c.logp_lr) == (pytest.approx(want[1], abs=2e-4), pytest.approx(want[2], abs=2e-4))
    assert [c.logp for c in found[0]] == sorted((c.logp for c in found[0]), reverse=True)


def test_locate_keeps_the_greedy_answer_and_its_first_candidate_is_it(unchecked):
    p = unchecked
    r = p.locate(SHAPES, "the large orange circle", candidates=3)
    plain = p.ground(SHAPES, "<grounding><phrase>the large orange circle</phrase>", max_new_tokens=24)
    assert isinstance(r, LocateResult) and r.text == plain.text
    assert r.box == plain.boxes_for("the large orange circle")[0]
    assert r.candidates[0].box == r.box
    assert r.candidates[0].score == pytest.approx(r.entities[0].scores[0], rel=1e-3)
    assert 1 <= len(r.candidates) <= 3
    for i, a in enumerate(r.candidates):  # distinct objects
        assert all(grounding.iou(a.box, b.box) < 0.5 for b in r.candidates[i + 1 :])
    assert r.ambiguity_score == pytest.approx(r.candidates[1].score / r.candidates[0].score)


def test_found_score_is_the_yes_share_of_the_exists_question(unchecked):
    p = unchecked
    r = p.locate(SHAPES, "the orange circle")
    logits = p.logits(SHAPES, "Question: Is there an orange circle? Answer:")[-1]
    yes, no = p.tokenizer.encode("yes")[0], p.tokenizer.encode("no")[0]
    want = torch.sigmoid(logits[yes] - logits[no]).item()  # p(yes) / (p(yes) + p(no))
    assert r.found_score == pytest.approx(want, abs=1e-4)
    assert r.found is (r.found_score >= THRESHOLDS["exists"])
    p.found_threshold = 0.0  # a threshold the user sets wins
    try:
        assert p.locate(SHAPES, "the green star").found is True
    finally:
        p.found_threshold = None


def test_locate_says_not_found_for_what_the_image_lacks(unchecked):
    there, absent = unchecked.locate(SHAPES, ["the orange circle", "the green star"])
    assert there.found is True and absent.found is False and absent.ambiguous is False
    assert absent.box is not None  # the greedy answer is still given; found says not to trust it


def test_locate_rejects_bad_arguments(predictor):
    with pytest.raises(ValueError, match="candidates"):
        predictor.locate(SHAPES, "the circle", candidates=0)
    with pytest.raises(ValueError, match="empty <phrase>"):  # PromptError, a ValueError
        predictor.locate(SHAPES, "  ")


# -- supervision and COCO ------------------------------------------------------------------------------------


def _hand_result() -> GroundingResult:
    # a 200 x 100 image; "a dog" with two boxes, "a ball" with one box given by the prompt (no score)
    e1 = EntityResult(
        "a dog",
        (0, 5),
        [(0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 1.0, 1.0)],
        [(20.0, 20.0, 60.0, 40.0), (100.0, 50.0, 200.0, 100.0)],
        [0.9, 0.25],
    )
    e2 = EntityResult("a ball", (10, 16), [(0.0, 0.0, 0.5, 0.5)], [(0.0, 0.0, 100.0, 50.0)], [None])
    return GroundingResult("p", "t", "a dog and a ball", [e1, e2], (200, 100))


def test_to_supervision_equals_the_boxes_worked_out_by_hand():
    warnings.filterwarnings("ignore", message=".*OpenCV.*")
    d = _hand_result().to_supervision()
    np.testing.assert_array_equal(d.xyxy, [[20, 20, 60, 40], [100, 50, 200, 100], [0, 0, 100, 50]])
    np.testing.assert_array_equal(d.class_id, [0, 0, 1])
    assert list(d.data["class_name"]) == ["a dog", "a dog", "a ball"]
    np.testing.assert_allclose(d.confidence[:2], [0.9, 0.25])
    assert math.isnan(d.confidence[2])
    assert len(d) == 3


def test_coco_results_are_worked_out_by_hand_and_load_with_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    from kosmos2.commands import coco_results, write_coco

    r = _hand_result()
    rows, dataset = coco_results(["/x/a.png"], [r])
    assert rows == [
        {"image_id": 1, "category_id": 1, "bbox": [20.0, 20.0, 40.0, 20.0], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [100.0, 50.0, 100.0, 50.0], "score": 0.25},
        {"image_id": 1, "category_id": 2, "bbox": [0.0, 0.0, 100.0, 50.0], "score": 1.0},
    ]
    assert dataset["images"] == [{"id": 1, "file_name": "a.png", "width": 200, "height": 100}]
    out = write_coco(["/x/a.png"], [r], str(tmp_path / "res.json"))
    gt = COCO(str(tmp_path / "res.dataset.json"))
    loaded = gt.loadRes(str(out))
    assert len(loaded.getAnnIds()) == 3 and loaded.loadAnns(1)[0]["area"] == pytest.approx(800.0)
    # with a ground-truth file: its image ids and its category names ("dog" matches "a dog"; "ball" absent)
    instances = {
        "images": [{"id": 42, "file_name": "a.png", "width": 200, "height": 100}],
        "categories": [{"id": 18, "name": "dog"}],
        "annotations": [],
    }
    (tmp_path / "gt.json").write_text(json.dumps(instances))
    rows, _ = coco_results(["/x/a.png"], [r], instances)
    assert [(x["image_id"], x["category_id"]) for x in rows] == [(42, 18), (42, 18)]
    write_coco(["/x/a.png"], [r], str(tmp_path / "res2.json"), str(tmp_path / "gt.json"))
    assert len(COCO(str(tmp_path / "gt.json")).loadRes(str(tmp_path / "res2.json")).getAnnIds()) == 2


def test_ground_cli_json_carries_scores_and_coco_is_written(tmp_path):
    import io

    from kosmos2.commands import ground_images

    out = io.StringIO()
    ground_images(
        [SHAPES], as_json=True, out=out, coco=str(tmp_path / "c.json"), draw=str(tmp_path / "d.png")
    )
    record = json.loads(out.getvalue())
    assert all(len(e["scores"]) == len(e["boxes"]) and e["scores"][0] > 0 for e in record["entities"])
    rows = json.loads((tmp_path / "c.json").read_text())
    assert [r["score"] for r in rows] == [round(e["scores"][0], 5) for e in record["entities"]]
    assert (tmp_path / "d.png").is_file()


# -- metrics past one threshold, by hand ---------------------------------------------------------------------


def test_accuracy_over_thresholds_by_hand():
    # IoUs 0.52, 0.77, 0.96, 0.3: at 0.50 three of four; 0.55..0.75 (5 thresholds) two; 0.80..0.95 (4) one
    acc = metrics.accuracy_over_thresholds([0.52, 0.77, 0.96, 0.3])
    assert acc["0.50"] == 0.75 and acc["0.55"] == 0.5 and acc["0.75"] == 0.5 and acc["0.80"] == 0.25
    assert acc["0.95"] == 0.25
    assert acc["mean"] == pytest.approx((0.75 + 5 * 0.5 + 4 * 0.25) / 10)


def test_average_precision_by_hand():
    # ranked by score: hit (0.9), miss (0.8), hit (0.7), no answer; 4 queries to recall
    # precision 1, 1/2, 2/3 at recall 1/4, 1/4, 2/4; envelope 1, 2/3, 2/3; AP = 1/4 * 1 + 1/4 * 2/3 = 5/12
    ap = metrics.average_precision([0.8, 0.9, None, 0.7], [False, True, True, True])
    assert ap == pytest.approx(5 / 12)
    assert metrics.average_precision([0.5, 0.4], [True, True]) == 1.0
    assert metrics.average_precision([None], [True]) == 0.0
    # AP over thresholds: IoUs 0.6 (score 0.9) and 0.8 (score 0.1): below 0.6 both hit (AP 1); from 0.65 to
    # 0.8 only the second: precision 1/2 at recall 1/2 -> AP 1/4; above 0.8 none
    by = metrics.ap_over_thresholds([0.9, 0.1], [0.6, 0.8])
    assert by["0.50"] == by["0.60"] == 1.0 and by["0.65"] == by["0.80"] == 0.25 and by["0.85"] == 0.0
    assert by["mean"] == pytest.approx((3 * 1.0 + 4 * 0.25) / 10)


def test_pointing_game_by_hand():
    truth = [(0, 0, 10, 10)]
    assert metrics.pointing_hit((5, 5, 30, 30), truth) is False  # centre (17.5, 17.5)
    assert metrics.pointing_hit((0, 0, 20, 20), truth) is True  # centre (10, 10) on the border
    assert metrics.pointing_hit(None, truth) is False


def test_reliability_and_ece_by_hand():
    # bin [0.9, 1.0]: scores 0.95, 0.95 (1 hit) -> conf 0.95, acc 0.5; bin [0.1, 0.2): 0.15 (hit) -> acc 1
    # ECE = 2/3 * |0.5 - 0.95| + 1/3 * |1 - 0.15| = 0.3 + 0.28333 = 0.58333
    conf, hits = [0.95, 0.95, 0.15], [True, False, True]
    bins = metrics.reliability(conf, hits)
    assert bins[9]["n"] == 2 and bins[9]["accuracy"] == 0.5 and bins[9]["confidence"] == pytest.approx(0.95)
    assert bins[1]["n"] == 1 and bins[0]["n"] == 0
    assert metrics.expected_calibration_error(conf, hits) == pytest.approx(0.3 + 0.85 / 3)
    assert metrics.reliability([1.0], [True])[9]["n"] == 1  # the last bin is closed
    with pytest.raises(ValueError, match="outside"):
        metrics.reliability([1.5], [True])


def test_auroc_and_best_threshold_by_hand():
    # positives 0.9, 0.4; negatives 0.5, 0.1: pairs (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1) -> 3/4
    assert metrics.auroc([0.9, 0.4], [0.5, 0.1]) == 0.75
    assert metrics.auroc([0.5], [0.5]) == 0.5  # a tie counts half
    best = metrics.best_threshold([0.9, 0.8], [0.1, 0.2])
    assert best["threshold"] == pytest.approx(0.5) and best["balanced_accuracy"] == 1.0


def test_threshold_metrics_by_hand():
    # two queries: IoU 0.7 (score 0.9, centre inside), no answer
    m = metrics.threshold_metrics(
        [0.7, 0.0], [0.9, None], [(0, 0, 10, 10), None], [[(0, 0, 10, 10)], [(0, 0, 1, 1)]]
    )
    assert m["accuracy"] == 0.5 and m["pointing"] == 0.5 and m["scored"] == 1
    assert m["accuracy_by_iou"]["0.70"] == 0.5 and m["accuracy_by_iou"]["0.75"] == 0.0
    assert m["ap_by_iou"]["0.50"] == 0.5  # precision 1 at recall 1/2
    assert m["ece"] == pytest.approx(0.1)  # one answer: confidence 0.9, right


def test_reports_carry_the_metrics_past_one_threshold(tmp_path):
    from kosmos2.eval import report

    m = metrics.threshold_metrics(
        [0.7, 0.2], [0.9, 0.3], [(0, 0, 10, 10), (0, 0, 2, 2)], [[(0, 0, 10, 10)]] * 2
    )
    md = report.threshold_section(m, tmp_path, "rec", "REC")
    text = "\n".join(md)
    assert "| accuracy | 50.0 |" in text and "AP (by score)" in text and "ECE" in text and "Pointing" in text
    if report.have_matplotlib():
        assert (tmp_path / "rec_iou.png").is_file() and (tmp_path / "rec_reliability.png").is_file()


def test_a_model_trained_on_absent_and_ambiguous_queries_reads_found_and_ambiguous_from_rec(tmp_path):
    # the same weights, stated as trained on rec_absent / rec_ambiguous: found_score becomes p(<object> |
    # prompt) and ambiguity_score p(delimiter) / (p(delimiter) + p(</object>)) after the first candidate's
    # box, each checked against a plain forward; the other signals stay as they were
    from kosmos2.predictor import default_model_dir

    folder = tmp_path / "model"
    shutil.copytree(default_model_dir(), folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config["kosmos2_tasks"] += ["rec_absent", "rec_ambiguous"]
    (folder / "generation_config.json").write_text(json.dumps(config))
    p, plain = Predictor.from_pretrained(folder), Predictor.from_pretrained()
    p.box_questions = plain.box_questions = None  # the trained signals, not the box check
    assert p.supports("rec_absent") and not plain.supports("rec_absent")
    prompt = "<grounding><phrase>the large orange circle</phrase>"
    r, before = p.locate(SHAPES, "the large orange circle"), plain.locate(SHAPES, "the large orange circle")
    assert r.text == before.text and r.candidates[0] == before.candidates[0]
    obj = p.tokenizer.token_to_id(grounding.OBJECT_START)
    assert (
        r.found_score
        == r.signals["object"]
        == pytest.approx(math.exp(_reference_logp(p, SHAPES, prompt, [obj])[0]), rel=1e-3)
    )
    assert r.signals["exists"] == pytest.approx(before.found_score, abs=1e-6)
    assert r.found is (r.found_score >= THRESHOLDS["object"])
    ul, lr = grounding.box_to_tokens(r.candidates[0].box, 32)
    off = p.tokenizer.patch_index_offset
    more, end = (p.tokenizer.token_to_id(t) for t in (grounding.DELIMITER, grounding.OBJECT_END))
    ref = _reference_logp(p, SHAPES, prompt, [obj, off + ul, off + lr, more])[-1]
    ref_end = _reference_logp(p, SHAPES, prompt, [obj, off + ul, off + lr, end])[-1]
    want = math.exp(ref) / (math.exp(ref) + math.exp(ref_end))
    assert r.ambiguity_score == r.signals["another"] == pytest.approx(want, abs=1e-4)
    # its decision uses the ambiguous threshold, as "second_ratio" does
    assert THRESHOLDS["another"] == THRESHOLDS["second_ratio"]
    assert r.ambiguous is (r.found and r.ambiguity_score >= THRESHOLDS["another"])
    assert r.signals["second_ratio"] == pytest.approx(before.ambiguity_score)
    assert "another" not in before.signals and before.found_score == before.signals["exists"]
