"""The Predictor end to end on a tiny random checkpoint with a real (small) tokenizer: results equal what
transformers' processor + model + post-processing give on the same directory; task prompts are SPEC §1's."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from kosmos2 import grounding
from kosmos2.predictor import Predictor


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint_dir) -> Predictor:
    return Predictor.from_pretrained(tiny_checkpoint_dir)


def images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(64, 48), (30, 90), (28, 28), (120, 40)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


@pytest.mark.reference
def test_ground_equals_transformers_pipeline(tiny_checkpoint_dir, predictor):
    transformers = pytest.importorskip("transformers")
    # the reference pipeline, assembled from transformers' own classes over the same files
    image_processor = transformers.CLIPImageProcessor(
        size={"height": 28, "width": 28},
        do_center_crop=False,
        resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint_dir)
    processor = transformers.Kosmos2Processor(image_processor, tokenizer, num_patch_index_tokens=1024)
    model = transformers.Kosmos2ForConditionalGeneration.from_pretrained(
        tiny_checkpoint_dir, attn_implementation="eager"
    ).eval()
    for image, prompt in zip(
        images(3),
        ["<grounding>An image of", "<grounding><phrase>a red ball</phrase>", "Question: what? Answer:"],
        strict=True,
    ):
        ours = predictor.ground(image, prompt, max_new_tokens=20)
        inputs = processor(text=prompt, images=image, return_tensors="pt")
        out = model.generate(
            pixel_values=inputs["pixel_values"],
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            image_embeds_position_mask=inputs["image_embeds_position_mask"],
            max_new_tokens=20,
            do_sample=False,
            no_repeat_ngram_size=3,
        )[0]
        new = out[inputs["input_ids"].shape[1] :].tolist()
        new = new[: new.index(2)] if 2 in new else new
        assert ours.token_ids == new
        full = processor.batch_decode(out[None], skip_special_tokens=True)[0]
        caption, entities = processor.post_process_generation(full, cleanup_and_extract=True)
        assert ours.caption == caption
        assert [(e.phrase, e.span, e.boxes) for e in ours.entities] == [
            (p, s, [tuple(b) for b in bs]) for p, s, bs in entities
        ]


def test_batched_equals_one_by_one(predictor):
    ims = images(4)
    prompts = ["<grounding>An image of", "<grounding><phrase>a dog</phrase>", "An image of", "Describe:"]
    batched = predictor.ground(ims, prompts, max_new_tokens=12)
    assert isinstance(batched, list) and len(batched) == 4
    for im, p, r in zip(ims, prompts, batched, strict=True):
        alone = predictor.ground(im, p, max_new_tokens=12)
        assert alone.token_ids == r.token_ids and alone.text == r.text
    small = Predictor(predictor.model, predictor.tokenizer, batch_size=3)  # two chunks of 3 + 1
    assert [r.token_ids for r in small.ground(ims, prompts, max_new_tokens=12)] == [
        r.token_ids for r in batched
    ]


def test_pixel_boxes_follow_the_original_size(predictor):
    im = images(1)[0]  # 64 x 48
    r = predictor.ground(
        im, "<grounding><phrase>x</phrase><object><patch_index_0033><patch_index_0990></object>"
    )
    # the prompt's own object is parsed into an entity: cells 33 -> (col 1,row 1), 990 -> (col 30,row 30)
    e = r.entities[0]
    assert e.phrase == "x"
    assert e.boxes[0] == pytest.approx((1.5 / 32, 1.5 / 32, 30.5 / 32, 30.5 / 32))
    assert e.pixel_boxes[0] == pytest.approx((1.5 / 32 * 64, 1.5 / 32 * 48, 30.5 / 32 * 64, 30.5 / 32 * 48))


def test_task_prompts(predictor, monkeypatch):
    seen: list[tuple[list[str], dict]] = []
    real = predictor._run

    def spy(images, prompts, defaults, options):
        seen.append((prompts, {**defaults, **options}))
        return real(images, prompts, defaults, {**options, "max_new_tokens": 2})

    monkeypatch.setattr(predictor, "_run", spy)
    im = images(1)[0]  # 64 x 48
    predictor.caption(im)
    predictor.caption(im, detailed=True)
    predictor.caption(im, grounded=False)
    predictor.locate(im, " the red ball ")
    predictor.vqa(im, "how many?")
    predictor.vqa(im, "how many?", grounded=True)
    predictor.describe_region(im, (0, 0, 32, 24))
    boxes = predictor.ground_phrases(im, "A man in a red hat", ["a red hat", (0, 5)])
    assert len(boxes) == 2
    prompts = [p for p, _ in seen]
    assert prompts[:6] == [
        "<grounding>An image of",
        "<grounding>Describe this image in detail:",
        "An image of",
        "<grounding><phrase>the red ball</phrase>",
        "Question: how many? Answer:",
        "<grounding> Question: how many? Answer:",
    ]
    assert seen[2][1]["num_beams"] == 5  # plain captions: beam 5, as the official evaluation
    # (0,0,32,24) in a 64x48 image is the top-left quarter: cells (0,0) and (15,15) -> 0 and 495
    assert prompts[6] == ("<phrase> It</phrase><object><patch_index_0000><patch_index_0495></object> is")
    assert prompts[7] == [
        "<grounding>A man in <phrase>a red hat</phrase>",
        "<grounding> <phrase>A man</phrase>",
    ]


def test_stream_joins_to_the_generated_text(predictor):
    im = images(1)[0]
    events = list(predictor.stream(im, "<grounding>An image of", max_new_tokens=10))
    expected = predictor.ground(im, max_new_tokens=10)
    assert "".join(e.text for e in events if e.kind == "text") == expected.caption
    assert events[-1].kind == "done" and events[-1].result == expected


def test_stream_sends_readable_text_and_each_entity_when_it_closes():
    # the built-in default model writes grounded captions of examples/shapes.png (three entities)
    from pathlib import Path

    p = Predictor.from_pretrained()
    image = Path(__file__).parent.parent / "examples" / "shapes.png"
    expected = p.ground(image)
    assert len(expected.entities) >= 2  # the test needs a caption with entities
    events = list(p.stream(image))
    texts = [e.text for e in events if e.kind == "text"]
    assert texts[0] == "An image of"  # the prompt's own readable text comes first
    assert not any("<" in t for t in texts)  # no markup, no raw tokens
    assert "".join(texts) == expected.caption
    assert [e.entity for e in events if e.kind == "entity"] == expected.entities
    assert [e.kind for e in events].count("done") == 1 and events[-1].result == expected
    sent = ""
    for e in events:  # an entity arrives once its phrase's text has been sent, not before
        if e.kind == "text":
            sent += e.text
        elif e.kind == "entity":
            start, end = e.entity.span
            assert len(sent) >= end and sent[start:end] == e.entity.phrase


def test_logits_are_the_teacher_forced_forward(predictor):
    im = images(1)[0]
    logits = predictor.logits(im, "<grounding>An image of")
    ids, mask = predictor.tokenizer.encode_prompt("<grounding>An image of")
    assert logits.shape == (len(ids), predictor.model.config.text.vocab_size)
    # the scores of the first generated token equal the last row
    r = predictor.ground(im, max_new_tokens=1, no_repeat_ngram_size=0)
    assert r.token_ids[0] == int(logits[-1].argmax())


def test_errors(predictor, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Predictor.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        predictor.ground(images(2), ["a", "b", "c"])
    with pytest.raises(TypeError, match="unknown generation option"):
        predictor.ground(images(1)[0], max_length=3)
    with pytest.raises(ValueError, match="does not occur"):
        predictor.ground_phrases(images(1)[0], "a cat", ["a dog"])
    with pytest.raises(ValueError, match="bfloat"):
        Predictor.from_pretrained(tmp_path, dtype="float8")


def test_bf16(tiny_checkpoint_dir):
    p = Predictor.from_pretrained(tiny_checkpoint_dir, dtype="bfloat16")
    assert p.model.text_model.lm_head.weight.dtype == torch.bfloat16
    r = p.ground(images(1)[0], max_new_tokens=4)
    assert len(r.token_ids) <= 4
    assert isinstance(grounding.parse(r.text).caption, str)


def test_generation_defaults_come_from_the_checkpoint(tiny_checkpoint_dir, tmp_path):
    # the official settings, as written by save_pretrained: no-repeat-ngram 3, greedy
    assert Predictor.from_pretrained(tiny_checkpoint_dir).generation.no_repeat_ngram_size == 3
    copy = tmp_path / "model"
    shutil.copytree(tiny_checkpoint_dir, copy)
    (copy / "generation_config.json").write_text(
        '{"no_repeat_ngram_size": 0, "max_new_tokens": 7, "num_beams": 2, "use_cache": true}'
    )
    p = Predictor.from_pretrained(copy)
    g = p.generation
    assert (g.no_repeat_ngram_size, g.max_new_tokens, g.num_beams) == (0, 7, 2)
    assert len(p.ground(images(1)[0]).token_ids) <= 7
    assert p.ground(images(1)[0], max_new_tokens=2, num_beams=1).token_ids  # call options still win
