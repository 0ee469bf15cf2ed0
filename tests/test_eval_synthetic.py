"""`kosmos2 eval synthetic`: the world's held-out sets, metrics worked out by hand, targets, reports.

Metric functions are checked on hand-built boxes (1-pixel-high strips, so every IoU is a ratio of lengths).
The world evaluation runs on real world samples with test doubles that answer each (image, prompt) with the
sample's own training target, perturbed in known ways: the expected numbers follow from the samples, not from
the harness. The end-to-end test drives the real Predictor on a tiny random checkpoint through `main()`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from _eval_fixtures import ScriptedPredictor, obj, predictor_result, write_image
from PIL import Image

from kosmos2.eval import cli as eval_cli
from kosmos2.eval import metrics, synthetic
from kosmos2.grounding import GROUNDING, PHRASE_END, PHRASE_START, object_markup, parse

world = pytest.importorskip("kosmos2.data.synthetic")


# ------------------------------------------------------------------------------------------------------------
# Metric functions, by hand


def test_normalize_answer() -> None:
    assert metrics.normalize_answer("  The Small  red circle. ") == "the small red circle"
    assert metrics.normalize_answer("red .") == "red"
    assert metrics.normalize_answer("yes..") == "yes"
    assert metrics.normalize_answer("\tTop  Left\n") == "top left"
    assert metrics.normalize_answer("a.b") == "a.b"  # only trailing periods go
    assert metrics.normalize_answer("") == "" and metrics.normalize_answer(" . ") == ""


# Strips of height 1 (y from 0 to 1): IoU is overlap length / union length.
X, Y = (0, 0, 10, 1), (4, 0, 14, 1)  # true boxes
A, B = (1, 0, 11, 1), (0, 0, 6, 1)  # predicted boxes
# IoU(A, X) = 9/11 = 0.82, IoU(A, Y) = 7/13 = 0.54, IoU(B, X) = 6/10 = 0.6, IoU(B, Y) = 2/14 = 0.14


def test_max_matching_is_exact_where_greedy_pairing_is_not() -> None:
    # greedy by IoU pairs A with X (0.82) and leaves B nothing (B-Y 0.14); the best pairing is A-Y, B-X
    assert metrics.max_matching([A, B], [X, Y]) == 2
    assert metrics.max_matching([A], [X, Y]) == 1 and metrics.max_matching([B], [Y]) == 0
    assert metrics.max_matching([A, A], [X]) == 1  # one-to-one: a duplicate does not match twice
    assert metrics.max_matching([], [X]) == 0 and metrics.max_matching([A], []) == 0
    # IoU exactly 0.5 counts: (0,0,2,1) vs (0,0,1,1) overlap 1, union 2
    assert metrics.max_matching([(0, 0, 2, 1)], [(0, 0, 1, 1)]) == 1
    assert metrics.max_matching([(0, 0, 2.0000001, 1)], [(0, 0, 1, 1)]) == 0


def test_entity_pairs_multi_box_missing_and_extra() -> None:
    Z, W = (20, 0, 30, 1), (40, 0, 50, 1)
    truth = [("two red squares", [X, Y]), ("a blue circle", [Z]), ("a green star", [W])]
    predicted = [
        ("Two red  squares.", [A, B, (60, 0, 70, 1)]),  # same phrase once normalised: A-Y, B-X; 3rd box extra
        ("a blue square", [Z]),  # the right box under a phrase the truth lacks: not a match
        ("a green star", [(45, 0, 55, 1)]),  # right phrase, IoU 5/15 = 0.33: a miss
    ]  # and "a blue circle" is missing
    c = metrics.entity_pair_counts(predicted, truth)
    assert (c.matched, c.predicted, c.true) == (2, 5, 4)  # precision 2/5, recall 2/4
    # a phrase written twice pools its boxes; a repeated box matches once
    c2 = metrics.entity_pair_counts([("two red squares", [A]), ("two red squares", [B])], truth[:1])
    assert (c2.matched, c2.predicted, c2.true) == (2, 2, 2)
    c3 = metrics.entity_pair_counts([("a blue circle", [Z, Z])], [("a blue circle", [Z])])
    assert (c3.matched, c3.predicted, c3.true) == (1, 2, 1)
    pr = metrics.precision_recall([c, c2, c3])  # micro: 5 matched of 9 predicted and 7 true
    assert (pr["matched"], pr["predicted"], pr["true"]) == (5, 9, 7)
    assert pr["precision"] == pytest.approx(5 / 9) and pr["recall"] == pytest.approx(5 / 7)
    assert pr["f1"] == pytest.approx(0.625)  # 2 (5/9)(5/7) / (5/9 + 5/7) = (50/63) / (80/63)
    none = metrics.precision_recall([metrics.PairCounts(0, 0, 3)])
    assert (none["precision"], none["recall"], none["f1"]) == (0.0, 0.0, 0.0)


def test_targets_table_by_hand() -> None:
    results = {
        "test": {
            "rec": {"n": 1000, "accuracy": 0.96},
            "grounded_caption": {"n": 1000, "precision": 0.89, "recall": 0.95},
            "reg": {"n": 999, "exact_match": 0.8},
        }
    }
    rows = {(r["split"], r["label"]): r for r in synthetic.check_targets(results)}
    assert len(rows) == len(synthetic.TARGETS) == 7
    rec = rows[("test", "REC Acc@0.5")]
    assert (rec["met"], rec["full_size"], rec["target"]) == (True, True, 0.95)
    assert rows[("test", "grounded-caption entity precision")]["met"] is False
    assert rows[("test", "grounded-caption entity recall")]["met"] is True
    reg = rows[("test", "REG exact match")]
    assert (reg["met"], reg["full_size"]) == (True, False)  # 0.80 >= 0.80, but on 999 queries
    assert rows[("compositional", "REC Acc@0.5")]["measured"] is None
    table = synthetic.targets_table(synthetic.check_targets(results))
    assert "| test | REC Acc@0.5 | ≥ 0.95 | 0.960 | 1000 | pass |" in table
    assert "| test | grounded-caption entity precision | ≥ 0.90 | 0.890 | 1000 | **FAIL** |" in table
    assert "| test | REG exact match | ≥ 0.80 | 0.800 | 999 | pass (n < 1000) |" in table
    assert "| compositional | REC Acc@0.5 | ≥ 0.85 | — | — | not measured |" in table


def test_reg_mistakes_name_the_wrong_parts() -> None:
    ref = "the small red circle on the left"
    assert synthetic.reg_mistakes("The small  red circle on the left.", ref) == []
    assert synthetic.reg_mistakes("the small red circle", ref) == ["position"]  # the twin left out
    assert synthetic.reg_mistakes("the small red circle at the top", ref) == ["position"]
    assert synthetic.reg_mistakes("the large red square on the left", ref) == ["size", "shape"]
    assert synthetic.reg_mistakes("the small blue circle on the right", "the small red circle") == [
        "colour",
        "position",
    ]
    broken = ("", "a small red circle", "the small red", "the tiny red circle", "the small red circle x")
    for text in broken:
        assert synthetic.reg_mistakes(text, ref) == ["form"], text
    with pytest.raises(ValueError, match="not a canonical description"):
        synthetic.reg_mistakes("the small red circle", "it is red")


def _reg_record(answer: str, reference: str) -> dict[str, Any]:
    ok = metrics.normalize_answer(answer) == metrics.normalize_answer(reference)
    return {"correct": ok, "mistakes": synthetic.reg_mistakes(answer, reference)}


def _caption_record(matched: int, predicted: int, boxes_per_entity: list[int]) -> dict[str, Any]:
    true = [["x", [[0, 0, 1, 1]] * k] for k in boxes_per_entity]
    return {
        "pairs_matched": matched,
        "pairs_predicted": predicted,
        "pairs_true": sum(boxes_per_entity),
        "truth_entities": true,
        "correct": matched == predicted == sum(boxes_per_entity),
        "caption_exact": False,
    }


def test_reg_and_caption_summaries_by_hand() -> None:
    reg = synthetic.summarize_task(
        "reg",
        [
            _reg_record("the small red circle", "the small red circle"),
            _reg_record("the small red circle", "the small red circle on the left"),
            _reg_record("the small red square", "the small red circle on the left"),
            _reg_record("red", "the large blue star"),
        ],
    )
    assert reg["exact_match"] == 0.25
    assert reg["mistakes"] == {"size": 0, "colour": 0, "shape": 1, "position": 2, "form": 1}
    # two captions with a group (2 + 1 and 3 true pairs), one without (2 true pairs)
    cap = synthetic.summarize_task(
        "grounded_caption",
        [_caption_record(1, 3, [2, 1]), _caption_record(3, 3, [3]), _caption_record(2, 2, [1, 1])],
    )
    assert (cap["matched"], cap["predicted"], cap["true"]) == (6, 8, 8)
    groups = cap["by_groups"]
    assert groups["with"]["n"] == 2 and groups["with"]["precision"] == pytest.approx(4 / 6)
    assert groups["with"]["recall"] == pytest.approx(4 / 6)
    assert groups["without"] == {"n": 1, **metrics.precision_recall([metrics.PairCounts(2, 2, 2)])}
    assert groups["without"]["precision"] == 1.0


# ------------------------------------------------------------------------------------------------------------
# The world's queries and prompts


def test_world_queries_are_the_eval_set_with_stable_ids() -> None:
    small = synthetic.world_queries("compositional", 2, ["rec", "vqa"])
    large = synthetic.world_queries("compositional", 3, ["rec", "vqa"])
    samples = world.make_eval_set("compositional", 2, tasks=["rec", "vqa"])
    assert [q.sample["task"] for q in small] == ["rec", "rec", "vqa", "vqa"]
    for item, sample in zip(small, samples, strict=True):
        q = item.query
        assert q.prompt == sample["prompt"] and q.image == sample["scene"]
        assert q.size == (sample["scene"].width, sample["scene"].height)
    assert [q.query.id for q in small] == [
        f"compositional/{t}/{i}/{s['scene_id']:016x}"
        for t, i, s in zip(["rec"] * 2 + ["vqa"] * 2, [0, 1] * 2, samples, strict=True)
    ]
    # the first n of a task do not depend on n: a quick run's cache serves the full one
    assert {q.query.id for q in small} <= {q.query.id for q in large}
    with pytest.raises(ValueError, match="unknown task"):
        synthetic.world_queries("test", 1, ["rec", "detection"])


def test_world_prompts_tokenise_as_the_predictor_helpers_prompts(kosmos2_tokenizer_dir) -> None:
    """The world writes the space before a phrase inside it; the helpers' prompts (SPEC §1: locate,
    ground_phrases, describe_region, vqa, caption) give the same token ids, so scores carry over."""
    from kosmos2.tokenizer import Kosmos2Tokenizer

    tok = Kosmos2Tokenizer.from_pretrained(kosmos2_tokenizer_dir)
    tasks = ["rec", "phrase_grounding", "reg", "vqa", "grounded_caption"]
    for s in world.make_eval_set("test", 4, tasks=tasks):
        if s["task"] == "rec":
            helper = f"{GROUNDING}{PHRASE_START}{s['expression']}{PHRASE_END}"
        elif s["task"] == "phrase_grounding":
            before = parse(s["prompt"]).caption[: -len(s["expression"])]
            helper = f"{GROUNDING}{before.strip()} {PHRASE_START}{s['expression']}{PHRASE_END}"
        elif s["task"] == "reg":
            helper = f"{PHRASE_START} It{PHRASE_END}{object_markup(s['boxes'])} is"
        elif s["task"] == "vqa":
            helper = f"Question: {s['question']} Answer:"
        else:
            helper = "<grounding>An image of"
        assert tok.encode(s["prompt"].strip()) == tok.encode(helper), (s["prompt"], helper)


# ------------------------------------------------------------------------------------------------------------
# The world evaluation with answers derived from the samples


class SamplePredictor:
    """Answers each (rendered image, prompt) with `answer(sample)`, finding the sample by the pixels."""

    def __init__(self, splits: list[str], n: int, answer: Callable[[dict], str]) -> None:
        self.answer = answer
        self.samples = {}
        for split in splits:
            for s in world.make_eval_set(split, n, tasks=synthetic.WORLD_TASKS):
                self.samples[(_digest(world.render(s["scene"])), s["prompt"])] = s
        self.calls = 0

    def ground(self, images: list, prompts: list[str], **generation: Any) -> list[Any]:
        self.calls += 1
        return [
            predictor_result(prompt, self.answer(self.samples[(_digest(image), prompt)]))
            for image, prompt in zip(images, prompts, strict=True)
        ]


def _digest(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes() + repr(image.size).encode()).hexdigest()


N = 3  # queries per task and split


def test_training_targets_score_perfectly_and_meet_every_target(tmp_path) -> None:
    oracle = SamplePredictor(["test", "compositional"], N, lambda s: s["target"])
    out = tmp_path / "out"
    r = synthetic.evaluate_world(
        oracle, out, model_id="oracle", n_per_task=N, tasks=synthetic.WORLD_TASKS, progress=False, examples=2
    )
    headline = {
        "rec": ["accuracy", "accuracy_any", "accuracy_mean"],
        "phrase_grounding": ["R@1", "box_precision", "box_recall", "all_boxes"],
        "grounded_caption": ["precision", "recall", "all_entities", "caption_exact"],
        "caption": ["exact_match"],
        "reg": ["exact_match"],
        "grounded_vqa": ["accuracy"],
        "vqa": ["accuracy"],
    }
    for split in ("test", "compositional"):
        assert list(r["results"][split]) == list(synthetic.WORLD_TASKS)
        for task, keys in headline.items():
            s = r["results"][split][task]
            assert s["n"] == N and all(s[k] == 1.0 for k in keys), (split, task, s)
    assert all(row["met"] and not row["full_size"] for row in r["targets"])
    assert r["all_targets_met"] is True and r["run"] == {"queries": 42, "from_cache": 0, "computed": 42}
    # greedy, 96 tokens, no n-gram blocking, every option explicit
    assert r["generation"] == {
        "max_new_tokens": 96,
        "num_beams": 1,
        "do_sample": False,
        "no_repeat_ngram_size": 0,
        "length_penalty": 1.0,
    }
    assert "generation_changed" not in r
    assert json.loads((out / "metrics.json").read_text())["results"] == r["results"]
    assert len((out / "records.jsonl").read_text().splitlines()) == 42
    text = (out / "report.md").read_text()
    assert "| compositional | REC Acc@0.5 | ≥ 0.85 | 1.000 | 3 | pass (n < 1000) |" in text
    for split in ("test", "compositional"):
        for task in ("rec", "phrase_grounding", "grounded_caption"):
            path = out / "examples" / f"{split}_{task}.png"
            assert Image.open(path).size[0] > 0 and f"examples/{split}_{task}.png" in text


def _drop_last_entity(target: str) -> str:
    """The caption target with its last phrase's markup removed (the words stay, the boxes go)."""
    start = target.rindex(PHRASE_START)
    end = target.rindex("</object>") + len("</object>")
    phrase = target[start + len(PHRASE_START) : target.rindex(PHRASE_END)]
    return target[:start] + phrase + target[end:]


def _perturbed(s: dict, first: bool) -> str:
    """The sample's target with known mistakes; `first`: the first sample of its split and task."""
    task, target = s["task"], s["target"]
    if task == "rec" and first:  # a wrong box (the top-left cell) before the right one
        delimiter = "</delimiter_of_multi_objects/>"
        return target.replace("<object>", "<object><patch_index_0000><patch_index_0000>" + delimiter, 1)
    if task == "grounded_caption":
        return _drop_last_entity(target)
    if task == "reg":  # case, spacing and a final period do not matter
        return "  " + target.strip().upper().replace(" ", "  ") + " ."
    if task == "grounded_vqa" and first:
        return " maybe"
    return target


def test_known_mistakes_give_the_numbers_the_samples_imply(tmp_path) -> None:
    fake = SamplePredictor(["test", "compositional"], N, lambda s: s["target"])
    first: dict[tuple[str, str], int] = {}
    for s in fake.samples.values():  # in eval-set order: the first of each split and task
        first.setdefault((s["split"], s["task"]), id(s))
    fake.answer = lambda s: _perturbed(s, first[(s["split"], s["task"])] == id(s))
    r = synthetic.evaluate_world(
        fake, tmp_path / "o", model_id="m", n_per_task=N, batch_size=4, progress=False, examples=0
    )
    assert list(r["results"]["test"]) == list(synthetic.DEFAULT_TASKS)  # plain captions only on request
    for split in ("test", "compositional"):
        res = r["results"][split]
        assert res["rec"]["accuracy"] == pytest.approx((N - 1) / N)  # the first box counts ...
        assert res["rec"]["accuracy_any"] == 1.0 and res["rec"]["no_box"] == 0  # ... though one is right
        samples = [
            s for s in fake.samples.values() if s["split"] == split and s["task"] == "grounded_caption"
        ]
        true = sum(len(b) for s in samples for _, b in s["entities"])
        kept = true - sum(len(s["entities"][-1][1]) for s in samples)
        cap = res["grounded_caption"]
        assert (cap["matched"], cap["predicted"], cap["true"]) == (kept, kept, true)
        assert cap["precision"] == 1.0 and cap["recall"] == pytest.approx(kept / true)
        assert cap["caption_exact"] == 1.0 and cap["all_entities"] == 0.0
        assert res["reg"]["exact_match"] == 1.0
        assert res["reg"]["mistakes"] == {"size": 0, "colour": 0, "shape": 0, "position": 0, "form": 0}
        by_groups = cap["by_groups"]
        assert by_groups["with"]["n"] + by_groups["without"]["n"] == N
        assert by_groups["with"]["true"] + by_groups["without"]["true"] == true
        assert res["grounded_vqa"]["accuracy"] == pytest.approx((N - 1) / N)
        assert res["vqa"]["accuracy"] == 1.0
    assert not (tmp_path / "o" / "examples").exists()
    rows = {(t["split"], t["label"]): t for t in r["targets"]}
    assert rows[("test", "REC Acc@0.5")]["met"] is False and r["all_targets_met"] is False


def test_no_output_is_a_miss_everywhere(tmp_path) -> None:
    silent = ScriptedPredictor({})  # generates nothing for any prompt
    r = synthetic.evaluate_world(
        silent, tmp_path / "o", model_id="m", splits=["test"], n_per_task=2, progress=False, examples=1
    )
    res = r["results"]["test"]
    assert res["rec"]["accuracy"] == 0.0 and res["rec"]["no_box"] == 2
    assert res["phrase_grounding"]["R@1"] == 0.0 and res["phrase_grounding"]["no_box"] == 2
    assert res["grounded_caption"]["precision"] == 0.0 and res["grounded_caption"]["recall"] == 0.0
    assert res["reg"]["exact_match"] == 0.0 and res["vqa"]["accuracy"] == 0.0
    assert r["all_targets_met"] is None  # the compositional split was not run
    assert [row["met"] for row in r["targets"]][-1] is None
    with pytest.raises(ValueError, match="splits must be"):
        synthetic.evaluate_world(silent, tmp_path / "x", model_id="m", splits=["val"])
    with pytest.raises(ValueError, match="n_per_task must be a positive"):
        synthetic.evaluate_world(silent, tmp_path / "x", model_id="m", n_per_task=0)


# ------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_task_names_match_the_module() -> None:
    assert eval_cli.WORLD_TASKS == synthetic.WORLD_TASKS and eval_cli.DEFAULT_TASKS == synthetic.DEFAULT_TASKS
    assert set(synthetic.WORLD_TASKS) == set(world.TASKS)


def test_cli_rejects_bad_settings(tmp_path, capsys) -> None:
    from kosmos2.cli import main

    base = ["eval", "synthetic", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main([*base, "--n-per-task", "0"]) == 2
    assert "--n-per-task must be a positive" in capsys.readouterr().err
    assert main([*base, "--no-repeat-ngram-size", "-1"]) == 2
    assert "--no-repeat-ngram-size must be at least 0, got" in capsys.readouterr().err
    assert main([*base, "--limit", "0"]) == 2
    with pytest.raises(SystemExit):
        main([*base, "--tasks", "detection"])
    assert "invalid choice: 'detection'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_dir):
    return tiny_checkpoint_dir


def test_end_to_end_on_a_tiny_checkpoint_and_cached_rerun(tmp_path, checkpoint, capsys) -> None:
    from kosmos2.cli import main
    from kosmos2.predictor import Predictor

    out = tmp_path / "world"
    args = ["eval", "synthetic", "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress"]
    args += ["--max-new-tokens", "3", "--batch-size", "6", "--samples", "2", "--limit", "2"]
    assert main([*args, "--n-per-task", "1"]) == 0
    first = json.loads((out / "metrics.json").read_text())
    assert first["run"] == {"queries": 12, "from_cache": 0, "computed": 12}  # 6 tasks x 2 splits x 1
    assert main(args) == 0  # n 1000 limited to 2: the 12 cached plus 12 new
    m = json.loads((out / "metrics.json").read_text())
    assert m["run"] == {"queries": 24, "from_cache": 12, "computed": 12}
    want = {"max_new_tokens": 3, "num_beams": 1, "do_sample": False, "no_repeat_ngram_size": 0}
    assert m["generation"] == {**want, "length_penalty": 1.0}
    assert m["generation_changed"] == {"max_new_tokens": {"protocol": 96, "used": 3}}
    assert m["splits"] == ["test", "compositional"] and m["n_per_task"] == 2
    assert {t: s["n"] for t, s in m["results"]["compositional"].items()} == dict.fromkeys(
        synthetic.DEFAULT_TASKS, 2
    )
    printed = capsys.readouterr().out
    assert "target compositional REC Acc@0.5 >= 0.85:" in printed and "n=2 < 1000" in printed
    for name in ("report.md", "records.jsonl", "predictions.jsonl", "examples/test_rec.png"):
        assert (out / name).is_file()
    records = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]

    assert main(args) == 0  # everything from the cache, the same numbers
    again = json.loads((out / "metrics.json").read_text())
    assert again["run"] == {"queries": 24, "from_cache": 24, "computed": 0}
    assert again["results"] == m["results"]

    # what was scored is the Predictor's own output for the rendered scene and the sample's prompt
    predictor = Predictor.from_pretrained(checkpoint)
    rec = [r for r in records if r["task"] == "rec"]
    scenes = [world.make_scene(r["scene_id"], r["split"]) for r in rec]
    direct = predictor.ground(
        [world.render(s) for s in scenes], [r["prompt"] for r in rec], **m["generation"]
    )
    for r, d in zip(rec, direct, strict=True):
        assert r["text"] == d.text
        want = [list(b) for e in d.entities if e.phrase.strip() == r["expression"] for b in e.pixel_boxes]
        assert r["predicted"] == pytest.approx(want)


# ------------------------------------------------------------------------------------------------------------
# Custom REC / phrase samples (in memory or a JSON Lines file)


def test_in_memory_rec_and_phrase_samples(tmp_path) -> None:
    image = Image.new("RGB", (64, 64), (40, 40, 40))
    rec = [
        # two true boxes; the output (0,0,2,2) has IoU 0.5 with the second -> correct
        synthetic.RecSample("r1", image, "the red square", [(40, 40, 64, 64), (0, 0, 4, 2)]),
        synthetic.RecSample("r2", image, "the blue circle", [(0, 0, 16, 16)]),  # nothing decodable
    ]
    phrases = [
        synthetic.PhraseSample.from_caption(
            "p1", image, "An image of two red squares", (12, 27), [(0, 0, 10, 10), (30, 30, 60, 60)]
        ),
    ]
    assert phrases[0].phrase == "two red squares"
    assert phrases[0].prompt == "<grounding>An image of  <phrase>two red squares</phrase>"
    fake = ScriptedPredictor(
        {
            "<grounding><phrase>the red square</phrase>": obj((0, 0)),
            "<grounding><phrase>the blue circle</phrase>": "<object></object>",
            phrases[0].prompt: obj((20, 185), (495, 957)),
        }
    )
    result = synthetic.evaluate(
        fake, tmp_path / "out", rec=rec, phrases=phrases, model_id="fake", progress=False
    )
    s = result["rec"]["results"]["synthetic"]["rec"]
    assert (s["count"], s["acc_first"], s["acc_any"], s["acc_mean"], s["undecodable"]) == (
        2,
        50.0,
        50.0,
        50.0,
        1,
    )
    r = result["phrases"]["results"]["synthetic"]["recall"]["all"]
    assert (r["count"], r["R@1"], r["R@5"]) == (1, 0.0, 100.0)
    for part in ("rec", "phrases"):
        assert (tmp_path / "out" / part / "report.md").is_file()
        assert (tmp_path / "out" / part / "samples.png").is_file()


def test_jsonl_samples(tmp_path) -> None:
    write_image(tmp_path / "a.png", 64, 64)
    lines = [
        {"id": "q1", "image": "a.png", "expression": "the dog", "boxes": [[0, 0, 4, 2]]},
        {
            "id": "q2",
            "image": "a.png",
            "caption": "A dog chases a ball",
            "span": [13, 19],
            "boxes": [[0, 0, 8, 8]],
            "types": ["toys"],
        },
    ]
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rec, phrases = synthetic.load_samples(tmp_path / "s.jsonl")
    assert (
        rec[0].image == tmp_path / "a.png" and phrases[0].phrase == "a ball" and phrases[0].types == ("toys",)
    )
    fake = ScriptedPredictor({"<grounding><phrase>the dog</phrase>": obj((0, 0))})
    result = synthetic.evaluate(fake, tmp_path / "o", rec=rec, phrases=phrases, model_id="m", progress=False)
    assert result["rec"]["results"]["synthetic"]["rec"]["acc_first"] == 100.0
    (tmp_path / "bad.jsonl").write_text('{"id": "x", "image": "a.png", "boxes": []}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 1: a sample needs 'expression'"):
        synthetic.load_samples(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="no ground-truth box"):
        synthetic.evaluate(
            fake,
            tmp_path / "o2",
            rec=[synthetic.RecSample("z", tmp_path / "a.png", "x", [])],
            model_id="m",
            progress=False,
        )
