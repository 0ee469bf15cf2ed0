"""Detectors of GRIT construction: NMS and the confidence rule by hand, precomputed detections, and the
Grounding DINO / OWLv2 detectors on tiny random models against transformers' own post-processing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from kosmos2.data.detectors import (
    GroundingDinoDetector,
    Owlv2Detector,
    PrecomputedDetections,
    box_iou,
    grounding_dino_prompt,
    make_detector,
    nms,
    select_detections,
)

# ------------------------------------------------------------------------------------------------------------
# Step 4 by hand


def test_box_iou_by_hand():
    a = np.array([[0.0, 0.0, 2.0, 2.0]])
    b = np.array([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [0.5, 0.5, 0.5, 1.0]])
    # overlap 1x1 of union 4 + 4 - 1 = 7; touching corners: 0; identical: 1; an empty box: 0
    np.testing.assert_allclose(box_iou(a, b), [[1 / 7, 0.0, 1.0, 0.0]])
    # IoU is unchanged by scaling x and y differently (normalised vs. pixel boxes)
    scale = np.array([640.0, 480.0, 640.0, 480.0])
    np.testing.assert_allclose(box_iou(a * scale, b * scale), box_iou(a, b))


def test_nms_by_hand():
    boxes = np.array(
        [
            [0.0, 0.0, 1.0, 1.0],  # 0: score 0.9
            [0.0, 0.0, 1.0, 0.9],  # 1: IoU 0.9 with box 0 -> suppressed
            [0.5, 0.0, 1.5, 1.0],  # 2: IoU 1/3 with box 0 -> kept at 0.5
            [0.6, 0.0, 1.6, 1.0],  # 3: IoU 0.9/1.1 with box 2 -> suppressed by 2
        ]
    )
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    # with 0.3, box 2 (IoU 1/3 > 0.3 with box 0) goes too, which frees box 3 (IoU 0.4/1.6 = 0.25 with box 0)
    assert nms(boxes, scores, 0.3).tolist() == [0, 3]
    # threshold 1.0 turns it off; result is best first
    assert nms(boxes, scores[::-1].copy(), 1.0).tolist() == [3, 2, 1, 0]
    # equal scores keep input order
    assert nms(boxes[:2], np.array([0.5, 0.5]), 0.5).tolist() == [0]


def test_select_detections_threshold_then_nms_across_phrases():
    detections = [
        (0, (0.0, 0.0, 0.5, 0.5), 0.90),
        (1, (0.0, 0.0, 0.5, 0.49), 0.80),  # another phrase, same object: suppressed across phrases
        (1, (0.6, 0.6, 0.9, 0.9), 0.66),  # kept
        (2, (0.6, 0.6, 0.9, 0.9), 0.65),  # not above 0.65: dropped (the rule is strict)
        (2, (0.1, 0.6, 0.1, 0.9), 0.99),  # no area: dropped
    ]
    kept = select_detections(detections, score_threshold=0.65, nms_iou=0.5)
    assert kept == [detections[0], detections[2]]
    assert select_detections(detections, score_threshold=0.65, nms_iou=1.0) == detections[:3]
    assert select_detections([], 0.65, 0.5) == []


# ------------------------------------------------------------------------------------------------------------
# Precomputed detections


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_precomputed_matches_phrases_by_text_and_index(tmp_path):
    file = _write_jsonl(
        tmp_path / "det.jsonl",
        [
            {
                "key": "a",
                "detections": [
                    {"phrase": "A  Dog ", "box": [0.1, 0.2, 0.3, 0.4], "score": 0.9},
                    {"phrase_index": 1, "box": [0.5, 0.5, 1.0, 1.0], "score": 0.7},
                    {"phrase": "a unicorn", "box": [0, 0, 1, 1], "score": 0.99},  # not a phrase of this image
                    {"phrase": "a dog", "box": [0.0, 0.0, 1.0, 1.002], "score": 0.8},  # clipped to 1.0
                ],
            },
            {"key": "b", "detections": []},
        ],
    )
    detector = PrecomputedDetections(file)
    images = [Image.new("RGB", (4, 4))] * 3
    found = detector.detect(images, [["a dog", "the grass", "a dog"], ["x"], ["y"]], keys=["a", "b", "c"])
    assert found == [
        [(0, (0.1, 0.2, 0.3, 0.4), 0.9), (1, (0.5, 0.5, 1.0, 1.0), 0.7), (0, (0.0, 0.0, 1.0, 1.0), 0.8)],
        [],
        [],
    ]
    with pytest.raises(ValueError, match="keys"):
        detector.detect(images[:1], [["a dog"]])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"detections": []}', "expected"),
        ('{"key": "a", "detections": [{"phrase": "x", "box": [0, 0, 1], "score": 0.5}]}', "4 numbers"),
        ('{"key": "a", "detections": [{"phrase": "x", "box": [0, 0, 64, 48], "score": 0.5}]}', "normalised"),
        ('{"key": "a", "detections": [{"phrase": "x", "box": [0, 0, 1, 1], "score": 2}]}', "score"),
        ('{"key": "a", "detections": [{"box": [0, 0, 1, 1], "score": 0.5}]}', "phrase"),
    ],
)
def test_precomputed_bad_lines_name_file_and_line(tmp_path, line, message):
    file = tmp_path / "det.jsonl"
    file.write_text('{"key": "ok", "detections": []}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as info:
        PrecomputedDetections(file)
    assert f"{file}:2" in str(info.value)


def test_missing_inputs_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_detector("precomputed", tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_detector("owlv2", tmp_path / "nope")
    (tmp_path / "m").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        make_detector("grounding-dino", tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"model_type": "owlv2"}')
    with pytest.raises(ValueError, match="not Grounding DINO"):
        make_detector("grounding-dino", tmp_path / "m")
    with pytest.raises(ValueError, match="unknown detector"):
        make_detector("glip", tmp_path / "m")


def test_grounding_dino_prompt():
    prompt, spans = grounding_dino_prompt(["A Dog", "St. Mary's  church"])
    assert prompt == "a dog. st mary's church."  # lower case, "." inside a phrase -> space, spaces collapsed
    assert [prompt[s:e] for s, e in spans] == ["a dog", "st mary's church"]


# ------------------------------------------------------------------------------------------------------------
# Model detectors on tiny random models, against transformers


def _images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (70, 40, 3), dtype=np.uint8)),
    ]


@pytest.fixture(scope="module")
def grounding_dino_dir(tmp_path_factory):
    from _detector_fixtures import build_grounding_dino

    return build_grounding_dino(tmp_path_factory.mktemp("grounding_dino"))


@pytest.fixture(scope="module")
def owlv2_dir(tmp_path_factory):
    # transformers' OWLv2 image processor needs scipy when torchvision is absent (as here)
    pytest.importorskip("scipy", reason="OWLv2's image processor needs scipy without torchvision")
    from _detector_fixtures import build_owlv2

    return build_owlv2(tmp_path_factory.mktemp("owlv2"))


def _check_ranges(found, phrases_per_image):
    for detections, phrases in zip(found, phrases_per_image, strict=True):
        for p, box, score in detections:
            assert 0 <= p < len(phrases)
            assert len(box) == 4 and all(0.0 <= v <= 1.0 for v in box)
            assert box[0] <= box[2] and box[1] <= box[3]
            assert 0.0 < score <= 1.0


@pytest.mark.reference
def test_grounding_dino_matches_transformers_post_processing(grounding_dino_dir):
    import torch
    from transformers import AutoProcessor, GroundingDinoForObjectDetection

    images = _images()
    phrases = [["a red dog", "the cat"], ["a man"]]
    detector = GroundingDinoDetector(grounding_dino_dir)
    found = detector.detect(images, phrases)
    num_queries = detector.model.config.num_queries
    assert [len(f) for f in found] == [num_queries, num_queries]  # min_score 0: every query
    _check_ranges(found, phrases)

    # The reference: transformers' processor, model and post-processing on the same batch. Our score for a
    # query is its best probability over the tokens of phrases, so the reference sees logits with every other
    # token (specials, the "." separators) masked out; its max over tokens is then our score, and its label
    # (the tokens above a text threshold just under the score) is the text of the winning token.
    processor = AutoProcessor.from_pretrained(grounding_dino_dir)
    model = GroundingDinoForObjectDetection.from_pretrained(grounding_dino_dir).eval()
    prompts = ["a red dog. the cat.", "a man."]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        outputs = model(**inputs)
    ids = inputs["input_ids"]
    not_phrase = (ids == 101) | (ids == 102) | (ids == 1012) | (ids == 0)  # [CLS] [SEP] "." [PAD]
    logits = outputs.logits.clone()
    T = ids.shape[1]
    logits[:, :, :T] = logits[:, :, :T].masked_fill(not_phrase[:, None, :], -torch.inf)
    outputs.logits = logits
    for b, image in enumerate(images):
        w, h = image.size
        ours = found[b]
        ref = processor.post_process_grounded_object_detection(
            outputs, ids, threshold=0.0, text_threshold=0.0, target_sizes=[(h, w)] * 2
        )[b]
        torch.testing.assert_close(torch.tensor([s for _, _, s in ours]), ref["scores"], rtol=0, atol=1e-6)
        pixels = torch.tensor([box for _, box, _ in ours]) * torch.tensor([w, h, w, h])
        clipped = torch.minimum(ref["boxes"].clamp(min=0), torch.tensor([w, h, w, h], dtype=torch.float32))
        torch.testing.assert_close(pixels, clipped, rtol=0, atol=1e-4)
        for q, (p, _, score) in enumerate(ours):
            winner = processor.post_process_grounded_object_detection(
                outputs, ids, threshold=0.0, text_threshold=score - 1e-6, target_sizes=[(h, w)] * 2
            )[b]["text_labels"][q]
            assert winner and winner in phrases[b][p]


@pytest.mark.reference
def test_grounding_dino_splits_long_phrase_lists(grounding_dino_dir):
    # max_text_len is 24 in the tiny model: eight phrases need several prompts; every phrase is still scored
    phrases = [["a red dog", "the cat", "a man", "the grass", "a ball", "the field", "a woman", "the park"]]
    detector = GroundingDinoDetector(grounding_dino_dir)
    groups = detector._groups(phrases[0])
    assert len(groups) > 1 and sorted(i for g in groups for i in g) == list(range(8))
    found = detector.detect(_images()[:1], phrases)
    _check_ranges(found, phrases)
    assert len(found[0]) == len(groups) * detector.model.config.num_queries
    assert detector.detect(_images()[:1], [[]]) == [[]]


@pytest.mark.reference
def test_owlv2_matches_transformers_post_processing(owlv2_dir):
    import torch
    from transformers import AutoProcessor, Owlv2ForObjectDetection

    images = _images()
    phrases = [["the dog", "a cat"], ["a man", "the ball"]]
    detector = Owlv2Detector(owlv2_dir)
    found = detector.detect(images, phrases)
    patches = (64 // 16) ** 2
    assert [len(f) for f in found] == [patches, patches]
    _check_ranges(found, phrases)

    processor = AutoProcessor.from_pretrained(owlv2_dir)
    model = Owlv2ForObjectDetection.from_pretrained(owlv2_dir).eval()
    inputs = processor(
        text=phrases, images=images, return_tensors="pt", padding="max_length", truncation=True
    )
    with torch.no_grad():
        outputs = model(**inputs)
    sizes = [(im.size[1], im.size[0]) for im in images]
    reference = processor.post_process_grounded_object_detection(outputs, threshold=0.0, target_sizes=sizes)
    for b, image in enumerate(images):
        w, h = image.size
        ref = reference[b]
        assert [p for p, _, _ in found[b]] == ref["labels"].tolist()
        scores = torch.tensor([s for _, _, s in found[b]])
        torch.testing.assert_close(scores, ref["scores"], rtol=0, atol=1e-6)
        # transformers gives pixels of the image (scaled by the padded square's side); ours are normalised
        pixels = torch.tensor([box for _, box, _ in found[b]]) * torch.tensor([w, h, w, h])
        clipped = torch.minimum(ref["boxes"].clamp(min=0), torch.tensor([w, h, w, h], dtype=torch.float32))
        torch.testing.assert_close(pixels, clipped, rtol=0, atol=1e-4)


@pytest.mark.reference
def test_owlv2_ignores_padded_queries_and_min_score(owlv2_dir):
    phrases = [["the dog", "a cat", "a man"], ["the ball"], []]
    images = _images() + [Image.new("RGB", (30, 30))]
    found = Owlv2Detector(owlv2_dir).detect(images, phrases)
    _check_ranges(found, phrases)
    assert found[2] == []
    assert {p for p, _, _ in found[1]} == {0}
    strict = Owlv2Detector(owlv2_dir, min_score=0.5).detect(images, phrases)
    assert strict[0] == [d for d in found[0] if d[2] > 0.5]
