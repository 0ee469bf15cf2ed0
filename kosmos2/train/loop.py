"""The general training loop: any model, any batches, any loss; one process or many under torchrun.

A recipe (the synthetic world: kosmos2/train/recipes/synthetic.py; fine-tuning on your data) builds a
`TrainTask` and calls `fit`:

    TrainTask(model, batches, loss, heads=None, weight=None, describe=None, export=None, evaluate=None)
    fit(task, config, out_dir, *, stop_after=None, progress=True, device="cpu", prefetch=False) -> Path

    for step in range(done, config.steps):
        micro-batches = [batches(step, part, parts) for this process's parts]   (prefetched if asked)
        for each: losses = loss(model, batch) under bf16 autocast if config.bf16
                  backward of losses["loss"] × weight(batch) / (the step's total weight, all processes)
        gradients averaged over processes (DDP) ─► clip ─► LR schedule ─► AdamW [+ Muon] ─► EMA
        every log_every steps: a line of OUT/log.jsonl; the progress bar
        every checkpoint_every steps: OUT/checkpoint.pt (atomic; rank 0)
        every eval_every steps: evaluate(model, step), logged; the best (config.best_metric) to OUT/best
    at the last step: export(model, OUT/model) (the moving average when config.ema_decay > 0)

The contract that makes a killed run resume to the same weights: `batches(step, part, parts)` is a pure
function of its arguments (no global RNG), so a run's data position is its step number. The step's global
batch is cut into parts = processes × grad_accum micro-batches; process r takes parts r, r + processes, ...
Each micro-batch's loss should be a mean over what it holds, and `weight(batch)` what it holds (e.g. its
loss tokens; default 1): the step then minimises the mean over the whole global batch, the same objective
whatever the number of processes or micro-batches (to float rounding).

`loss(model, batch)` returns a dict of scalar tensors: "loss" is minimised, every other entry is logged as
"loss_<name>". It may call any submodule of the model (the loop never calls model.forward itself);
`heads` are training-only modules (read-outs) trained with the model and saved in checkpoints, not
exported. Under torchrun the model and heads are wrapped in DistributedDataParallel around `loss`.

Output folder: recipe.json (the config; a resumed run must match it), checkpoint.pt, log.jsonl, model/,
best/ (with config.best_metric).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from kosmos2.train import distributed
from kosmos2.train.config import TrainConfig
from kosmos2.train.optim import lr_factor, make_optimizer

CONFIG_FILE = "recipe.json"
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"
MODEL_DIR = "model"
BEST_DIR = "best"
CHECKPOINT_FORMAT = 3  # 3: the general loop's layout (config, heads, best); 2 was the synthetic trainer's


@dataclass
class TrainTask:
    """What a recipe gives the loop (module docstring).

    model: the network that is trained, averaged (EMA) and exported. batches(step, part, parts): the
    micro-batch `part` of `parts` of step `step`, a pure function of its arguments; it must pickle for
    prefetch in worker processes. loss(model, batch) -> {"loss": scalar, other logged scalars}. heads:
    training-only modules. weight(batch): the micro-batch's share of the step (default 1). describe(batch):
    counts to log and sum over the step, e.g. {"rows": .., "tokens": ..} ("tokens" also gives tokens/s).
    export(model, directory): write a loadable model. evaluate(model, step) -> {metric: value}.
    """

    model: torch.nn.Module
    batches: Callable[[int, int, int], Any]
    loss: Callable[[torch.nn.Module, Any], Mapping[str, torch.Tensor]]
    heads: torch.nn.Module | None = None
    weight: Callable[[Any], float] | None = None
    describe: Callable[[Any], Mapping[str, float]] | None = None
    export: Callable[[torch.nn.Module, Path], Any] | None = None
    evaluate: Callable[[torch.nn.Module, int], Mapping[str, float]] | None = None


@dataclass
class StepBatches:
    """The micro-batches one process trains on at a step: `batches(step, part, parts)` for its parts.
    Picklable when `batches` is, so a worker process can make them."""

    batches: Callable[[int, int, int], Any]
    mine: Sequence[int]
    parts: int

    def __call__(self, step: int) -> list[Any]:
        return [self.batches(step, part, self.parts) for part in self.mine]


def fit(
    task: TrainTask,
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    stop_after: int | None = None,
    progress: bool = True,
    progress_stream: TextIO | None = None,
    device: torch.device | str = "cpu",
    prefetch: bool | int | str = False,
) -> Path:
    """Run (or resume) `task` with `config` in `out_dir`; return the exported model's folder (OUT/model).

    A folder holding a checkpoint resumes from it; its recipe.json must equal `config`. `stop_after`: stop
    (with a checkpoint) once that many steps are done, without exporting, as if the run had been killed
    after a checkpoint. `device`: where the model trains (batches are moved there). `prefetch`: make the next
    batches while the model trains ("thread": in a thread; True or a number: in that many worker
    processes; False/0: between steps); the same batches and weights either way.
    """
    config.validate()
    me, device = distributed.setup(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: this torch build sees no CUDA device; use --device cpu")
    out = Path(out_dir)
    check_config(out, config, write=me.main)
    checkpoint_path = out / CHECKPOINT_FILE
    model, heads = task.model, task.heads
    freeze(model, config.freeze)
    set_gradient_checkpointing(model, config.gradient_checkpointing)
    model.to(device)
    if heads is not None:
        heads.to(device)
    state = load_checkpoint(checkpoint_path) if checkpoint_path.exists() else None
    if state is not None:  # the weights before any sharding: every process reads the whole checkpoint
        model.load_state_dict(state["model"])
        if heads is not None:
            heads.load_state_dict(state["heads"])
    objective = Objective(model, heads, task.loss)
    sharded = config.fsdp and me.world > 1
    template = shard(objective) if sharded else None
    optimizer = make_optimizer(model, config, heads)
    params = [p for p in objective.parameters() if p.requires_grad]

    # the moving average of the weights: float tensors of the state dict, float32
    ema = None
    if config.ema_decay > 0:
        ema = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    step, elapsed, tokens_seen, best = 0, 0.0, 0, None
    if state is not None:
        if ema is not None:
            ema = {k: v.to(device) for k, v in state["ema"].items()}
        if sharded:
            _load_sharded_optimizer(objective, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        step, elapsed, tokens_seen = state["step"], state["elapsed"], state["tokens"]
        best = state.get("best")
        del state
    else:
        torch.manual_seed(config.seed + 1)  # dropout's stream, independent of the initialisation's

    end = config.steps if stop_after is None else min(config.steps, stop_after)
    bar = Progress(config.steps, step, progress_stream) if progress and me.main and step < end else None
    parts = me.world * config.grad_accum
    make = StepBatches(task.batches, [j * me.world + me.rank for j in range(config.grad_accum)], parts)
    ddp = None
    if me.world > 1 and not sharded:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        ddp = DistributedDataParallel(objective, device_ids=ids)
    model.train()
    if heads is not None:
        heads.train()
    worker: Any = contextlib.nullcontext()
    if prefetch == "thread" and step < end:
        from kosmos2.train.prefetch import BatchThread

        worker = BatchThread(make, end)
    elif prefetch and step < end:
        from kosmos2.train.prefetch import BatchWorker

        worker = BatchWorker(make, step, end, workers=int(prefetch))
    log = open(out / LOG_FILE, "a", encoding="utf-8") if me.main else contextlib.nullcontext()  # noqa: SIM115
    with worker, _flush_denormals(device.type == "cpu"), log:
        while step < end:
            t0 = time.monotonic()
            micro = worker.get(step) if prefetch else make(step)
            if device.type != "cpu":
                micro = [move(b, device) for b in micro]
            weights = [float(task.weight(b)) if task.weight else 1.0 for b in micro]
            (total,) = distributed.all_reduce_sum([sum(weights)], device)
            optimizer.zero_grad()
            logged: dict[str, float] = {}
            for i, batch in enumerate(micro):
                last = i == len(micro) - 1
                sync = ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()
                with sync:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                        losses = (ddp or objective)(batch)
                    # this micro-batch's share of the step's mean; DDP averages over processes, so × world
                    share = weights[i] / total if total else 0.0
                    scale = share * me.world
                    loss = losses["loss"] if scale == 1 else losses["loss"] * scale
                    loss.backward()
                for k, v in losses.items():
                    logged[k] = logged.get(k, 0.0) + float(v.detach()) * share
            if me.world > 1:
                logged = distributed.sum_dict(logged, device)
            grad_norm = _full(torch.nn.utils.clip_grad_norm_(params, config.grad_clip)).item()
            optimizer.set_lr(lr_factor(step, config))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            if ema is not None:
                update_ema(ema, model, min(config.ema_decay, (1 + step) / (10 + step)))
            step += 1
            dt = time.monotonic() - t0
            elapsed += dt
            counts: dict[str, float] = {}
            for batch in micro if task.describe else ():
                for k, v in task.describe(batch).items():
                    counts[k] = counts.get(k, 0) + v
            if me.world > 1 and counts:
                counts = distributed.sum_dict(counts, device)
                counts = {k: int(v) if float(v).is_integer() else v for k, v in counts.items()}
            tokens = counts.get("tokens", 0)
            tokens_seen += tokens
            loss_value = logged["loss"]
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"step {step}: the loss is {loss_value}; lower the lr")
            if me.main and (step % config.log_every == 0 or step == end):
                record = {
                    "step": step,
                    "loss": round(loss_value, 5),
                    **{f"loss_{k}": round(v, 5) for k, v in logged.items() if k != "loss"},
                    "lr": lr,
                    "grad_norm": round(grad_norm, 4),
                    **counts,
                    **({"tokens_per_s": round(tokens / dt, 1)} if "tokens" in counts else {}),
                    "elapsed_s": round(elapsed, 2),
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
            if bar is not None:
                bar.update(step - 1, loss_value, tokens / dt)
            if (
                task.evaluate is not None
                and config.eval_every
                and (step % config.eval_every == 0 or step == config.steps)
            ):
                plain = _plain(model, template) if sharded else model
                best = _evaluate(task, config, out, plain, ema, step, best, log if me.main else None)
            if step % config.checkpoint_every == 0 or step == end:
                # with FSDP every process takes part in gathering the whole weights and optimizer state
                whole = _gathered(model) if sharded else model.state_dict()
                head_state = None
                if heads is not None:
                    head_state = _gathered(heads) if sharded else heads.state_dict()
                opt = _sharded_optimizer_state(objective, optimizer) if sharded else None
                if me.main:
                    state = {
                        "format": CHECKPOINT_FORMAT,
                        "step": step,
                        "elapsed": elapsed,
                        "tokens": tokens_seen,
                        "config": config.to_dict(),
                        "model": whole,
                        "heads": head_state,
                        "ema": ema,
                        "optimizer": opt if sharded else optimizer.state_dict(),
                        "rng": _rng_state(),
                        "best": best,
                    }
                    save_checkpoint(checkpoint_path, state)
                    del state
                distributed.barrier()
    model_dir = out / MODEL_DIR
    if step >= config.steps:
        if ema is not None:  # the checkpoint keeps the last step's weights; the export is the average
            model.load_state_dict(ema, strict=False)
        exported = _plain(model, template) if sharded else model
        if me.main and task.export is not None:
            task.export(exported, model_dir)
        distributed.barrier()
    return model_dir


class Objective(torch.nn.Module):
    """`loss(model, batch)` as a module call over the model and heads, so that DistributedDataParallel can
    wrap it (DDP hooks the parameters of the module it wraps and syncs their gradients in backward)."""

    def __init__(self, model: torch.nn.Module, heads: torch.nn.Module | None, loss: Callable) -> None:
        super().__init__()
        self.model, self.heads, self.loss = model, heads, loss

    def forward(self, batch: Any) -> Mapping[str, torch.Tensor]:
        return self.loss(self.model, batch)


def shard(objective: Objective) -> torch.nn.Module:
    """FSDP2: shard every transformer block (the children of each `layers` ModuleList) and then the rest
    of the model and heads as one unit over the processes (`fully_shard`; parameters become DTensors).
    Returns a copy of the model on the meta device: the template `_plain` fills with gathered weights."""
    import copy

    from torch.distributed.fsdp import fully_shard

    template = copy.deepcopy(objective.model).to("meta")
    for name, module in objective.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList):
            for block in module:
                fully_shard(block)
    fully_shard(objective)  # the root: its forward, which the loop calls, gathers the rest
    return template


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every process calls it); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _gathered(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of an FSDP-sharded module, on the CPU, one tensor gathered at a time (every
    process calls it)."""
    return {k: _full(v).detach().cpu() for k, v in module.state_dict().items()}


def _plain(model: torch.nn.Module, template: torch.nn.Module) -> torch.nn.Module | None:
    """An unsharded copy of the FSDP-sharded `model` on the CPU, from `template` (`shard`): every process
    gathers, the main process gets the copy (others None)."""
    weights = _gathered(model)
    if not distributed.current().main:
        return None
    import copy

    plain = copy.deepcopy(template).to_empty(device="cpu")
    plain.load_state_dict(weights)
    if hasattr(plain, "tie_weights"):  # to_empty made the tied output head a tensor of its own
        plain.tie_weights()
    return plain


def _sharded_optimizer_state(objective: torch.nn.Module, optimizer: Any) -> list[dict[str, Any]]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return [get_optimizer_state_dict(objective, o, options=options) for o in optimizer.optimizers]


def _load_sharded_optimizer(objective: torch.nn.Module, optimizer: Any, states: list[dict[str, Any]]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    for o, state in zip(optimizer.optimizers, states, strict=True):
        set_optimizer_state_dict(objective, o, state, options=options)


def _evaluate(
    task: TrainTask,
    config: TrainConfig,
    out: Path,
    model: Any,
    ema: dict[str, Any] | None,
    step: int,
    best: dict[str, Any] | None,
    log: TextIO | None,
) -> dict[str, Any] | None:
    """Evaluate the weights the run would export now (rank 0; the others wait), log the metrics, and export
    them to OUT/best when config.best_metric improved. Returns the best so far {"step", "metric", "value"}."""
    import copy

    if log is not None:
        evaluated = model
        if ema is not None:
            evaluated = copy.deepcopy(model)
            evaluated.load_state_dict(ema, strict=False)
        evaluated.eval()
        metrics = dict(task.evaluate(evaluated, step))
        evaluated.train()
        log.write(json.dumps({"step": step, "eval": metrics}) + "\n")
        log.flush()
        name = config.best_metric
        if name:
            if name not in metrics:
                raise ValueError(
                    f"best_metric {name!r} is not among the evaluation's metrics {sorted(metrics)}"
                )
            if best is None or metrics[name] > best["value"]:
                best = {"step": step, "metric": name, "value": float(metrics[name])}
                if task.export is not None:
                    task.export(evaluated, out / BEST_DIR)
    distributed.barrier()
    return best


def check_config(out: Path, config: TrainConfig, write: bool = True) -> None:
    """Create `out`; write config as recipe.json there, or check that the one there equals it (a resumed
    run must be the same run). Fields added since a run began read as their defaults."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_FILE
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        with contextlib.suppress(TypeError, ValueError):
            saved = type(config).from_dict(saved).to_dict()
        wanted = config.to_dict()
        if saved != wanted:
            changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            raise ValueError(
                f"{out} holds a run of another recipe (differs in {changed}); choose a new --out folder "
                "or delete this one to start over"
            )
    elif write:
        from kosmos2.fileio import atomic_write_text

        atomic_write_text(path, json.dumps(config.to_dict(), indent=2) + "\n")
    distributed.barrier()


def freeze(model: Any, prefixes: Sequence[str]) -> None:
    """Stop training the parameters whose name starts with one of `prefixes`; an unmatched prefix is an
    error naming the model's top-level modules."""
    if not prefixes:
        return
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(n == prefix or n.startswith(prefix.rstrip(".") + ".") for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise ValueError(f"freeze {prefix!r} matches no parameter; the model's modules are {tops}")
    for name, p in model.named_parameters():
        if any(name == prefix or name.startswith(prefix.rstrip(".") + ".") for prefix in prefixes):
            p.requires_grad_(False)


def set_gradient_checkpointing(model: Any, enabled: bool) -> None:
    """Set the `gradient_checkpointing` flag of every module that has one (the decoder and the ViT)."""
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = enabled


def update_ema(ema: dict[str, torch.Tensor], model: Any, decay: float) -> None:
    """ema += (1 - decay) * (weights - ema), for every float tensor of the model's state dict."""
    with torch.no_grad():
        state = model.state_dict()
        for name, average in ema.items():
            average.lerp_(state[name].float(), 1 - decay)


def move(data: Any, device: torch.device | str) -> Any:
    """`data` with its tensors on `device`: through dataclasses, lists, tuples and dicts."""
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=True)
    if isinstance(data, list | tuple):
        return type(data)(move(v, device) for v in data)
    if isinstance(data, dict):
        return {k: move(v, device) for k, v in data.items()}
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return dataclasses.replace(
            data, **{f.name: move(getattr(data, f.name), device) for f in dataclasses.fields(data)}
        )
    return data


# ------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename over it: a reader (or a run killed
    mid-write) sees either the previous checkpoint or the new one, never a partial file."""
    from kosmos2.fileio import atomic_write

    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"{path}: not a readable training checkpoint ({reason}); delete it to start over"
        ) from e
    if not isinstance(state, dict) or "format" not in state:
        raise ValueError(f"{path}: not a kosmos2 training checkpoint (format {CHECKPOINT_FORMAT})")
    if state["format"] != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path}: a training checkpoint of format {state['format']}, this kosmos2 reads format "
            f"{CHECKPOINT_FORMAT}; start the run again in a new --out folder"
        )
    return state


@contextlib.contextmanager
def _flush_denormals(enabled: bool) -> Iterator[None]:
    """Flush denormal floats to zero while training on the CPU: trained attention is sharp, its softmax
    underflows into denormals, and x86 cores compute on them many times slower. Deterministic, so a resumed
    run still matches an uninterrupted one."""
    on = enabled and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on:
            torch.set_flush_denormal(False)


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ------------------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A one-line progress bar on a terminal (a plain line every `every` steps otherwise): step, loss,
    tokens/s and the estimated time left."""

    def __init__(self, total: int, start: int, stream: TextIO | None = None, every: int = 50):
        self.total, self.start, self.every = total, start, every
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.monotonic()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        done = step + 1
        if not self.tty and done % self.every and done != self.total:
            return
        rate = (done - self.start) / max(time.monotonic() - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        width = 24
        filled = int(width * done / self.total)
        bar = "#" * filled + "." * (width - filled)
        speed = f" {tokens_per_s / 1000:.1f}k tok/s" if tokens_per_s else ""
        line = f"step {done}/{self.total} [{bar}] loss {loss:.4f}{speed} ETA {_clock(eta)}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"
