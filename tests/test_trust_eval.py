"""The synthetic world's absent and ambiguous REC queries, and the trust evaluation (calibrate on one split,
measure on another): queries checked against the scene's objects, summaries against values by hand."""

from __future__ import annotations

import pytest

from kosmos2.data import synthetic as world
from kosmos2.eval import synthetic as ev


def _fits(expression: str, obj: world.SceneObject) -> bool:
    """Does "the [size] [colour] shape|object" describe obj? (read from the words, independently)"""
    words = expression.split()
    assert words[0] == "the"
    noun = words[-1]
    named = words[1:-1]
    return (
        all(w == obj.size for w in named if w in world.SIZES)
        and all(w == obj.colour for w in named if w in world.COLOURS)
        and (noun == "object" or noun == obj.shape)
        and all(w in world.SIZES or w in world.COLOURS for w in named)
    )


@pytest.mark.parametrize("split", ["test", "calibration", "compositional"])
def test_absent_queries_fit_nothing_and_ambiguous_ones_fit_exactly_two(split):
    samples = world.make_eval_set(split, 60, tasks=["rec_absent", "rec_ambiguous"])
    assert [s["task"] for s in samples] == ["rec_absent"] * 60 + ["rec_ambiguous"] * 60
    for s in samples:
        objects = s["scene"].objects
        fitting = [o for o in objects if _fits(s["expression"], o)]
        assert s["prompt"] == f"<grounding><phrase> {s['expression']}</phrase>"
        if s["task"] == "rec_absent":
            assert fitting == [] and s["boxes"] == [] and s["target"] == ""
            if split != "compositional":
                assert all(
                    (shape, colour) not in world.HELD_OUT_PAIRS
                    for shape in world.SHAPES
                    for colour in world.COLOURS
                    if shape in s["expression"] and colour in s["expression"]
                )
        else:
            assert len(fitting) == 2
            assert s["boxes"] == sorted((o.norm_box for o in fitting), key=lambda b: b[0] + b[2])
            assert s["form"] == ("identical" if fitting[0].words == fitting[1].words else "similar")
            assert s["target"].count("<patch_index_") == 4


def test_a_training_mixture_can_draw_the_new_kinds():
    from kosmos2.predictor import default_model_dir
    from kosmos2.tokenizer import Kosmos2Tokenizer

    stream = world.iter_samples(seed=3, mixture={"rec_absent": 1, "rec_ambiguous": 1})
    samples = [next(stream) for _ in range(20)]
    assert {s["task"] for s in samples} == {"rec_absent", "rec_ambiguous"}
    tok = Kosmos2Tokenizer.from_pretrained(default_model_dir())
    absent = next(s for s in samples if s["task"] == "rec_absent")
    ids, _, learned = tok.encode_for_training(absent["prompt"], absent["target"], learn_prompt=False)
    assert [t for t, m in zip(ids, learned, strict=True) if m] == [tok.eos_id]  # "not here": stop at once


def test_the_default_sets_and_splits_keep_their_queries():
    # the new kinds are asked for by name only: the default evaluation set has the old tasks
    assert {s["task"] for s in world.make_eval_set("test", 2)} == set(world.TASKS)
    assert set(ev.DEFAULT_TASKS) <= set(world.TASKS)
    # the calibration split is the test distribution on other scenes
    test = {s["scene_id"] for s in world.make_eval_set("test", 30, tasks=["rec"])}
    cal = {s["scene_id"] for s in world.make_eval_set("calibration", 30, tasks=["rec"])}
    assert not test & cal


def _row(task, found, amb, covered=None, iou=0.9, score=0.8):
    return {
        "task": task,
        "found_score": found,
        "ambiguity_score": amb,
        "covered": covered,
        "iou": iou,
        "score": score,
        "box": [0, 0, 10, 10],
        "truth": [[0, 0, 10, 10]],
    }


def test_summarize_trust_fits_on_calibration_and_measures_on_test():
    calibration = [
        _row("rec", 0.9, 0.1),
        _row("rec", 0.7, 0.2),
        _row("rec_ambiguous", 0.8, 0.6, True),
        _row("rec_absent", 0.3, 0.5),
        _row("rec_absent", 0.1, 0.0),
    ]
    # calibration: present 0.9, 0.7, 0.8 vs absent 0.3, 0.1 -> threshold midway 0.5; ambiguous 0.6 vs
    # ordinary 0.1, 0.2 -> 0.4
    test = [
        _row("rec", 0.6, 0.5, iou=0.6),  # found; flagged ambiguous (0.5 >= 0.4)
        _row("rec", 0.4, 0.1, iou=0.3),  # missed (0.4 < 0.5)
        _row("rec_ambiguous", 0.9, 0.7, True),
        _row("rec_ambiguous", 0.55, 0.2, False),
        _row("rec_absent", 0.45, 0.0),
        _row("rec_absent", 0.7, 0.0),
    ]
    s = ev.summarize_trust(calibration, test)
    assert s["thresholds"]["found"]["threshold"] == pytest.approx(0.5)
    assert s["thresholds"]["ambiguous"]["threshold"] == pytest.approx(0.4)
    # found AUROC, ordinary (0.6, 0.4) vs absent (0.45, 0.7): 0.6>0.45, 0.6<0.7, 0.4<0.45, 0.4<0.7 -> 1/4
    assert s["found"]["auroc"] == 0.25
    # with the ambiguous (0.9, 0.55): + 0.9>both, 0.55>0.45 -> (1 + 2 + 1) / 8
    assert s["found"]["auroc_with_ambiguous"] == 0.5
    assert s["found"]["present_found"] == 0.75  # 0.6, 0.9, 0.55 of 0.6, 0.4, 0.9, 0.55
    assert s["found"]["absent_rejected"] == 0.5
    # ambiguity AUROC, (0.7, 0.2) vs (0.5, 0.1): 0.7>0.5, 0.7>0.1, 0.2<0.5, 0.2>0.1 -> 3/4
    assert s["ambiguous"]["auroc"] == 0.75
    assert s["ambiguous"]["ambiguous_flagged"] == 0.5 and s["ambiguous"]["ordinary_flagged"] == 0.5
    assert s["ambiguous"]["top2_cover_both"] == 0.5
    assert s["rec"]["accuracy"] == 0.5 and s["rec"]["n"] == 2


def test_trust_records_resume_from_their_cache(tmp_path):
    from kosmos2 import Predictor

    p = Predictor.from_pretrained()
    calls = []
    real = p.locate

    def counting(images, expressions, **kw):
        calls.append(len(images))
        return real(images, expressions, **kw)

    p.locate = counting
    cache = tmp_path / "trust.jsonl"
    first = ev.trust_records(p, "test", 2, cache=cache, model_id="m", progress=False)
    assert [r["task"] for r in first] == [
        "rec",
        "rec",
        "rec_absent",
        "rec_absent",
        "rec_ambiguous",
        "rec_ambiguous",
    ]
    assert sum(calls) == 6
    again = ev.trust_records(p, "test", 2, cache=cache, model_id="m", progress=False)
    assert again == first and sum(calls) == 6  # nothing recomputed
    for r in first:
        assert 0 <= r["found_score"] <= 1 and r["ambiguity_score"] >= 0
        assert (r["covered"] is None) == (r["task"] != "rec_ambiguous")


def test_eval_cli_trust_and_the_world_report_past_one_threshold(tmp_path, tiny_checkpoint_dir, capsys):
    import json

    from kosmos2.cli import main

    base = ["eval", "synthetic", "--checkpoint", str(tiny_checkpoint_dir), "--no-progress", "--limit", "2"]
    assert main([*base, "--out", str(tmp_path / "t"), "--trust", "--max-new-tokens", "4"]) == 0
    trust = json.loads((tmp_path / "t" / "trust.json").read_text())
    assert trust["found"]["n_present"] == trust["found"]["n_absent"] == trust["ambiguous"]["n"] == 2
    assert "found AUROC" in capsys.readouterr().out and (tmp_path / "t" / "trust.md").is_file()
    # the ordinary world report: REC and phrase grounding past one threshold, with scores from the predictor
    args = [*base, "--out", str(tmp_path / "w"), "--split", "test", "--tasks", "rec", "phrase_grounding"]
    assert main([*args, "--max-new-tokens", "6", "--samples", "0"]) == 0
    m = json.loads((tmp_path / "w" / "metrics.json").read_text())
    for task in ("rec", "phrase_grounding"):
        past = m["results"]["test"][task]["past_threshold"]
        assert set(past["accuracy_by_iou"]) == {f"{0.5 + 0.05 * i:.2f}" for i in range(10)} | {"mean"}
        assert 0 <= past["pointing"] <= 1
    md = (tmp_path / "w" / "report.md").read_text()
    assert md.count("past one IoU threshold") == 2
