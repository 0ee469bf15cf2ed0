"""Tests of kosmos2.config and kosmos2.model.

References: transformers' `Kosmos2ForConditionalGeneration` (eager attention) on the same random weights,
cross-entropy worked out by hand, the full-sequence forward for the cached path, and the parameter names,
shapes and count of the released checkpoint written out from SPEC §6-7.
"""

from __future__ import annotations

import math

import pytest
import torch
from _model_fixtures import (
    EOS,
    GROUNDING,
    OBJECT_END,
    OBJECT_START,
    PAD,
    PATCH_INDEX_0,
    PHRASE_END,
    PHRASE_START,
    image_prompt,
    left_pad,
    load_hf_reference,
    other_config,
    random_model,
    tiny_config,
    write_hf_checkpoint,
)

from kosmos2.checkpoint import load_pretrained
from kosmos2.config import Kosmos2Config
from kosmos2.model import Kosmos2, make_positions, sinusoidal_positions

PLAIN = [GROUNDING, 10, 20, 30]  # "<grounding> An image of"
GROUNDED = [GROUNDING, 10, PHRASE_START, 40, 50, PHRASE_END, OBJECT_START, PATCH_INDEX_0 + 44]
GROUNDED += [PATCH_INDEX_0 + 863, OBJECT_END, 60, EOS]


def _pixels(config: Kosmos2Config, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = config.vision.image_size
    return torch.randn(batch, 3, s, s, generator=g)


# -- parity with transformers ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["tiny", "other"])
def hf_pair(request, tmp_path_factory):
    """(config, our model via our loader, transformers' model) from one transformers-saved checkpoint."""
    pytest.importorskip("transformers")
    config = tiny_config() if request.param == "tiny" else other_config()
    directory = write_hf_checkpoint(tmp_path_factory.mktemp(f"hf_{request.param}"), config, seed=1)
    return config, load_pretrained(directory), load_hf_reference(directory)


@pytest.mark.reference
@pytest.mark.parametrize("text", [PLAIN, GROUNDED], ids=["plain", "with_location_tokens"])
def test_logits_match_transformers(hf_pair, text):
    config, ours, hf = hf_pair
    ids, mask = image_prompt(text)
    input_ids, image_mask = torch.tensor([ids]), torch.tensor([mask])
    pixels = _pixels(config, 1)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=input_ids, image_embeds_position_mask=image_mask.long())
        logits, loss = ours(input_ids, pixel_values=pixels, image_mask=image_mask)
        embeds = ours.encode_image(pixels)
    assert loss is None
    assert logits.shape == (1, len(ids), config.text.vocab_size)
    assert (embeds - ref.image_embeds).abs().max() <= 1e-4
    assert (logits - ref.logits).abs().max() <= 1e-4


@pytest.mark.reference
def test_left_padded_batch_matches_transformers(hf_pair):
    """Uncached, transformers derives positions from the pad ids, so its left-padded forward is right."""
    config, ours, hf = hf_pair
    rows, masks = zip(image_prompt(PLAIN), image_prompt(GROUNDED), strict=True)
    input_ids, attn, image_mask = left_pad(list(rows), list(masks))
    pixels = _pixels(config, 2, seed=3)
    with torch.no_grad():
        ref = hf(
            pixel_values=pixels,
            input_ids=input_ids,
            attention_mask=attn,
            image_embeds_position_mask=image_mask.long(),
        ).logits
        logits, _ = ours(input_ids, pixel_values=pixels, image_mask=image_mask, attention_mask=attn)
    real = attn.bool()
    assert (logits[real] - ref[real]).abs().max() <= 1e-4


@pytest.mark.reference
def test_loss_matches_transformers_and_hand_computation(hf_pair):
    config, ours, hf = hf_pair
    ids, mask = image_prompt(GROUNDED)
    input_ids, image_mask = torch.tensor([ids]), torch.tensor([mask])
    # the loss covers every token after the last image slot (SPEC §3); targets are shifted by one
    labels = input_ids.clone()
    labels[0, : 2 + 64] = -100
    targets = torch.cat([labels[:, 1:], torch.full((1, 1), -100)], dim=1)
    pixels = _pixels(config, 1)
    with torch.no_grad():
        logits, loss = ours(input_ids, pixel_values=pixels, image_mask=image_mask, targets=targets)
        ref = hf(
            pixel_values=pixels,
            input_ids=input_ids,
            image_embeds_position_mask=image_mask.long(),
            labels=labels,
        )
    # by hand: mean over the kept targets of -log softmax(logits)[target]
    terms = []
    for t in range(targets.shape[1]):
        y = int(targets[0, t])
        if y != -100:
            row = logits[0, t].double()
            terms.append(float(torch.logsumexp(row, 0) - row[y]))
    assert len(terms) == 1 + len(GROUNDED)  # </image> and every text token, </s> last
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert loss.item() == pytest.approx(ref.loss.item(), abs=1e-4)


@pytest.mark.reference
def test_sinusoidal_positions_equal_the_reference_table():
    from transformers.models.kosmos2.modeling_kosmos2 import Kosmos2TextSinusoidalPositionalEmbedding as Ref

    table = Ref.get_embedding(300, 64, padding_idx=1)
    ours = sinusoidal_positions(torch.arange(300), 64)
    assert torch.equal(ours, table)


def test_sinusoidal_positions_by_hand():
    emb = sinusoidal_positions(torch.tensor([[1, 5]]), 8)  # half = 4, f_i = exp(-i ln(10000) / 3)
    assert emb.shape == (1, 2, 8)
    assert torch.equal(emb[0, 0], torch.zeros(8))  # the pad position is zero
    f = [math.exp(-i * math.log(10000) / 3) for i in range(4)]
    expected = [math.sin(5 * x) for x in f] + [math.cos(5 * x) for x in f]
    assert emb[0, 1].tolist() == pytest.approx(expected, abs=1e-6)


def test_make_positions_follow_the_pad_rule():
    ids = torch.tensor([[PAD, PAD, 0, 64003, 4, 5], [0, 64003, 4, 5, 6, 7], [0, 10, PAD, 11, PAD, PAD]])
    assert make_positions(ids).tolist() == [[1, 1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 7], [2, 3, 1, 4, 1, 1]]


# -- loss without the reference ----------------------------------------------------------------------------


def test_loss_ignores_minus_100_and_averages():
    model = random_model(tiny_config(), seed=2)
    ids = torch.tensor([[0, 100, 200, 300, 2], [0, 400, 500, 2, 1]])
    targets = torch.tensor([[100, 200, 300, 2, -100], [400, 500, 2, -100, -100]])
    with torch.no_grad():
        logits, loss = model(ids, targets=targets)
    logp = logits.double().log_softmax(-1)
    kept = [(b, t) for b in range(2) for t in range(5) if targets[b, t] != -100]
    by_hand = -sum(float(logp[b, t, targets[b, t]]) for b, t in kept) / len(kept)
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)


# -- static KV cache ---------------------------------------------------------------------------------------


def test_cached_decoding_equals_full_forward_with_left_padding():
    config = other_config()
    model = random_model(config, seed=4)
    rows, masks = zip(image_prompt(PLAIN), image_prompt(GROUNDED[:-1]), strict=True)
    input_ids, attn, image_mask = left_pad(list(rows), list(masks))
    B, T = input_ids.shape
    new = torch.tensor([[700, 800, 900, 1000], [701, 801, 901, 1001]])
    with torch.no_grad():
        embeds = model.encode_image(_pixels(config, B, seed=5))
        full_ids = torch.cat([input_ids, new], 1)
        full, _ = model(
            full_ids,
            image_embeds=embeds,
            image_mask=torch.cat([image_mask, torch.zeros_like(new, dtype=torch.bool)], 1),
            attention_mask=torch.cat([attn, torch.ones_like(new)], 1),
        )
        model.setup_cache(B, max_len=T + 8)
        positions = make_positions(input_ids)
        steps = [model.forward_cached(input_ids, torch.arange(T), positions, attn, embeds, image_mask)]
        last = model.forward_cached(
            input_ids, torch.arange(T), positions, attn, embeds, image_mask, last_only=True
        )
        for i in range(new.shape[1]):
            positions = positions[:, -1:] + 1
            steps.append(model.forward_cached(new[:, i : i + 1], torch.tensor([T + i]), positions))
        cached = torch.cat(steps, 1)

        # each row alone, unpadded: batching must not change a row's logits
        singles = []
        for b, (r, m) in enumerate(zip(rows, masks, strict=True)):
            ids1 = torch.tensor([r + new[b].tolist()])
            mask1 = torch.tensor([m + [False] * new.shape[1]])
            singles.append(model(ids1, image_embeds=embeds[b : b + 1], image_mask=mask1)[0][0])

    real = torch.cat([attn, torch.ones_like(new)], 1).bool()
    assert (cached[real] - full[real]).abs().max() <= 1e-5
    assert torch.allclose(last[:, 0], steps[0][:, -1], atol=1e-6)
    for b, single in enumerate(singles):
        assert (cached[b][real[b]] - single).abs().max() <= 1e-5
    model.clear_cache()


def test_bfloat16_model_runs_both_paths():
    config = tiny_config()
    model = random_model(config, seed=9)
    ids, mask = image_prompt(PLAIN)
    input_ids, image_mask = torch.tensor([ids]), torch.tensor([mask])
    pixels = _pixels(config, 1)
    with torch.no_grad():
        reference, _ = model(input_ids, pixel_values=pixels, image_mask=image_mask)
        model.to(torch.bfloat16)
        logits, _ = model(input_ids, pixel_values=pixels, image_mask=image_mask)
        model.setup_cache(1, len(ids))
        embeds = model.encode_image(pixels)
        cached = model.forward_cached(
            input_ids, torch.arange(len(ids)), make_positions(input_ids), None, embeds, image_mask
        )
    assert logits.dtype == cached.dtype == torch.bfloat16
    assert model.text_model.model.layers[0].self_attn.kv_cache.k.dtype == torch.bfloat16
    assert (logits.float() - reference).abs().max() <= 0.05 * reference.abs().max()
    assert torch.equal(cached, logits)


@pytest.mark.parametrize("batch", [1, 3])
def test_one_query_bfloat16_attention_equals_float64_reference(batch):
    """A decoding step over a bfloat16 cache on the CPU takes PyTorch's math kernel directly, with the
    boolean mask made additive; it must equal masked softmax attention in float64 on the same inputs."""
    from kosmos2.model import DecoderAttention

    attn = DecoderAttention(tiny_config().text).eval()
    g = torch.Generator().manual_seed(0)
    H, S, hd = 4, 19, 16
    q = torch.randn(batch, H, 1, hd, generator=g).bfloat16()
    k = torch.randn(batch, H, S, hd, generator=g).bfloat16()
    v = torch.randn(batch, H, S, hd, generator=g).bfloat16()
    mask = torch.rand(batch, 1, 1, S, generator=g) < 0.6
    mask[..., -1] = True  # the query always sees itself
    y = attn._attend(q, k, v, mask)  # [B,1,H*hd]
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(hd)
    probs = scores.masked_fill(~mask, -math.inf).softmax(-1)
    expected = (probs @ v.double()).transpose(1, 2).reshape(batch, 1, H * hd)
    assert y.dtype == torch.bfloat16
    assert (y.double() - expected).abs().max() <= 2**-7 * expected.abs().max()


def test_reorder_cache_expands_rows_for_beams():
    model = random_model(tiny_config(), seed=6)
    ids = torch.tensor([[0, 10, 20, 30], [0, 40, 50, 60]])
    with torch.no_grad():
        model.setup_cache(2, 8)
        model.forward_cached(ids, torch.arange(4), make_positions(ids))
        model.reorder_cache(torch.tensor([0, 0, 1, 1, 1]))  # 2 beams for row 0, 3 for row 1
        step = torch.tensor([[70], [71], [72], [73], [74]])
        got = model.forward_cached(step, torch.tensor([4]), torch.full((5, 1), 6))
        src = torch.tensor([0, 0, 1, 1, 1])
        ref, _ = model(torch.cat([ids[src], step], 1))
    assert (got[:, 0] - ref[:, -1]).abs().max() <= 1e-5


def test_cache_errors_are_clear():
    model = random_model(tiny_config())
    ids = torch.tensor([[0, 10]])
    with pytest.raises(RuntimeError, match="setup_cache"):
        model.forward_cached(ids, torch.arange(2), make_positions(ids))
    with pytest.raises(ValueError, match="max_len"):
        model.setup_cache(1, 0)


def test_batch_mixing_image_and_text_only_rows():
    """image_embeds hold the images of the rows that have slots, in order; text-only rows take none."""
    config = tiny_config()
    model = random_model(config, seed=7)
    image_row, mask = image_prompt(PLAIN)
    text_row = [0, 10, 20, 30, 40]
    input_ids, attn, image_mask = left_pad([text_row, image_row], [[False] * len(text_row), mask])
    with torch.no_grad():
        embeds = model.encode_image(_pixels(config, 1))
        logits, _ = model(input_ids, image_embeds=embeds, image_mask=image_mask, attention_mask=attn)
        alone_text, _ = model(torch.tensor([text_row]))
        alone_image, _ = model(
            torch.tensor([image_row]), image_embeds=embeds, image_mask=torch.tensor([mask])
        )
    assert (logits[0, -len(text_row) :] - alone_text[0]).abs().max() <= 1e-5
    assert (logits[1] - alone_image[0]).abs().max() <= 1e-5


def test_gradient_checkpointing_gives_the_same_gradients():
    """The decoder's and the ViT's `gradient_checkpointing` flags recompute each block in backward: the same
    loss and gradients, the image path included."""
    config = tiny_config()
    config.text.dropout = config.text.attention_dropout = 0.0  # deterministic in train mode
    ids, mask = image_prompt(PLAIN)
    ids, mask = torch.tensor([ids]), torch.tensor([mask])
    targets = torch.cat([ids[:, 1:], torch.tensor([[-100]])], dim=1)
    grads = []
    for checkpointing in (False, True):
        model = random_model(config, seed=8).train()
        model.text_model.model.gradient_checkpointing = checkpointing
        model.vision_model.model.encoder.gradient_checkpointing = checkpointing
        _, loss = model(ids, pixel_values=_pixels(config, 1), image_mask=mask, targets=targets)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    assert "vision_model.model.encoder.layers.0.mlp.fc1.weight" in grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_fresh_model_initialisation():
    model = Kosmos2(tiny_config())
    embed = model.text_model.model.embed_tokens.weight
    assert model.text_model.lm_head.weight is embed
    assert torch.equal(embed[1], torch.zeros(64))  # the pad row starts at zero (padding_idx)
    assert 0.015 < embed[2:].std().item() < 0.025
    assert torch.equal(model.text_model.model.layers[0].ffn.ffn_layernorm.weight, torch.ones(128))


# -- input checks ------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_problem():
    config = tiny_config()
    model = random_model(config)
    ids, mask = image_prompt(PLAIN)
    input_ids, image_mask = torch.tensor([ids]), torch.tensor([mask])
    with pytest.raises(ValueError, match="28x28"):
        model(input_ids, pixel_values=torch.zeros(1, 3, 32, 32), image_mask=image_mask)
    with pytest.raises(ValueError, match="image_mask"):
        model(input_ids, pixel_values=_pixels(config, 1))
    short = image_mask.clone()
    short[0, 5] = False
    with pytest.raises(ValueError, match="marks 63 slots"):
        model(input_ids, pixel_values=_pixels(config, 1), image_mask=short)
    with pytest.raises(ValueError, match="not both"):
        model(
            input_ids,
            pixel_values=_pixels(config, 1),
            image_embeds=torch.zeros(1, 64, 64),
            image_mask=image_mask,
        )


# -- the released architecture, on the meta device ---------------------------------------------------------


def _spec_shapes() -> dict[str, tuple[int, ...]]:
    """The 886 state-dict names of SPEC §7 with the shapes that SPEC §6 implies."""
    D, F_, V, C, M = 2048, 8192, 65037, 1024, 4096
    s: dict[str, tuple[int, ...]] = {"text_model.model.embed_tokens.weight": (V, D)}
    for i in range(24):
        p = f"text_model.model.layers.{i}."
        for proj in "qkv":
            s[p + f"self_attn.{proj}_proj.weight"], s[p + f"self_attn.{proj}_proj.bias"] = (D, D), (D,)
        s[p + "self_attn.out_proj.weight"], s[p + "self_attn.out_proj.bias"] = (D, D), (D,)
        for ln in ("self_attn.inner_attn_ln", "self_attn_layer_norm", "final_layer_norm"):
            s[p + ln + ".weight"], s[p + ln + ".bias"] = (D,), (D,)
        s[p + "ffn.fc1.weight"], s[p + "ffn.fc1.bias"] = (F_, D), (F_,)
        s[p + "ffn.fc2.weight"], s[p + "ffn.fc2.bias"] = (D, F_), (D,)
        s[p + "ffn.ffn_layernorm.weight"], s[p + "ffn.ffn_layernorm.bias"] = (F_,), (F_,)
    s["text_model.model.layer_norm.weight"], s["text_model.model.layer_norm.bias"] = (D,), (D,)
    s["text_model.lm_head.weight"] = (V, D)
    v = "vision_model.model."
    s[v + "embeddings.class_embedding"] = (C,)
    s[v + "embeddings.patch_embedding.weight"] = (C, 3, 14, 14)
    s[v + "embeddings.position_embedding.weight"] = (257, C)
    for ln in ("pre_layrnorm", "post_layernorm"):
        s[v + ln + ".weight"], s[v + ln + ".bias"] = (C,), (C,)
    for i in range(24):
        p = f"{v}encoder.layers.{i}."
        for proj in ("q", "k", "v", "out"):
            s[p + f"self_attn.{proj}_proj.weight"], s[p + f"self_attn.{proj}_proj.bias"] = (C, C), (C,)
        for ln in ("layer_norm1", "layer_norm2"):
            s[p + ln + ".weight"], s[p + ln + ".bias"] = (C,), (C,)
        s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"] = (M, C), (M,)
        s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"] = (C, M), (C,)
    c = "image_to_text_projection."
    s[c + "latent_query"] = (64, D)
    s[c + "dense.weight"], s[c + "dense.bias"] = (D, C), (D,)
    for proj in ("q", "k", "v", "out"):
        s[c + f"x_attn.{proj}_proj.weight"], s[c + f"x_attn.{proj}_proj.bias"] = (D, D), (D,)
    return s


def test_released_preset_has_the_checkpoint_names_shapes_and_count():
    with torch.device("meta"):
        model = Kosmos2(Kosmos2Config.from_preset("kosmos-2-patch14-224"))
    spec = _spec_shapes()
    assert len(spec) == 886
    state = model.state_dict()
    assert {n: tuple(t.shape) for n, t in state.items()} == spec
    assert sum(p.numel() for p in model.parameters()) == 1_664_485_376  # tied head counted once
    assert model.text_model.lm_head.weight is model.text_model.model.embed_tokens.weight


# -- config ------------------------------------------------------------------------------------------------


def test_hf_config_round_trip_and_errors():
    for config in (Kosmos2Config.from_preset("kosmos-2-patch14-224"), tiny_config(), other_config()):
        assert Kosmos2Config.from_hf_config(config.to_hf_config()) == config
        assert Kosmos2Config.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="model_type"):
        Kosmos2Config.from_hf_config({"model_type": "clip"})
    with pytest.raises(ValueError, match="activation"):
        Kosmos2Config.from_hf_config(
            {"model_type": "kosmos-2", "text_config": {"activation_function": "relu"}}
        )
    with pytest.raises(ValueError, match="unknown Kosmos-2 preset 'huge'"):
        Kosmos2Config.from_preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        Kosmos2Config.from_hf_config({"model_type": "kosmos-2", "text_config": {"embed_dim": 100}})


@pytest.mark.reference
def test_transformers_defaults_are_the_released_preset():
    from transformers import Kosmos2Config as HFConfig

    hf = HFConfig().to_dict()
    assert Kosmos2Config.from_hf_config(hf) == Kosmos2Config.from_preset("kosmos-2-patch14-224")
    minimal = Kosmos2Config.from_hf_config({"model_type": "kosmos-2"})  # every field defaulted
    assert minimal == Kosmos2Config.from_preset("kosmos-2-patch14-224")
    ours = HFConfig(**Kosmos2Config.from_preset("tiny").to_hf_config())
    assert (ours.text_config.embed_dim, ours.vision_config.image_size) == (64, 28)
