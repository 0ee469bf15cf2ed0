"""kosmos2.quantize: int8 weight-only layers and packed bfloat16 layers compute what their float64 references
compute; int8 checkpoints save and load without quantising again; and the boxes survive: the default model
on the held-out synthetic world, and the full architecture (scaled down here, full size in a slow test)
with random weights, in bfloat16 and int8 against float32."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from _model_fixtures import random_model
from safetensors import safe_open
from torch import nn

from kosmos2 import quantize as Q
from kosmos2.checkpoint import load_pretrained, save_pretrained
from kosmos2.config import Kosmos2Config
from kosmos2.generate import GenerationConfig, encode_images, generate
from kosmos2.predictor import Predictor

needs_packing = pytest.mark.skipif(not Q.packing_available(), reason="no oneDNN bf16 on this CPU")
REPO = Path(__file__).resolve().parents[1]


# -- layers ---------------------------------------------------------------------------------------------


def test_quantize_weight_by_hand():
    w = torch.tensor([[0.5, -1.27, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [2.54, 0.01, -0.02, 1.27]])
    q, scale = Q.quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16
    # row 0: scale = 1.27 / 127 = 0.01, stored as bfloat16 (0.010009765625); q = round(w / that)
    assert scale[0].item() == torch.tensor(0.01).bfloat16().item()
    assert q[0].tolist() == [50, -127, 0, 100]
    assert q[1].tolist() == [0, 0, 0, 0]  # a zero row stays zero
    assert q[2, 0].item() == 127 and q[2, 3].item() == round(1.27 / scale[2].item())
    deq = q.float() * scale.float().unsqueeze(1)
    assert ((deq - w).abs() <= scale.float().unsqueeze(1) / 2 + 1e-7).all()


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_int8_linear_equals_float64_product_of_its_dequantized_weight(rows):
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    q = Q.Int8Linear.from_linear(layer)
    x = torch.randn(2, rows, 64)
    out = q(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, rows, 48)
    expected = Q.reference_linear(q, x.bfloat16())
    # the product is accumulated in float32 and rounded to bfloat16 once (relative step 2^-8)
    torch.testing.assert_close(out.double(), expected, rtol=2**-7, atol=1e-2)
    # and the quantised weight is the float weight to within half a scale step per weight
    assert (q.dequantized() - layer.weight).abs().max() <= q.weight_scale.float().max() / 2 + 1e-6


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_int8_dynamic_linear_is_the_int8_weight_times_each_row_rounded_to_8_bits(rows):
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    q = Q.Int8DynamicLinear.from_linear(layer)
    x = torch.randn(2, rows, 64) * torch.logspace(-2, 2, 2 * rows).view(2, rows, 1)  # rows of many sizes
    out = q(x)
    assert out.dtype == torch.float32 and out.shape == (2, rows, 48)
    # each row is rounded on its own grid of 2^bits - 1 steps over [-max|x_row|, max|x_row|] (8 bits with
    # VNNI, else 7, as PyTorch quantises for FBGEMM), zero point in the middle: step = 2 max|x_row| / levels
    levels = 127 if Q.reduce_range() else 255
    x2 = x.reshape(-1, 64).double()
    peak = x2.abs().amax(dim=1, keepdim=True)
    step = 2 * peak / levels
    zero = (levels + 1) // 2
    rounded = ((torch.round(x2 / step) + zero).clamp(0, levels) - zero) * step
    weight = q.dequantized().double()
    expected = rounded @ weight.T + q.bias.double()
    # the row's peak sits on a rounding tie (levels / 2 steps from zero), which PyTorch's float32 grid may
    # round the other way: one step on one element; and a tenth of a step per term for float32 grid error
    bound = step * (weight.abs().amax(dim=1) + 0.1 * weight.abs().sum(dim=1)).unsqueeze(0) + 1e-6
    assert ((out.reshape(-1, 48).double() - expected).abs() <= bound).all()
    # against the float layer: within the rounding of input and weight
    rel = (out - layer(x)).norm() / layer(x).norm()
    assert rel < 0.03


def test_int8_dynamic_rows_do_not_depend_on_their_batch():
    """FBGEMM rounds a whole call to one grid; with a grid per row, a row's output is bit for bit the same
    alone, in a batch, or next to a row 1000x larger (a prompt's image rows, another request)."""
    torch.manual_seed(0)
    q = Q.Int8DynamicLinear.from_linear(nn.Linear(64, 48))
    x = torch.randn(6, 64)
    x[2] *= 1000
    x[4] = 0
    together = q(x)
    for i in range(6):
        assert torch.equal(q(x[i : i + 1]), together[i : i + 1]), f"row {i}"
    assert torch.equal(together[4], q.bias.float())  # an all-zero row gives the bias


def test_int8_rule_keeps_layers_whose_width_the_kernel_gets_wrong():
    model = nn.Module()
    model.text_model = nn.Sequential(nn.Linear(72, 32), nn.Linear(80, 32))
    skipped = Q.quantize_int8(model)
    assert skipped == ["text_model.0"]
    assert type(model.text_model[0]) is nn.Linear and isinstance(model.text_model[1], Q.Int8Linear)


@needs_packing
def test_packed_linear_equals_float64_product_and_saves_the_plain_weight():
    torch.manual_seed(1)
    layer = nn.Linear(48, 80).to(torch.bfloat16)
    packed = Q.PackedLinear(layer)
    x = torch.randn(3, 5, 48).bfloat16()
    torch.testing.assert_close(packed(x).double(), Q.reference_linear(layer, x), rtol=2**-7, atol=1e-2)
    state = packed.state_dict()
    assert torch.equal(state["weight"], layer.weight) and torch.equal(state["bias"], layer.bias)


def test_dtype_names():
    assert Q.dtype_name("bf16") == "bfloat16" and Q.dtype_name(torch.float32) == "float32"
    assert Q.dtype_name(None) is None
    with pytest.raises(ValueError, match="float8.*use one of float32, bfloat16, int8"):
        Q.dtype_name("float8")


# -- models and checkpoints --------------------------------------------------------------------------------


def _other_text_width(width: int) -> Kosmos2Config:
    cfg = Kosmos2Config.from_preset("tiny")
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, width=width, heads=6, mlp_dim=160))


def test_prepare_int8_quantises_decoder_and_head_and_falls_back_per_layer():
    model = Q.prepare_model(random_model(_other_text_width(72)), "int8")  # width 72: not a multiple of 16
    assert model.inference_dtype == "int8"
    # q/k/v/out/fc1 read 72 wide: kept in bfloat16; fc2 reads 160, quantised; the head reads 72: kept
    assert all(not n.endswith("fc2") for n in model.int8_skipped)
    assert "text_model.model.layers.0.self_attn.q_proj" in model.int8_skipped
    assert isinstance(model.get_submodule("text_model.model.layers.0.ffn.fc2"), Q.Int8Linear)
    assert not any(n.startswith("vision_model") for n in Q.quantized_modules(model))


def test_int8_checkpoint_roundtrip_loads_without_quantising_again(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Q.prepare_model(random_model(), "int8")
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == Q.QUANT_METHOD and quant["granularity"] == "per_channel"
    assert "text_model.lm_head" in quant["modules"] and len(quant["modules"]) == len(
        Q.quantized_modules(model)
    )
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("text_model.lm_head.weight_int8").dtype == torch.int8
        assert f.get_tensor("text_model.lm_head.weight_scale").dtype == torch.bfloat16
        assert f.get_tensor("vision_model.model.encoder.layers.0.mlp.fc1.weight").dtype == torch.bfloat16
    assert "text_model.model.layers.0.self_attn.q_proj.weight" not in names
    assert "text_model.lm_head.weight" not in names  # the float head is never written

    def no_quantising(weight):
        raise AssertionError("an int8 checkpoint was quantised again on load")

    monkeypatch.setattr(Q, "quantize_weight", no_quantising)
    loaded = load_pretrained(tmp_path)
    for name in quant["modules"]:
        a, b = model.get_submodule(name), loaded.get_submodule(name)
        assert torch.equal(a.weight_int8, b.weight_int8) and torch.equal(a.weight_scale, b.weight_scale)
    ids = torch.tensor([[0, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(Q.prepare_model(loaded, "int8")(ids)[0], model(ids)[0], rtol=0, atol=0)


def test_predictor_dtypes_and_int8_checkpoint(tmp_path):
    p = Predictor.from_pretrained(dtype="int8")
    assert p.model.inference_dtype == "int8"
    assert p.model.text_model.model.embed_tokens.weight.dtype == torch.bfloat16
    save_pretrained(p.model, tmp_path)
    for src in (REPO / "kosmos2" / "assets" / "default").iterdir():  # tokenizer, generation settings
        if src.name not in ("model.safetensors", "config.json"):
            (tmp_path / src.name).write_bytes(src.read_bytes())
    again = Predictor.from_pretrained(tmp_path)  # dtype None: as stored, int8
    assert again.model.inference_dtype == "int8"
    assert (
        again.ground(REPO / "examples" / "shapes.png").text == p.ground(REPO / "examples" / "shapes.png").text
    )
    # the same int8 checkpoint through the dynamic kernel: the same int8 weights, float32 elsewhere
    dyn = Predictor.from_pretrained(tmp_path, dtype="int8-dynamic")
    assert dyn.model.inference_dtype == "int8-dynamic"
    head, saved = dyn.model.text_model.lm_head, again.model.text_model.lm_head
    assert isinstance(head, Q.Int8DynamicLinear) and torch.equal(head.weight_int8, saved.weight_int8)
    assert torch.equal(head.weight_scale, saved.weight_scale)
    assert dyn.model.text_model.model.embed_tokens.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="int8 checkpoint: load it with dtype='int8' or 'int8-dynamic', not"):
        Predictor.from_pretrained(tmp_path, dtype="float32")
    with pytest.raises(ValueError, match="not supported"):
        Predictor.from_pretrained(dtype="int4")


# -- the boxes survive: the default model on the held-out synthetic world -----------------------------------

WORLD_TASKS = ("rec", "grounded_caption", "reg")


def _entities(record: dict) -> object:
    """What a query answered, entity by entity: REC its boxes, captions their (phrase, boxes) pairs, REG its
    description of the given box."""
    if record["task"] == "rec":
        return record["predicted"]
    if record["task"] == "grounded_caption":
        return record["predicted_entities"]
    return record["answer"]


def _headline(results: dict) -> dict[str, float]:
    r = results["test"]
    return {
        "REC": r["rec"]["accuracy"],
        "caption P": r["grounded_caption"]["precision"],
        "caption R": r["grounded_caption"]["recall"],
        "REG": r["reg"]["exact_match"],
    }


def world_comparison(out: Path, n_per_task: int) -> dict:
    """Run the default model in the three dtypes on the held-out test split; headline metrics per dtype and
    the share of queries whose entities equal float32's."""
    from kosmos2.eval import synthetic

    runs = {}
    for dtype in Q.DTYPES:
        predictor = Predictor.from_pretrained(dtype=dtype)
        result = synthetic.evaluate_world(
            predictor,
            out / dtype,
            model_id=f"default-{dtype}",
            splits=("test",),
            n_per_task=n_per_task,
            tasks=WORLD_TASKS,
            examples=0,
            progress=False,
        )
        records = [json.loads(line) for line in (out / dtype / "records.jsonl").read_text().splitlines()]
        runs[dtype] = (_headline(result["results"]), {r["id"]: _entities(r) for r in records})
    base, base_entities = runs["float32"]
    report = {"float32": base}
    for dtype in Q.DTYPES[1:]:
        metrics, entities = runs[dtype]
        same = sum(entities[k] == v for k, v in base_entities.items()) / len(base_entities)
        report[dtype] = {**metrics, "same entities": same, "queries": len(base_entities)}
    return report


def _check_world(report: dict) -> None:
    base = report["float32"]
    for dtype in Q.DTYPES[1:]:
        r = report[dtype]
        for key, value in base.items():
            assert abs(r[key] - value) <= 0.01, f"{dtype} {key}: {r[key]:.3f} against float32 {value:.3f}"
        assert r["same entities"] >= 0.95, f"{dtype}: same entities as float32 on {r['same entities']:.1%}"


def test_boxes_survive_on_the_synthetic_world(tmp_path):
    # 25 queries per task (75 a dtype, so 1 point is less than one query: the metrics must be equal) keeps
    # this near 20 s; the slow test below runs 1,000 per task
    _check_world(world_comparison(tmp_path, 25))


@pytest.mark.slow
def test_boxes_survive_on_the_synthetic_world_1000(tmp_path):
    report = world_comparison(tmp_path, 1000)
    print(json.dumps(report, indent=2))
    _check_world(report)


# -- the full architecture with random weights ------------------------------------------------------------

LOGITS_REL_TOL = 0.03  # ||logits - float32 logits|| / ||float32 logits|| at the prompt's last position
AGREE_MIN = 0.95  # teacher-forced: share of positions whose greedy choice equals float32's


def random_weight_comparison(config: Kosmos2Config, tmp: Path, new_tokens: int = 32) -> dict:
    """Build `config` with the benchmark's seeded random weights, run float32 greedy generation, then compare
    bfloat16 and int8 on that continuation: relative error of the last prompt position's logits, and
    teacher-forced greedy agreement (each position's argmax given float32's tokens so far), plus how many
    tokens free-running greedy generation keeps identical."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import generate as bench  # benchmarks/generate.py: the random weights and inputs the benchmark uses

    bench.build_checkpoint(config, tmp, seed=0)
    pixels, ids, mask, image_mask = bench.make_inputs(config, 1, 71)
    settings = GenerationConfig(max_new_tokens=new_tokens, no_repeat_ngram_size=3, eos_token_id=None)
    T = ids.shape[1]
    out: dict = {}
    reference = None
    for dtype in Q.DTYPES:
        model = Q.prepare_model(load_pretrained(tmp), dtype)
        with torch.no_grad():
            embeds = encode_images(model, pixels)
            tokens = generate(model, ids, mask, embeds, image_mask, settings)[0]
            if reference is None:
                reference = tokens
            full = torch.cat([ids, torch.tensor([reference])], dim=1)
            full_mask = torch.cat([image_mask, torch.zeros(1, len(reference), dtype=torch.bool)], dim=1)
            logits = model(full, image_embeds=embeds, image_mask=full_mask)[0][0].float()
        out[dtype] = (logits, tokens)
        del model
    f_logits, f_tokens = out["float32"]
    report = {}
    for dtype in Q.DTYPES[1:]:
        logits, tokens = out[dtype]
        last = T - 1
        rel = float((logits[last] - f_logits[last]).norm() / f_logits[last].norm())
        picks = logits[last:-1].argmax(-1) == f_logits[last:-1].argmax(-1)
        same_prefix = next(
            (i for i, (a, b) in enumerate(zip(tokens, f_tokens, strict=True)) if a != b), len(tokens)
        )
        report[dtype] = {"logits_rel": rel, "agree": float(picks.float().mean()), "same_prefix": same_prefix}
    return report


def _check_random(report: dict) -> None:
    for dtype, r in report.items():
        assert r["logits_rel"] <= LOGITS_REL_TOL, f"{dtype}: logits relative error {r['logits_rel']:.4f}"
        assert r["agree"] >= AGREE_MIN, f"{dtype}: teacher-forced greedy agreement {r['agree']:.2f}"


def test_full_architecture_scaled_down_random_weights(tmp_path):
    # the released architecture (24 + 24 blocks, 65,037 tokens, 224 px images) at a quarter of the width
    cfg = Kosmos2Config.from_preset("kosmos-2-patch14-224")
    cfg = dataclasses.replace(
        cfg,
        text=dataclasses.replace(cfg.text, width=256, heads=8, mlp_dim=1024),
        vision=dataclasses.replace(cfg.vision, width=128, heads=4, mlp_dim=512, layers=4),
    )
    _check_random(random_weight_comparison(cfg, tmp_path))


@pytest.mark.slow
def test_full_size_random_weights(tmp_path):
    """1.66 B parameters, 6.66 GB in float32 on disk: needs ~10 GB of free memory and a few minutes."""
    report = random_weight_comparison(Kosmos2Config.from_preset("kosmos-2-patch14-224"), tmp_path)
    print(json.dumps(report, indent=2))
    _check_random(report)


@pytest.mark.parametrize("dtype", Q.DTYPES)
def test_cached_decoding_with_its_kernels_equals_recomputing_the_whole_sequence(dtype):
    """`stream` decodes through the KV cache with the kernels `text_kernels` picks per dtype (oneDNN for
    float32 linear layers only); greedy tokens must equal those of plain full forwards over the growing
    sequence. int8-dynamic failed this while it rounded each call on one grid (prefill's text rows shared
    it with the image rows)."""
    from kosmos2.generate import _float32_text, stream
    from kosmos2.model import Kosmos2

    torch.manual_seed(0)
    model = Kosmos2(Kosmos2Config.from_preset("tiny")).eval()
    with torch.no_grad():  # peaked logits, so that rounding differences cannot flip a greedy choice
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    model = Q.prepare_model(model, dtype)
    assert _float32_text(model) == (dtype == "float32")  # int8-dynamic computes in float32 without it

    ids = torch.tensor([[0, 64003, *range(4, 68), 64004, 64012, 100, 200]])
    image_mask = torch.tensor([[False, False] + [True] * 64 + [False] * 4])
    with torch.no_grad():
        embeds = encode_images(model, torch.randn(1, 3, 28, 28))
        settings = GenerationConfig(max_new_tokens=10, no_repeat_ngram_size=0, eos_token_id=None)
        streamed = [int(t) for t, _ in stream(model, ids, None, embeds, image_mask, settings)]
        recomputed, seq = [], ids
        for _ in range(10):
            mask = torch.cat([image_mask, torch.zeros(1, seq.shape[1] - ids.shape[1], dtype=torch.bool)], 1)
            logits = model(seq, image_embeds=embeds, image_mask=mask)[0][0, -1]
            recomputed.append(int(logits.argmax()))
            seq = torch.cat([seq, torch.tensor([[recomputed[-1]]])], dim=1)
    assert streamed == recomputed
