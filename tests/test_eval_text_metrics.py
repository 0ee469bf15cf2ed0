"""Caption metrics through pycocoevalcap: CIDEr against a hand-worked value; what runs on Java."""

from __future__ import annotations

import pytest

pytest.importorskip("pycocoevalcap")

from kosmos2.eval import text_metrics  # noqa: E402

# Two items with disjoint vocabularies and one reference each. CIDEr-D by hand: item a repeats its reference
# word for word, so for every n its tf-idf n-gram vector equals the reference's (cosine 1; same length, so
# the Gaussian length penalty is 1); every n-gram occurs in one of the two reference sets, idf = log(2/1) > 0.
# Each n in 1..4 gives 1, times 10: CIDEr-D(a) = 10. Item b shares no n-gram with its reference: 0.
# Corpus CIDEr = (10 + 0) / 2 = 5, reported ×100 = 500.
CANDIDATES = {"a": "a brown dog runs on grass", "b": "three purple kites fly high"}
REFERENCES = {"a": ["a brown dog runs on grass"], "b": ["an old truck parked outside"]}


@pytest.mark.parametrize("tokenizer", ["simple", "ptb"])
def test_cider_equals_hand_value(tokenizer) -> None:
    if tokenizer == "ptb" and not text_metrics.java_available():
        pytest.skip("the PTB tokenizer needs Java")
    out = text_metrics.caption_metrics(CANDIDATES, REFERENCES, ("CIDEr", "BLEU-4"), tokenizer=tokenizer)
    assert out["tokenizer"] == tokenizer
    assert out["scores"]["CIDEr"] == pytest.approx(500.0, abs=1e-9)
    assert out["per_item"]["CIDEr"] == pytest.approx({"a": 1000.0, "b": 0.0}, abs=1e-9)
    # BLEU-4 of an exact 6-word match is 1 (brevity penalty 1); of no match ~0
    assert out["per_item"]["BLEU-4"]["a"] == pytest.approx(100.0, abs=1e-6)
    assert out["per_item"]["BLEU-4"]["b"] < 1e-3


@pytest.mark.skipif(not text_metrics.java_available(), reason="METEOR runs meteor-1.5.jar on Java")
def test_meteor_runs_on_java() -> None:
    out = text_metrics.caption_metrics(
        {"a": "a brown dog runs on grass", "b": "a dog on grass", "c": "three kites"},
        {"a": ["a brown dog runs on grass"], "b": ["a brown dog runs on grass"], "c": ["an old truck"]},
        ("METEOR",),
    )
    m = out["per_item"]["METEOR"]
    assert m["c"] == 0.0 and 0 < m["b"] < m["a"] <= 100.0
    assert 0 < out["scores"]["METEOR"] < 100.0  # corpus METEOR pools the statistics, not the item scores


def test_ptb_tokenisation_drops_punctuation_and_case() -> None:
    assert text_metrics.simple_tokenize("A Dog, running!  (fast)...") == "a dog running fast"
    assert text_metrics.simple_tokenize("the man's hat") == "the man's hat"


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="unknown caption metric"):
        text_metrics.caption_metrics({"a": "x"}, {"a": ["x"]}, ("SPICE",))
    with pytest.raises(ValueError, match="same ids"):
        text_metrics.caption_metrics({"a": "x"}, {"b": ["x"]})
    with pytest.raises(ValueError, match="non-empty list"):
        text_metrics.caption_metrics({"a": "x"}, {"a": "x"})
