"""The speed paths of kosmos2.generate: linear layers through oneDNN compute what a float64 matmul computes,
and only where they should; `eos_token_id=None` generates exactly `max_new_tokens` tokens."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kosmos2 import generate as G
from kosmos2.config import Kosmos2Config
from kosmos2.model import Kosmos2

needs_onednn = pytest.mark.skipif(G._ONEDNN_LINEAR is None, reason="this torch build has no oneDNN linear")
ONEDNN_OP = "mkldnn::_linear_pointwise"


def ops_run(fn) -> set[str]:
    """Names of the operators `fn()` runs, from the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 48), (8, 48), (3, 5, 48), (1, 71, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_float64_matmul(shape, bias):
    torch.manual_seed(0)
    layer = nn.Linear(48, 80, bias=bias)
    x = torch.randn(shape)
    expected = x.double() @ layer.weight.double().T
    if bias:
        expected = expected + layer.bias.double()
    with torch.no_grad(), G.onednn_linear():
        out = layer(x)
        ops = ops_run(lambda: layer(x))
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)
    assert ONEDNN_OP in ops


@needs_onednn
def test_onednn_linear_leaves_autograd_other_dtypes_and_outside_code_alone():
    torch.manual_seed(1)
    layer = nn.Linear(48, 80)
    x = torch.randn(8, 48, requires_grad=True)
    with G.onednn_linear():
        assert ONEDNN_OP not in ops_run(lambda: layer(x).sum().backward())
    assert x.grad is not None and x.grad.abs().sum() > 0
    half = nn.Linear(48, 80).to(torch.bfloat16)
    with torch.no_grad(), G.onednn_linear():
        assert ONEDNN_OP not in ops_run(lambda: half(x.detach().bfloat16()))
    with torch.no_grad():
        assert ONEDNN_OP not in ops_run(lambda: layer(x))  # outside the block
        with G.onednn_linear(enabled=False):
            assert ONEDNN_OP not in ops_run(lambda: layer(x))


@needs_onednn
def test_generation_runs_linear_layers_through_onednn():
    torch.manual_seed(2)
    model = Kosmos2(Kosmos2Config.from_preset("tiny")).eval()
    ids = torch.tensor([[0, 64003, *range(4, 68), 64004, 64012, 100, 200]] * 2)
    image_mask = torch.tensor([[False, False] + [True] * 64 + [False] * 4] * 2)
    cfg = G.GenerationConfig(max_new_tokens=3)
    ops = ops_run(lambda: G.generate(model, ids, None, torch.randn(2, 64, 64), image_mask, cfg))
    assert ONEDNN_OP in ops
    ops = ops_run(lambda: G.encode_images(model, torch.randn(2, 3, 28, 28)))
    assert ONEDNN_OP in ops


def test_no_eos_generates_exactly_max_new_tokens():
    # the final LayerNorm outputs a scaled-up </s> embedding: </s> wins every step it is not n-gram banned
    torch.manual_seed(3)
    model = Kosmos2(Kosmos2Config.from_preset("tiny")).eval()
    with torch.no_grad():
        E = model.text_model.model.embed_tokens.weight
        E[2] *= 10
        model.text_model.model.layer_norm.weight.zero_()
        model.text_model.model.layer_norm.bias.copy_(E[2])
    ids = torch.tensor([[0, 64003, *range(4, 68), 64004, 100]])
    image_mask = torch.tensor([[False, False] + [True] * 64 + [False, False]])
    embeds = torch.randn(1, 64, 64)
    assert G.generate(model, ids, None, embeds, image_mask, G.GenerationConfig(max_new_tokens=5)) == [[]]
    cfg = G.GenerationConfig(max_new_tokens=5, eos_token_id=None)
    (row,) = G.generate(model, ids, None, embeds, image_mask, cfg)
    # </s> three times, then "2 2" -> 2 would repeat the 3-gram "2 2 2": banned
    assert len(row) == 5 and row[:3] == [2, 2, 2] and row[3] != 2
    steps = list(G.stream(model, ids, None, embeds, image_mask, cfg))
    assert len(steps) == 5 and not any(bool(finished.any()) for _, finished in steps)
