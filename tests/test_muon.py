"""kosmos2.muon: StackedMuon against torch.optim.Muon (the reference) on the same weights and gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from kosmos2.muon import StackedMuon, adjusted_lr, orthogonalize

# shapes as in a transformer: several of each, tall and wide ones (iterated transposed), one of its own
SHAPES = [(64, 64)] * 4 + [(48, 48)] * 3 + [(128, 32)] * 2 + [(32, 128)] * 2 + [(40, 24)]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.05) for s in SHAPES]


@pytest.mark.parametrize(
    "options",
    [
        {"lr": 5e-3, "weight_decay": 0.01, "adjust_lr_fn": "match_rms_adamw"},  # the default recipe's
        {"lr": 2e-2, "weight_decay": 0.0, "nesterov": False},
        {"lr": 1e-3, "weight_decay": 0.1, "momentum": 0.9, "adjust_lr_fn": "original", "ns_steps": 3},
    ],
)
def test_stacked_muon_steps_to_torch_muons_weights_bit_for_bit(options):
    """Four steps of each optimizer on copies of the same weights and the same gradients (one matrix without
    a gradient in the second step): equal weights and momentum buffers, bit for bit, after every step."""
    reference = _params()
    ours = copy.deepcopy(reference)
    torch_muon = torch.optim.Muon(reference, **options)
    stacked = StackedMuon(ours, **options)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        for a, b in zip(reference, ours, strict=True):
            grad = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = grad.clone(), grad.clone()
        if step == 1:
            reference[5].grad = ours[5].grad = None
        torch_muon.step()
        stacked.step()
        for i, (a, b) in enumerate(zip(reference, ours, strict=True)):
            assert torch.equal(a, b), f"step {step}, matrix {i} {tuple(a.shape)}: weights differ"
            assert torch.equal(torch_muon.state[a]["momentum_buffer"], stacked.state[b]["momentum_buffer"]), (
                f"step {step}, matrix {i}: momentum buffers differ"
            )
    assert not torch.equal(reference[0], _params()[0])  # the steps moved the weights


def test_stacked_muon_state_loads_into_torch_muon_and_back():
    """The state dict has torch.optim.Muon's layout: a run checkpointed by one resumes in the other."""
    reference, ours = _params(), _params()
    first = StackedMuon(ours, lr=1e-2)
    for p in ours:
        p.grad = torch.ones_like(p)
    first.step()
    state = first.state_dict()
    again = torch.optim.Muon(reference, lr=1e-2)
    again.load_state_dict(state)
    assert torch.equal(again.state[reference[3]]["momentum_buffer"], first.state[ours[3]]["momentum_buffer"])
    back = StackedMuon(_params(), lr=1e-2)
    back.load_state_dict(again.state_dict())
    assert back.state_dict()["state"].keys() == state["state"].keys()


def test_orthogonalize_gives_near_orthogonal_factors_in_the_input_shapes():
    """Values worked out independently: for G = U S Vᵀ the iteration returns ≈ U S' Vᵀ with S' in about
    (0.5, 1.5) (the quintic's fixed band), so its direction is that of U Vᵀ from the SVD."""
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(s, generator=gen) for s in [(96, 32), (32, 96), (32, 32), (32, 32)]]
    out = orthogonalize(grads, (3.4445, -4.7750, 2.0315), 5, 1e-7)
    for g, o in zip(grads, out, strict=True):
        assert o.shape == g.shape and o.dtype == torch.bfloat16
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        assert torch.nn.functional.cosine_similarity((u @ vh).flatten(), o.float().flatten(), dim=0) > 0.9
        singular = torch.linalg.svdvals(o.float())
        assert 0.3 < float(singular.min()) and float(singular.max()) < 1.6


def test_adjusted_lr_is_torchs_rule():
    assert adjusted_lr(1e-3, "match_rms_adamw", torch.Size([256, 1024])) == 1e-3 * (0.2 * 1024**0.5)
    assert adjusted_lr(1e-3, "original", torch.Size([400, 100])) == 1e-3 * 2.0
    assert adjusted_lr(1e-3, None, torch.Size([100, 400])) == 1e-3
