"""torchrun: the same training on 2 processes (gloo, CPU) as on 1, with the global batch split by rank, with
DDP (the parameters replicated) and with FSDP2 (the parameters sharded; on the CPU here, with gloo).

Each test launches `python -m torch.distributed.run --standalone --nproc-per-node 2 tests/_train_fixtures.py`
(real processes, a real gloo process group, DistributedDataParallel) and compares with `fit` in this process
on the same task (tests/_train_fixtures.py: the tiny Kosmos-2, 8 rows a step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_fixtures import tiny_task, tiny_train_config

from kosmos2.train import loop as L

ROOT = Path(__file__).resolve().parent.parent


def torchrun(out: Path, *args: str, processes: int = 2) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command += [str(ROOT / "tests" / "_train_fixtures.py"), str(out), *args]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ddp") / "one"
    L.fit(tiny_task(), tiny_train_config(), out, progress=False)
    torch.set_num_threads(threads)
    return out


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return L.load_checkpoint(out / L.CHECKPOINT_FILE)["model"]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / L.LOG_FILE).read_text().splitlines()]


def test_two_processes_give_the_weights_of_one(one_process, tmp_path):
    """2 processes, each with 4 of a step's 8 rows, gradients averaged by DDP and each process's loss
    weighted by its share of the step's loss tokens: the weights of one process training on all 8 rows, to
    float rounding (AdamW's normalised step puts rounding at ~1e-6 in the weights); the files are written
    once (rank 0): one log line a step, one checkpoint, the exported model."""
    out = tmp_path / "two"
    torchrun(out)
    a, b = _weights(out), _weights(one_process)
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() < 1e-5, name
    log, reference = _log(out), _log(one_process)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in reference], rel=1e-4)
    assert [r["rows"] for r in log] == [8] * 4 and [r["tokens"] for r in log] == [
        r["tokens"] for r in reference
    ]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "log.jsonl", "model", "recipe.json"]


def test_fsdp_two_processes_give_the_weights_of_one(one_process, tmp_path):
    """fsdp=True: each process holds half of every block's parameters and optimizer state; the weights
    after 4 steps are one process's to float rounding, and the checkpoint and the exported model hold the
    whole, gathered weights (the export loads as a plain model)."""
    from kosmos2.checkpoint import load_pretrained

    out = tmp_path / "fsdp"
    torchrun(out, "--fsdp")
    a, b = _weights(out), _weights(one_process)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape and (a[name] - b[name]).abs().max() < 1e-5, name
    exported = load_pretrained(out / L.MODEL_DIR).state_dict()
    assert all(torch.equal(exported[k], a[k]) for k in exported)
    assert [r["loss"] for r in _log(out)] == pytest.approx([r["loss"] for r in _log(one_process)], rel=1e-4)


@pytest.mark.slow
def test_a_stopped_two_process_run_resumes_to_the_same_weights(tmp_path):
    """Stopped after step 2 (its checkpoint written by rank 0), then resumed by a new torchrun: the weights
    of the uninterrupted 2-process run, bit for bit; with 2 micro-batches a process (4 parts of 2 rows), the
    same objective again."""
    torchrun(tmp_path / "whole")
    torchrun(tmp_path / "parts", "--stop-after", "2")
    assert L.load_checkpoint(tmp_path / "parts" / L.CHECKPOINT_FILE)["step"] == 2
    torchrun(tmp_path / "parts")
    a, b = _weights(tmp_path / "parts"), _weights(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in a)
    torchrun(tmp_path / "accum", "--grad-accum", "2")
    c = _weights(tmp_path / "accum")
    assert all((c[k] - b[k]).abs().max() < 1e-5 for k in c)
    # FSDP: the checkpoint holds the gathered optimizer state, which a new run shards again
    torchrun(tmp_path / "fsdp-whole", "--fsdp")
    torchrun(tmp_path / "fsdp-parts", "--fsdp", "--stop-after", "2")
    torchrun(tmp_path / "fsdp-parts", "--fsdp")
    d, e = _weights(tmp_path / "fsdp-parts"), _weights(tmp_path / "fsdp-whole")
    assert all(torch.equal(d[k], e[k]) for k in d)
