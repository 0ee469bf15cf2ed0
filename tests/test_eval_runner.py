"""Batched inference and the prediction cache: batching, resuming after an interruption, torn lines, keys."""

from __future__ import annotations

import json

import pytest
from _eval_fixtures import ScriptedPredictor, obj
from PIL import Image

from kosmos2.eval.runner import PredictionCache, Query, cache_key, limit_queries, run_queries


def _queries(n: int) -> list[Query]:
    image = Image.new("RGB", (64, 32))
    return [Query(f"q{i}", image, f"<grounding><phrase>thing {i}</phrase>", (64, 32)) for i in range(n)]


def _outputs(n: int) -> dict[str, str]:
    return {f"<grounding><phrase>thing {i}</phrase>": obj((i, 33 + i)) for i in range(n)}


def test_batches_and_results(tmp_path) -> None:
    qs = _queries(5)
    fake = ScriptedPredictor(_outputs(5))
    preds, stats = run_queries(
        fake,
        qs,
        model_id="m",
        cache=tmp_path / "c.jsonl",
        batch_size=2,
        progress=False,
        generation={"max_new_tokens": 9},
    )
    assert [len(p) for p, _, _ in fake.calls] == [2, 2, 1]
    assert all(g == {"max_new_tokens": 9} for _, _, g in fake.calls)
    assert (stats.total, stats.cached, stats.computed, stats.batches) == (5, 0, 5, 3)
    # cell 0 -> 33: corners in different rows and columns -> centres (0.5/32, 0.5/32, 1.5/32, 1.5/32)
    assert preds["q0"].boxes_for("thing 0") == [(0.5 / 32, 0.5 / 32, 1.5 / 32, 1.5 / 32)]
    assert preds["q0"].pixel_boxes_for(" thing  0 ", (64, 32)) == [(1.0, 0.5, 3.0, 1.5)]
    assert preds["q0"].boxes_for("thing 1") == []
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 5


def test_interrupted_run_resumes_without_recomputing(tmp_path) -> None:
    qs, cache = _queries(5), tmp_path / "c.jsonl"
    dying = ScriptedPredictor(_outputs(5), fail_after=1)  # the second batch is interrupted
    with pytest.raises(KeyboardInterrupt):
        run_queries(dying, qs, model_id="m", cache=cache, batch_size=2, progress=False)
    assert len(cache.read_text().splitlines()) == 2  # the first batch was saved

    fresh = ScriptedPredictor(_outputs(5))
    preds, stats = run_queries(fresh, qs, model_id="m", cache=cache, batch_size=2, progress=False)
    assert fresh.prompts_seen == [q.prompt for q in qs[2:]]
    assert (stats.cached, stats.computed) == (2, 3)
    again = ScriptedPredictor(_outputs(5))
    preds2, stats2 = run_queries(again, qs, model_id="m", cache=cache, batch_size=2, progress=False)
    assert again.calls == [] and stats2.cached == 5 and preds2 == preds


def test_key_covers_model_prompt_and_generation(tmp_path) -> None:
    qs, cache = _queries(2), tmp_path / "c.jsonl"
    run_queries(ScriptedPredictor(), qs, model_id="m", cache=cache, progress=False)
    for kwargs in ({"model_id": "other"}, {"model_id": "m", "generation": {"num_beams": 5}}):
        fake = ScriptedPredictor()
        run_queries(fake, qs, cache=cache, progress=False, **kwargs)
        assert len(fake.prompts_seen) == 2
    changed = [Query(q.id, q.image, q.prompt + " is", q.size) for q in qs]
    fake = ScriptedPredictor()
    run_queries(fake, changed, model_id="m", cache=cache, progress=False)
    assert len(fake.prompts_seen) == 2
    assert cache_key("a", "m", "p", {"x": 1, "y": 2}) == cache_key("a", "m", "p", {"y": 2, "x": 1})


def test_torn_last_line_is_dropped_and_overwritten(tmp_path) -> None:
    qs, cache = _queries(3), tmp_path / "c.jsonl"
    run_queries(ScriptedPredictor(_outputs(3)), qs[:2], model_id="m", cache=cache, progress=False)
    with open(cache, "a") as f:
        f.write('{"key": "abc", "text": "half a rec')  # killed mid-write
    c = PredictionCache(cache)
    assert len(c) == 2 and cache.read_text().endswith("\n")
    fake = ScriptedPredictor(_outputs(3))
    run_queries(fake, qs, model_id="m", cache=c, progress=False)
    assert fake.prompts_seen == [qs[2].prompt]
    assert all(json.loads(line) for line in cache.read_text().splitlines())


def test_bad_inputs_raise_clear_errors(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl', line 1: not a prediction record"):
        PredictionCache(bad)
    qs = _queries(2)
    with pytest.raises(ValueError, match="appears twice"):
        run_queries(ScriptedPredictor(), [qs[0], qs[0]], model_id="m", progress=False)

    class Short(ScriptedPredictor):
        def ground(self, images, prompts, **gen):
            return super().ground(images, prompts, **gen)[:-1]

    with pytest.raises(RuntimeError, match="1 results for a batch of 2"):
        run_queries(Short(), qs, model_id="m", progress=False)
    with pytest.raises(ValueError, match="--limit"):
        limit_queries(qs, 0)
    assert limit_queries(qs, 1) == qs[:1]


def test_answer_is_the_generated_words_without_markup() -> None:
    fake = ScriptedPredictor({"<phrase>It</phrase>" + obj((0, 33)) + " is": " a brown<phrase> dog</phrase>"})
    preds, _ = run_queries(
        fake,
        [Query("r", Image.new("RGB", (8, 8)), "<phrase>It</phrase>" + obj((0, 33)) + " is", (8, 8))],
        model_id="m",
        progress=False,
    )
    assert preds["r"].answer == "a brown dog"
    assert preds["r"].caption == "It is a brown dog"


def test_one_decoded_image_per_file_in_a_batch(tmp_path) -> None:
    from _eval_fixtures import write_image

    path = write_image(tmp_path / "a.png", 16, 8)
    seen = []

    class Recording(ScriptedPredictor):
        def ground(self, images, prompts, **gen):
            seen.append([id(im) for im in images])
            return super().ground(images, prompts, **gen)

    qs = [Query(f"q{i}", path, f"p{i}", (16, 8)) for i in range(3)]
    run_queries(Recording(), qs, model_id="m", batch_size=3, progress=False)
    assert len(set(seen[0])) == 1
