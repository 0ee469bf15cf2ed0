"""Generation: greedy and beam search equal transformers' on the same random weights; batched rows equal
unbatched rows; streaming equals generate; the n-gram blocker equals a brute-force definition."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from kosmos2.config import Kosmos2Config
from kosmos2.generate import GenerationConfig, NGramBlocker, generate, stream
from kosmos2.model import Kosmos2

SLOTS = list(range(4, 68))


def layout(text_ids: list[int]) -> tuple[list[int], list[bool]]:
    """The Kosmos-2 prompt layout (SPEC §3), written out by hand."""
    ids = [0, 64003, *SLOTS, 64004, *text_ids]
    return ids, [False, False] + [True] * 64 + [False] * (len(text_ids) + 1)


def left_pad(rows: list[tuple[list[int], list[bool]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([[1] * (T - len(i)) + i for i, _ in rows])
    att = torch.tensor([[0] * (T - len(i)) + [1] * len(i) for i, _ in rows])
    img = torch.tensor([[False] * (T - len(m)) + m for _, m in rows])
    return ids, att, img


@pytest.fixture(scope="module")
def model() -> Kosmos2:
    torch.manual_seed(0)
    m = Kosmos2(Kosmos2Config.from_preset("tiny")).eval()
    with torch.no_grad():  # peaked logits: random 0.02-std weights give near-ties that float noise could flip
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return m


@pytest.fixture(scope="module")
def hf_model(model):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Kosmos2ForConditionalGeneration(
        transformers.Kosmos2Config(**model.config.to_hf_config())
    )
    hf.config._attn_implementation = "eager"
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.eval()


PROMPTS = [
    [64012, 100, 200, 300],  # <grounding> + words
    [64012, 64007, 500, 600, 64008],  # <grounding><phrase>..</phrase>
    [64007, 700, 64008, 64009, 64013 + 33, 64013 + 990, 64010, 800],  # box in the prompt
    [900],
]


def hf_generate(hf, ids, img, pixels, **kw) -> list[int]:
    out = hf.generate(
        pixel_values=pixels,
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        image_embeds_position_mask=torch.tensor([img]).long(),
        do_sample=False,
        no_repeat_ngram_size=3,
        **kw,
    )[0].tolist()[len(ids) :]
    return out[: out.index(2)] if 2 in out else out


@pytest.mark.reference
@pytest.mark.parametrize("num_beams", [1, 3])
def test_matches_transformers(model, hf_model, num_beams):
    torch.manual_seed(1)
    pixels = torch.randn(len(PROMPTS), 3, 28, 28)
    embeds = model.encode_image(pixels)
    for i, text in enumerate(PROMPTS):
        ids, img = layout(text)
        cfg = GenerationConfig(max_new_tokens=24, num_beams=num_beams)
        ours = generate(model, torch.tensor([ids]), None, embeds[i : i + 1], torch.tensor([img]), cfg)[0]
        ref = hf_generate(hf_model, ids, img, pixels[i : i + 1], max_new_tokens=24, num_beams=num_beams)
        assert ours == ref


@pytest.fixture(scope="module")
def int8_dynamic_model(model):
    from kosmos2.quantize import dynamic_available, prepare_model

    if not dynamic_available():
        pytest.skip("int8-dynamic needs FBGEMM (x86-64)")
    return prepare_model(copy.deepcopy(model), "int8-dynamic")


@pytest.mark.parametrize("options", [dict(), dict(num_beams=3), dict(no_repeat_ngram_size=0, num_beams=2)])
@pytest.mark.parametrize("dtype", ["float32", "int8-dynamic"])
def test_batched_rows_equal_unbatched(request, dtype, options):
    # int8-dynamic rounds activations per row: a row's answer must not depend on its batch-mates either
    model = request.getfixturevalue("model" if dtype == "float32" else "int8_dynamic_model")
    torch.manual_seed(2)
    pixels = torch.randn(len(PROMPTS), 3, 28, 28)
    embeds = model.encode_image(pixels)
    cfg = GenerationConfig(max_new_tokens=16, **options)
    rows = [layout(t) for t in PROMPTS]
    ids, att, img = left_pad(rows)
    batched = generate(model, ids, att, embeds, img, cfg)
    for i, (row_ids, row_img) in enumerate(rows):
        alone = generate(
            model, torch.tensor([row_ids]), None, embeds[i : i + 1], torch.tensor([row_img]), cfg
        )
        assert batched[i] == alone[0], f"row {i}"


def test_stream_equals_generate_and_stops_at_eos(model):
    torch.manual_seed(3)
    embeds = model.encode_image(torch.randn(2, 3, 28, 28))
    ids, att, img = left_pad([layout(PROMPTS[0]), layout(PROMPTS[3])])
    cfg = GenerationConfig(max_new_tokens=12)
    steps = list(stream(model, ids, att, embeds, img, cfg))
    assert 1 <= len(steps) <= 12
    streamed = torch.stack([t for t, _ in steps], dim=1).tolist()
    generated = generate(model, ids, att, embeds, img, cfg)
    assert [r[: len(g)] for r, g in zip(streamed, generated, strict=True)] == generated
    # a row that has finished yields pad tokens; finished never goes back to False
    done = torch.zeros(2, dtype=torch.bool)
    for tokens, finished in steps:
        assert not (done & ~finished).any()
        assert (tokens[done] == 1).all()
        done = finished


def test_eos_ends_a_row(model):
    # final LayerNorm outputs a constant vector equal to a scaled-up </s> embedding: </s> always wins
    m = Kosmos2(model.config).eval()
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        E = m.text_model.model.embed_tokens.weight
        E[2] *= 10
        m.text_model.model.layer_norm.weight.zero_()
        m.text_model.model.layer_norm.bias.copy_(E[2])
    ids, img = layout([100])
    embeds = m.encode_image(torch.randn(1, 3, 28, 28))
    logits, _ = m(torch.tensor([ids]), image_embeds=embeds, image_mask=torch.tensor([img]))
    assert int(logits[0, -1].argmax()) == 2
    for beams in (1, 2):
        cfg = GenerationConfig(max_new_tokens=5, num_beams=beams)
        assert generate(m, torch.tensor([ids]), None, embeds, torch.tensor([img]), cfg) == [[]]


def test_sampling(model):
    torch.manual_seed(4)
    embeds = model.encode_image(torch.randn(1, 3, 28, 28))
    ids, img = layout(PROMPTS[0])
    args = (model, torch.tensor([ids]), None, embeds, torch.tensor([img]))
    greedy = generate(*args, GenerationConfig(max_new_tokens=10))
    # top_k=1 and a vanishing top_p both leave only the argmax
    assert generate(*args, GenerationConfig(max_new_tokens=10, do_sample=True, top_k=1, seed=0)) == greedy
    assert generate(*args, GenerationConfig(max_new_tokens=10, do_sample=True, top_p=1e-9, seed=0)) == greedy
    # a seed makes sampling repeatable; a hot temperature departs from greedy
    hot = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=5.0, seed=7)
    assert generate(*args, hot) == generate(*args, hot)
    assert generate(*args, hot) != greedy


def brute_force_banned(history: list[int], n: int) -> set[int]:
    if len(history) < n - 1:
        return set()
    tail = history[len(history) - n + 1 :] if n > 1 else []
    return {history[i + n - 1] for i in range(len(history) - n + 1) if history[i : i + n - 1] == tail}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ngram_blocker_equals_brute_force(n):
    rng = random.Random(n)
    histories = [[rng.randrange(6) for _ in range(rng.randrange(0, 12))] for _ in range(5)]
    blocker = NGramBlocker(histories, n)
    for _ in range(30):
        logits = torch.zeros(5, 6)
        blocker.ban(logits)
        for b, h in enumerate(blocker.histories):
            assert {int(i) for i in torch.nonzero(logits[b] == -float("inf"))} == brute_force_banned(h, n)
        blocker.append([rng.randrange(6) for _ in range(5)])


def test_generation_config_errors():
    with pytest.raises(TypeError, match="max_length"):
        GenerationConfig.from_kwargs(max_length=3)
    for bad in (
        dict(max_new_tokens=0),
        dict(num_beams=0),
        dict(top_p=0.0),
        dict(do_sample=True, temperature=0),
    ):
        with pytest.raises(ValueError):
            GenerationConfig.from_kwargs(**bad)
    with pytest.raises(ValueError, match="beam"):
        GenerationConfig.from_kwargs(num_beams=2, do_sample=True)
    assert GenerationConfig.from_kwargs(top_k=None).top_k == 0  # None means "default"
