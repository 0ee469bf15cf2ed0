"""The hook for in-memory samples (the synthetic world) and JSON Lines files: the benchmarks' metrics."""

from __future__ import annotations

import json

import pytest
from _eval_fixtures import ScriptedPredictor, obj, write_image
from PIL import Image

from kosmos2.eval import synthetic


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


def test_world_samples_scale_boxes_to_the_rendered_image() -> None:
    world = pytest.importorskip("kosmos2.data.synthetic")
    rec, phrases = synthetic.world_samples("test", 2)
    assert len(rec) == 2 and len(phrases) == 2
    for s in rec:
        w, h = s.image.size
        sample = next(
            x for x in world.make_eval_set("test", 2, tasks=("rec",)) if x["expression"] == s.expression
        )
        assert s.boxes == [(b[0] * w, b[1] * h, b[2] * w, b[3] * h) for b in sample["boxes"]]
        assert s.prompt == sample["prompt"]
    assert all(p.prompt.startswith("<grounding>") and p.phrase in p.prompt for p in phrases)


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
