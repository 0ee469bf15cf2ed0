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

    def spy(images, prompts, defaults, options, **hooks):
        seen.append((prompts, {**defaults, **options}))
        return real(images, prompts, defaults, {**options, "max_new_tokens": 2}, **hooks)

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
    streamed = [e.entity for e in events if e.kind == "entity"]
    assert [(e.phrase, e.span, e.boxes, e.pixel_boxes) for e in streamed] == [
        (e.phrase, e.span, e.boxes, e.pixel_boxes) for e in expected.entities
    ]
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


# -- prompts, tasks, region units (issue 34) -------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, where",
    [
        ("<grounding>the circle<patch_index_9999>", r"at character 21: location token '<patch_index_9999>'"),
        ("<grounding><phrase>the circle", r"at character 11: unclosed <phrase>"),
        ("<grounding><phrase></phrase></phrase>", r"at character 11: empty <phrase>"),
    ],
)
def test_malformed_prompts_are_refused_before_generation(predictor, prompt, where):
    from kosmos2.errors import PromptError

    with pytest.raises(PromptError, match=where):
        predictor.ground(images(1)[0], prompt, max_new_tokens=2)
    with pytest.raises(PromptError, match=r"'</phrase>' closes no <phrase>"):
        predictor.locate(images(1)[0], "x</phrase> y", max_new_tokens=2)  # <phrase>x</phrase> y</phrase>
    with pytest.raises(PromptError, match="empty <phrase>"):
        predictor.locate(images(1)[0], "", max_new_tokens=2)


def test_describe_region_units(predictor, monkeypatch):
    seen = []
    real = predictor._run

    def spy(images, prompts, defaults, options):
        seen.append(prompts)
        return real(images, prompts, defaults, {**options, "max_new_tokens": 1})

    monkeypatch.setattr(predictor, "_run", spy)
    im = Image.new("RGB", (120, 80))
    # (0.1, 0.1, 0.5, 0.5) normalised = (12, 8, 60, 40) pixels: cells col/row floor(3.2) = 3 -> 3*32+3 = 99
    # and ceil(16 - 1) = 15 -> 15*32+15 = 495, by hand
    want = "<phrase> It</phrase><object><patch_index_0099><patch_index_0495></object> is"
    predictor.describe_region(im, (12, 8, 60, 40))  # pixels: the default
    predictor.describe_region(im, (0.1, 0.1, 0.5, 0.5), units="normalized")
    predictor.describe_region(im, (0.1, 0.1, 0.5, 0.5), normalized=True)  # the older spelling
    assert seen == [want, want, want]
    # a normalised box given as pixels: a warning, in the caller's words
    with pytest.warns(
        UserWarning, match=r"\(0.1, 0.1, 0.5, 0.5\) is read as pixels.*120x80.*units='normalized'"
    ):
        predictor.describe_region(im, (0.1, 0.1, 0.5, 0.5))
    # errors speak the units the caller used
    with pytest.raises(
        ValueError, match=r"\(10, 20, 500, 60\) \(pixels\) reaches outside the 120x80 image \(x2 = 500"
    ):
        predictor.describe_region(im, (10, 20, 500, 60))
    with pytest.raises(ValueError, match=r"outside \[0, 1\], but units='normalized'; .* units='pixels'"):
        predictor.describe_region(im, (10, 20, 100, 60), units="normalized")
    with pytest.raises(ValueError, match=r"\(60, 8, 12, 40\) \(pixels\) is empty or inverted"):
        predictor.describe_region(im, (60, 8, 12, 40))
    with pytest.raises(ValueError, match="units='inches'"):
        predictor.describe_region(im, (1, 2, 3, 4), units="inches")


def test_a_model_states_its_tasks(tiny_checkpoint_dir, tmp_path):
    from kosmos2.errors import UnsupportedTaskError
    from kosmos2.predictor import TASKS

    assert Predictor.from_pretrained(tiny_checkpoint_dir).tasks is None  # does not say: every task is tried
    copy = tmp_path / "model"
    shutil.copytree(tiny_checkpoint_dir, copy)
    (copy / "generation_config.json").write_text('{"kosmos2_tasks": ["grounded_caption", "vqa"]}')
    p = Predictor.from_pretrained(copy)
    assert p.tasks == {"grounded_caption", "vqa"} and p.supports("vqa") and not p.supports("rec")
    assert p.caption(images(1)[0], max_new_tokens=1).prompt == "<grounding>An image of"
    for call, task in [
        (lambda: p.caption(images(1)[0], detailed=True), "detailed_caption"),
        (lambda: p.locate(images(1)[0], "a ball"), "rec"),
        (lambda: p.describe_region(images(1)[0], (0, 0, 5, 5)), "reg"),
        (lambda: p.ground_phrases(images(1)[0], "a ball", ["a ball"]), "phrase_grounding"),
        (lambda: p.vqa(images(1)[0], "what?", grounded=True), "grounded_vqa"),
    ]:
        with pytest.raises(
            UnsupportedTaskError, match=rf"{copy} was not trained for {task} .*grounded_caption, vqa"
        ):
            call()
    (copy / "generation_config.json").write_text('{"kosmos2_tasks": ["poetry"]}')
    with pytest.raises(ValueError, match="kosmos2_tasks must be a list of task names"):
        Predictor.from_pretrained(copy)
    assert set(TASKS) >= {"rec", "reg", "detailed_caption"}


def test_the_default_model_states_its_tasks_and_refuses_detailed_descriptions(monkeypatch):
    """The shipped model was trained on the synthetic world's seven tasks (the synthetic recipe's mixture),
    which has no detailed descriptions."""
    from kosmos2.errors import UnsupportedTaskError
    from kosmos2.predictor import DEFAULT_MODEL_ENV

    monkeypatch.delenv(DEFAULT_MODEL_ENV, raising=False)
    p = Predictor.from_pretrained()
    from kosmos2.train.recipes.synthetic import _default_mixture

    assert p.tasks == set(_default_mixture())
    with pytest.raises(UnsupportedTaskError, match="not trained for detailed_caption"):
        p.caption("examples/shapes.png", detailed=True)


def test_a_bad_model_variable_is_named(monkeypatch, tmp_path):
    from kosmos2.predictor import DEFAULT_MODEL_ENV

    monkeypatch.setenv(DEFAULT_MODEL_ENV, str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=rf"^\$KOSMOS2_MODEL='{tmp_path}/nope': .*does not exist"):
        Predictor.from_pretrained()
    monkeypatch.setenv(DEFAULT_MODEL_ENV, str(tmp_path))  # a folder, but no checkpoint in it
    with pytest.raises((OSError, ValueError), match=r"^\$KOSMOS2_MODEL="):
        Predictor.from_pretrained()
    (tmp_path / "config.json").write_text("{")  # malformed JSON: JSONDecodeError takes other arguments
    with pytest.raises(ValueError, match=r"^\$KOSMOS2_MODEL='.*': .*config\.json: not valid JSON"):
        Predictor.from_pretrained()


def test_a_malformed_generation_config_is_named(tiny_checkpoint_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_checkpoint_dir, copy)
    (copy / "generation_config.json").write_text("{")
    with pytest.raises(ValueError, match=r"generation_config\.json: not valid JSON"):
        Predictor.from_pretrained(copy)


def test_devices_the_machine_lacks_are_refused_with_a_message(tiny_checkpoint_dir):
    from kosmos2.errors import UsageError, UserError

    with pytest.raises(UsageError, match="'bogus' is not a torch device"):
        Predictor.from_pretrained(tiny_checkpoint_dir, device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            Predictor.from_pretrained(tiny_checkpoint_dir, device="cuda")


def test_the_readme_python_example_runs_on_the_default_model(monkeypatch, capsys):
    """README "Using it": its first Python block runs the built-in model on examples/shapes.png, and prints
    what its comments say."""
    from pathlib import Path

    from kosmos2.predictor import DEFAULT_MODEL_ENV

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    block = readme.split("## Using it", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "Predictor.from_pretrained()" in block and "examples/shapes.png" in block
    assert "scene.png" not in block  # kept for the official weights' block
    monkeypatch.delenv(DEFAULT_MODEL_ENV, raising=False)
    monkeypatch.chdir(root)
    exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    caption = "An image of a large blue square , a large orange circle and a large purple diamond ."
    assert printed[0] == caption and f"# {caption}" in block
    assert printed[1] == "a large blue square (12, 31) [(6.125, 20.46875, 116.375, 126.90625)]"
    assert printed[1].split(" (")[0] in block and "(6.125, 20.46875, 116.375, 126.90625)" in block
    assert printed[4].startswith("[(153.125, 110.53125") and "[(153.125, 110.53125, ...)]" in block
    assert printed[5:] == ["the large blue square", "purple"]
