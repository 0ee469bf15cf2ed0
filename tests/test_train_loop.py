"""Tests for the general training loop (kosmos2/train/loop.py, config.py, optim.py, loss.py) on a task that is
not the synthetic world: the tiny Kosmos-2 on fixed random rows (tests/_train_fixtures.py).

References: the loss against the model's own forward (transformers-checked in tests/test_model.py) and a
hand computation; gradient accumulation and the global-batch mean against one micro-batch of the whole
step; resume against an uninterrupted run, bit for bit; freezing against the initial weights.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _train_fixtures import Rows, loss_tokens, tiny_model, tiny_task, tiny_train_config

from kosmos2.train import loop as L
from kosmos2.train.config import TrainConfig, parse_overrides, with_overrides
from kosmos2.train.loss import IGNORE, causal_lm_loss, next_token_loss, next_token_targets
from kosmos2.train.optim import lr_factor


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _weights(out) -> dict[str, torch.Tensor]:
    return L.load_checkpoint(out / L.CHECKPOINT_FILE)["model"]


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / L.LOG_FILE).read_text().splitlines()]


def test_next_token_targets_follow_the_loss_mask():
    # ids of a row and its SPEC §3 mask: position t predicts ids[t + 1] where that token is learned
    assert next_token_targets([0, 7, 8, 9, 2], [False, False, True, True, True]) == [IGNORE, 8, 9, 2, IGNORE]
    assert next_token_targets([5], [True]) == [IGNORE]


def test_next_token_loss_by_hand():
    head = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])
    targets = torch.tensor([[0, 2, IGNORE]])
    part = next_token_loss(head, hidden, targets, location_start=2)
    # logits (1, 0, 1) -> target 0; (0, 2, 2) -> target 2 (a "location" id here)
    first = -math.log(math.e / (2 * math.e + 1))
    second = -math.log(math.e**2 / (2 * math.e**2 + 1))
    assert part.tokens == 2 and float(part.total.detach()) == pytest.approx(first + second, rel=1e-6)
    assert part.location_tokens == 1 and float(part.location_total) == pytest.approx(second, rel=1e-6)


def test_causal_lm_loss_equals_the_models_own_forward():
    model = tiny_model().eval()
    batch = Rows()(0)
    with torch.no_grad():
        ours = causal_lm_loss(model, batch)["loss"]
        _, reference = model(
            batch["input_ids"],
            batch["pixel_values"],
            image_mask=batch["image_mask"],
            targets=batch["targets"],
        )
    assert float(ours) == pytest.approx(float(reference), rel=1e-6)


def test_config_checks_and_overrides():
    config = TrainConfig()
    assert with_overrides(config, lr=1, freeze=["vision_model"]).freeze == ("vision_model",)
    for fields, message in (
        ({"grad_accum": 0}, "grad_accum must be a positive int"),
        ({"optimizer": "sgd"}, "optimizer 'sgd': use one of adamw, muon"),
        ({"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\)"),
        ({"freeze": [""]}, "freeze must list parameter name prefixes"),
        ({"fsdp": True, "optimizer": "muon"}, "fsdp trains with AdamW and no moving average"),
        ({"fsdp": True, "ema_decay": 0.9}, "fsdp trains with AdamW and no moving average"),
        ({"lr": "fast"}, "lr must be float"),
        ({"stepz": 3}, r"unknown fields \['stepz'\]"),
    ):
        with pytest.raises(ValueError, match=message):
            with_overrides(config, **fields)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert parse_overrides(['freeze=["vision_model"]', "optimizer=muon"]) == {
        "freeze": ["vision_model"],
        "optimizer": "muon",
    }


def test_lr_schedule_by_hand():
    c = TrainConfig(steps=110, warmup_steps=10, final_lr_fraction=0.1)
    assert [lr_factor(s, c) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(60, c) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, c) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("loop") / "whole"
    L.fit(tiny_task(), tiny_train_config(), out, progress=False)
    return out


def test_a_run_lowers_the_loss_logs_and_exports(whole_run):
    log = [r for r in _log(whole_run) if "loss" in r]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "rows", "tokens", "tokens_per_s", "elapsed_s"} <= set(log[0])
    assert log[0]["rows"] == 8 and log[-1]["loss"] < log[0]["loss"]
    from kosmos2.checkpoint import load_pretrained

    exported = load_pretrained(whole_run / L.MODEL_DIR)
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, _weights(whole_run)[name]), name


def test_stopped_then_resumed_equals_one_run(whole_run, tmp_path):
    out = tmp_path / "parts"
    L.fit(tiny_task(), tiny_train_config(), out, stop_after=2, progress=False)
    assert L.load_checkpoint(out / L.CHECKPOINT_FILE)["step"] == 2 and not (out / L.MODEL_DIR).exists()
    L.fit(tiny_task(), tiny_train_config(), out, progress=False)
    a, b = _weights(out), _weights(whole_run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"another recipe \(differs in \['lr'\]\)"):
        L.fit(tiny_task(), tiny_train_config(lr=1e-4), out, progress=False)


def test_gradient_accumulation_minimises_the_same_global_mean(whole_run, tmp_path):
    """grad_accum=2 cuts each step's 8 rows into two micro-batches of different token counts; weighted by
    their loss tokens the step's gradient is the whole batch's mean, so the weights match the one-batch run
    to float rounding, and differ clearly from an unweighted mean of the two."""
    L.fit(tiny_task(), tiny_train_config(grad_accum=2), tmp_path / "accum", progress=False)
    a, b = _weights(tmp_path / "accum"), _weights(whole_run)
    # AdamW normalises each step's update (~3e-3 an entry here), so float rounding in the gradient shows
    # at ~1e-6 in the weights; a different objective shows at ~1e-2 (below)
    for name in a:
        assert (a[name] - b[name]).abs().max() < 1e-5, name
    assert [r["loss"] for r in _log(tmp_path / "accum")] == pytest.approx(
        [r["loss"] for r in _log(whole_run)], rel=1e-4
    )
    parts = [Rows()(0, p, 2) for p in range(2)]
    assert loss_tokens(parts[0]) != loss_tokens(parts[1])  # the weighting matters
    L.fit(tiny_task(weight=None), tiny_train_config(grad_accum=2), tmp_path / "unweighted", progress=False)
    c = _weights(tmp_path / "unweighted")
    key = "text_model.model.layers.0.ffn.fc1.weight"
    assert (c[key] - b[key]).abs().max() > 100 * (a[key] - b[key]).abs().max()


def test_frozen_parameters_stay_and_leave_the_optimizer(tmp_path):
    config = tiny_train_config(steps=2, freeze=("vision_model", "image_to_text_projection"))
    start = tiny_model().state_dict()
    L.fit(tiny_task(), config, tmp_path / "frozen", progress=False)
    state = L.load_checkpoint(tmp_path / "frozen" / L.CHECKPOINT_FILE)
    after = state["model"]
    frozen = [n for n in after if n.startswith(("vision_model.", "image_to_text_projection."))]
    assert frozen and all(torch.equal(after[n], start[n]) for n in frozen)
    assert not torch.equal(
        after["text_model.model.layers.0.ffn.fc1.weight"], start["text_model.model.layers.0.ffn.fc1.weight"]
    )
    trainable = sum(
        1 for n, p in tiny_model().named_parameters() if not n.startswith(frozen[0].split(".")[0])
    )
    groups = state["optimizer"][0]["param_groups"]
    assert sum(len(g["params"]) for g in groups) < len(list(tiny_model().parameters())) and trainable
    with pytest.raises(ValueError, match="freeze 'vision' matches no parameter; the model's modules are"):
        L.fit(tiny_task(), tiny_train_config(freeze=("vision",)), tmp_path / "bad", progress=False)


def test_bf16_autocast_and_gradient_checkpointing_train(tmp_path):
    config = tiny_train_config(steps=2, bf16=True, gradient_checkpointing=True)
    model = tiny_model()
    L.fit(tiny_task(model), config, tmp_path / "bf16", progress=False)
    assert (
        model.text_model.model.gradient_checkpointing
        and model.vision_model.model.encoder.gradient_checkpointing
    )
    log = _log(tmp_path / "bf16")
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)
    assert next(model.parameters()).dtype == torch.float32  # weights stay float32 under autocast


def test_evaluation_every_n_steps_keeps_the_best(tmp_path):
    """The evaluation callback runs every eval_every steps on the weights the run would export; the best
    by best_metric goes to OUT/best, and a resumed run remembers it."""
    scores = {2: 0.5, 4: 0.25, 6: 0.75, 8: 0.5}
    seen = []

    def evaluate(model, step):
        seen.append((step, model.training))
        return {"score": scores.get(step, 0.0), "loss": 1.0}

    config = tiny_train_config(steps=8, eval_every=2, best_metric="score", checkpoint_every=2)
    out = tmp_path / "eval"
    L.fit(tiny_task(evaluate=evaluate), config, out, stop_after=4, progress=False)
    assert json.loads((out / L.BEST_DIR / "config.json").read_text())
    first_best = (out / L.BEST_DIR / "model.safetensors").read_bytes()
    L.fit(tiny_task(evaluate=evaluate), config, out, progress=False)
    assert seen == [(2, False), (4, False), (6, False), (8, False)]  # evaluated in eval mode
    evals = [r for r in _log(out) if "eval" in r]
    assert [(r["step"], r["eval"]["score"]) for r in evals] == sorted(scores.items())
    assert L.load_checkpoint(out / L.CHECKPOINT_FILE)["best"] == {"step": 6, "metric": "score", "value": 0.75}
    assert (out / L.BEST_DIR / "model.safetensors").read_bytes() != first_best  # step 6's weights
    bad = tiny_train_config(steps=2, eval_every=1, best_metric="acc")
    with pytest.raises(ValueError, match="best_metric 'acc' is not among the evaluation's metrics"):
        L.fit(tiny_task(evaluate=evaluate), bad, tmp_path / "bad", progress=False)


def test_non_finite_loss_stops_the_run(tmp_path):
    def broken(model, batch):
        return {"loss": causal_lm_loss(model, batch)["loss"] * float("nan")}

    with pytest.raises(FloatingPointError, match="step 1: the loss is nan"):
        L.fit(tiny_task(loss=broken), tiny_train_config(steps=1), tmp_path / "nan", progress=False)
