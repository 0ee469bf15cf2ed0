"""`kosmos2 finetune --model DIR --data SPEC --out DIR`: fine-tune any Kosmos-2 checkpoint on grounded data.

    checkpoint (HF layout: official, default model, an earlier fine-tune) + its own tokenizer
    --data SPEC ──kosmos2.data.sources──► samples ──held out by image──► train / eval
        vocabulary check (words the tokenizer cannot encode: error naming them, before training)
    full fine-tuning, or LoRA (peft) on the attention projections [+ fc1/fc2]
        --freeze-vision / --freeze-connector, gradient accumulation, gradient checkpointing, bf16 autocast
    every --eval-every steps: REC Acc@0.5 and grounded-caption entity P/R on the held-out split through the
        evaluation harness (Predictor + kosmos2.eval); the best score's model is written to --out
    --out: the HF layout Predictor / `kosmos2 ground` / `kosmos2 eval` load unchanged (LoRA merged), or with
        --save-adapter peft's adapter files; plus log.jsonl, eval.json, bad_records.jsonl, and
        train_state.pt, from which a killed run resumes (rerun the same command)

AdamW (β 0.9/0.98, eps 1e-6, weight decay 0.01 as the paper, SPEC §10), linear warm-up then linear decay.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kosmos2.fileio import atomic_write_text

STATE_FILE = "train_state.pt"
LOG_FILE = "log.jsonl"
EVAL_FILE = "eval.json"
BAD_RECORDS_FILE = "bad_records.jsonl"
CONFIG_FILE = "finetune.json"
COPIED_FILES = ("generation_config.json", "preprocessor_config.json")
# generation budget per evaluated task: a REC answer is <object><ul><lr></object></s>
MAX_NEW_TOKENS = {"rec": 8, "caption": 96}


@dataclass
class FinetuneConfig:
    """Everything a run depends on; saved as finetune.json in --out. A resumed run must match it."""

    model: str = ""  # checkpoint directory ("" = the built-in default model)
    data: list[str] = field(default_factory=list)
    out: str = ""
    eval_data: list[str] = field(default_factory=list)  # default: `holdout` of the images of --data
    holdout: float = 0.05
    steps: int = 500
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 20
    weight_decay: float = 0.01
    clip: float = 1.0
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_mlp: bool = False
    save_adapter: bool = False
    freeze_vision: bool = False
    freeze_connector: bool = False
    gradient_checkpointing: bool = False
    bf16: bool = False
    eval_every: int = 100
    eval_limit: int = 200  # held-out queries per task per evaluation
    eval_at_start: bool = False  # also score the checkpoint before the first step
    save_every: int = 50
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch threads (0: torch's default)
    progress: bool = True

    def resume_key(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run it continues."""
        skip = {
            "steps",
            "eval_every",
            "save_every",
            "threads",
            "progress",
            "device",
            "eval_limit",
            "eval_at_start",
        }
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


# ------------------------------------------------------------------------------------------------------------
# Evaluation on the held-out split (the harness: Predictor + run_queries + kosmos2.eval.metrics)


def evaluate(
    model, tokenizer, samples, generation, limit: int = 200, batch_size: int = 16, progress: bool = False
) -> dict[str, Any]:
    """REC Acc@0.5 (first box) over held-out REC samples and entity P/R/F1 over held-out grounded captions."""
    from kosmos2.eval import metrics
    from kosmos2.eval.runner import Query, run_queries
    from kosmos2.predictor import Predictor

    predictor = Predictor(model, tokenizer, generation, batch_size=batch_size)
    out: dict[str, Any] = {}
    rec = [s for s in samples if s.task == "rec"][:limit]
    captions = [s for s in samples if s.task in ("caption", "text") and s.truth][:limit]
    for name, chosen in (("rec", rec), ("caption", captions)):
        if not chosen:
            continue
        queries = [Query(f"{i}", s.image, s.prompt, s.size) for i, s in enumerate(chosen)]
        preds, _ = run_queries(
            predictor,
            queries,
            model_id="finetune",
            batch_size=batch_size,
            progress=progress,
            generation={"max_new_tokens": MAX_NEW_TOKENS[name]},
        )
        if name == "rec":
            scores = [
                metrics.score_rec(preds[q.id].boxes_for(s.truth[0][0]), s.truth[0][1])
                for q, s in zip(queries, chosen, strict=True)
            ]
            summary = metrics.rec_summary(scores)
            out["rec_acc"] = summary["acc_first"] / 100
            out["rec"] = summary
        else:
            counts = [
                metrics.entity_pair_counts(preds[q.id].entities, s.truth)
                for q, s in zip(queries, chosen, strict=True)
            ]
            out["caption"] = metrics.precision_recall(counts)
    out["score"] = out.get("rec_acc") if out.get("rec_acc") is not None else out.get("caption", {}).get("f1")
    return out


# ------------------------------------------------------------------------------------------------------------
# The run


def lm_loss(model, batch) -> Any:
    """Mean cross-entropy over the batch's target tokens; the output head runs only where the loss is (the
    64 image slots and the prompt make up most of each row)."""
    import torch.nn.functional as F

    from kosmos2.model import make_positions
    from kosmos2.tokenizer import IGNORE_INDEX

    decoder = model.text_model
    embeds = model.encode_image(batch.pixel_values)  # [B, Q, C]
    positions = make_positions(batch.input_ids, model.config.text.pad_token_id)
    hidden = decoder.model(
        batch.input_ids, positions, None, embeds, batch.image_mask
    )  # right padding: causal
    learned = batch.targets != IGNORE_INDEX
    logits = decoder.lm_head(hidden[learned])  # [N, V]
    return F.cross_entropy(logits.float(), batch.targets[learned])


def _log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _lr_factor(step: int, cfg: FinetuneConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    return max(0.0, 1 - (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1))


def _save_model(cfg: FinetuneConfig, model, peft_model, tokenizer, source: Path, out: Path) -> None:
    """The HF layout into `out` (LoRA merged), or peft's adapter files with --save-adapter; tokenizer and
    the checkpoint's generation/preprocessor settings beside them."""
    from kosmos2.checkpoint import _write_checkpoint, save_pretrained

    if peft_model is not None and cfg.save_adapter:
        from kosmos2.finetune_draft.lora import save_adapter

        save_adapter(peft_model, out, str(source))
    elif peft_model is not None:
        from kosmos2.finetune_draft.lora import merged_state_dict

        _write_checkpoint(merged_state_dict(peft_model), model.config, out)
    else:
        save_pretrained(model, out)
    tokenizer.save_pretrained(out)
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run (or resume) a fine-tuning; returns the best evaluation (and the last one)."""
    import torch

    from kosmos2.checkpoint import load_pretrained
    from kosmos2.data.sources import load_sources, mixture, parse_spec
    from kosmos2.fileio import atomic_write
    from kosmos2.finetune_draft.collate import Collator, check_vocabulary
    from kosmos2.finetune_draft.lora import add_lora, enable_gradient_checkpointing, freeze
    from kosmos2.predictor import default_model_dir, generation_defaults
    from kosmos2.tokenizer import Kosmos2Tokenizer
    from kosmos2.train import Progress

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # trained attention is sharp: its softmax underflows into denormals, many times slower on x86 cores
    torch.set_flush_denormal(True)
    source = Path(cfg.model) if cfg.model else default_model_dir()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    previous = json.loads((out / CONFIG_FILE).read_text()) if (out / CONFIG_FILE).is_file() else None
    resuming = state_path.is_file()
    if resuming and previous is not None:
        old = FinetuneConfig(**previous).resume_key()
        changed = sorted(k for k, v in cfg.resume_key().items() if old.get(k) != v)
        if changed:
            raise ValueError(
                f"{out} holds a run with different settings ({', '.join(changed)}); resume with the same "
                "command (only --steps, --eval-every, --save-every, --threads may change) or use a new --out"
            )
    atomic_write_text(out / CONFIG_FILE, json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    # 1. data, the held-out split, the vocabulary check (before any training)
    sources = parse_spec(cfg.data)
    data = load_sources(sources, holdout=0.0 if cfg.eval_data else cfg.holdout, seed=cfg.seed)
    heldout = data.heldout
    if cfg.eval_data:
        heldout = [s for part in load_sources(parse_spec(cfg.eval_data), data.report).train for s in part]
    tokenizer = Kosmos2Tokenizer.from_pretrained(source)
    check_vocabulary(tokenizer, [s for part in data.train for s in part] + heldout, str(source))
    n_train = sum(len(p) for p in data.train)
    print(
        f"data: {n_train} training samples from {len(sources)} source(s), {len(heldout)} held out",
        file=sys.stderr,
    )
    print(data.report.summary(), file=sys.stderr)

    # 2. model: full or LoRA, frozen parts, checkpointing
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    model = load_pretrained(source, dtype=torch.float32, device=device)
    freeze(model, cfg.freeze_vision, cfg.freeze_connector)
    peft_model = None
    if cfg.lora:
        parts = tuple(
            p
            for p, frozen in (
                ("text", False),
                ("vision", cfg.freeze_vision),
                ("connector", cfg.freeze_connector),
            )
            if not frozen
        )
        peft_model = add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, parts, cfg.lora_mlp)
        model = peft_model.base_model.model  # the Kosmos2 with LoRA layers inside
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    decay = [p for n, p in params.items() if p.ndim >= 2]
    no_decay = [p for n, p in params.items() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    generation = generation_defaults(source, tokenizer)
    collate = Collator(
        tokenizer,
        model.config.vision.image_size,
        model.config.latent_query_num,
        model.config.text.max_positions,
        data.report,
    )

    # 3. resume
    step, drawn, best, last = 0, 0, None, None
    if resuming:
        state = torch.load(state_path, map_location=device, weights_only=False)
        missing = set(params) - set(state["params"])
        if missing:
            raise ValueError(
                f"{state_path}: no saved state for {sorted(missing)[:3]}; it belongs to another run"
            )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["params"][n])
        optimizer.load_state_dict(state["optimizer"])
        step, drawn, best = state["step"], state["drawn"], state["best"]
        torch.set_rng_state(state["rng"])
        print(f"resuming {out} at step {step}", file=sys.stderr)

    def save_state() -> None:
        state = {
            "params": {n: p.detach().cpu() for n, p in params.items()},
            "optimizer": optimizer.state_dict(),
            "step": step,
            "drawn": drawn,
            "best": best,
            "rng": torch.get_rng_state(),
        }
        atomic_write(state_path, lambda f: torch.save(state, f))

    def run_eval() -> dict[str, Any]:
        nonlocal best
        model.eval()
        with torch.no_grad():
            result = evaluate(model, tokenizer, heldout, generation, cfg.eval_limit)
        model.train()
        result["step"] = step
        improved = best is None or (result["score"] or 0) > (best.get("score") or 0)
        if improved:
            best = result
            _save_model(cfg, model, peft_model, tokenizer, source, out)
        _log(out / LOG_FILE, {"event": "eval", **result, "best": improved})
        atomic_write_text(out / EVAL_FILE, json.dumps({"best": best, "last": result}, indent=2) + "\n")
        print(f"step {step}: held-out {_fmt(result)}{' (best)' if improved else ''}", file=sys.stderr)
        return result

    if not resuming and heldout and cfg.eval_at_start:
        last = run_eval()  # before fine-tuning: the starting point
    # 4. the loop
    stream = mixture(data.train, data.weights, cfg.seed, start=drawn)
    model.train()
    bar = Progress(cfg.steps, step, every=10) if cfg.progress else None
    while step < cfg.steps:
        t0 = time.monotonic()
        batches = []
        for _ in range(cfg.grad_accum):
            chosen = [next(stream) for _ in range(cfg.batch_size)]
            drawn += cfg.batch_size
            batch = collate(chosen)
            if batch is not None:
                batches.append(batch.to(device))
        tokens = sum(b.loss_tokens for b in batches)
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for b in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = lm_loss(model, b)
            # token-weighted over the accumulated micro-batches: the same gradient as one large batch
            (loss * b.loss_tokens / max(tokens, 1)).backward()
            total += loss.item() * b.loss_tokens / max(tokens, 1)
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.clip)
        optimizer.step()
        step += 1
        seconds = time.monotonic() - t0
        _log(
            out / LOG_FILE,
            {
                "event": "step",
                "step": step,
                "loss": total,
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": float(norm),
                "tokens": tokens,
                "seconds": round(seconds, 3),
            },
        )
        if bar is not None:
            bar.update(step - 1, total, tokens / max(seconds, 1e-9))
        if heldout and (step % cfg.eval_every == 0 or step == cfg.steps):
            last = run_eval()
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_state()
    if not heldout:
        _save_model(cfg, model, peft_model, tokenizer, source, out)
    if data.report.items:
        atomic_write_text(out / BAD_RECORDS_FILE, "".join(json.dumps(i) + "\n" for i in data.report.items))
    return {"best": best, "last": last, "bad_records": data.report.total}


def evaluate_checkpoint(
    model_dir: str, data: list[str], limit: int = 1000, threads: int = 0, out: str = ""
) -> dict[str, Any]:
    """Score a checkpoint on every sample of `data` (all held out): what `--eval-only` runs."""
    import torch

    from kosmos2.data.sources import load_sources, parse_spec
    from kosmos2.finetune_draft.collate import check_vocabulary
    from kosmos2.predictor import Predictor, default_model_dir

    if threads:
        torch.set_num_threads(threads)
    source = Path(model_dir) if model_dir else default_model_dir()
    dataset = load_sources(parse_spec(data))
    samples = [s for part in dataset.train for s in part]
    predictor = Predictor.from_pretrained(source)
    check_vocabulary(predictor.tokenizer, samples, str(source))
    result = evaluate(
        predictor.model, predictor.tokenizer, samples, predictor.generation, limit, progress=True
    )
    result["model"] = str(source)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out) / EVAL_FILE, json.dumps(result, indent=2) + "\n")
    return result


def _fmt(result: dict[str, Any]) -> str:
    parts = []
    if result.get("rec_acc") is not None:
        parts.append(f"REC Acc@0.5 {result['rec_acc']:.3f} ({result['rec']['count']} queries)")
    if "caption" in result:
        c = result["caption"]
        parts.append(f"caption entities P {c['precision']:.3f} R {c['recall']:.3f}")
    return ", ".join(parts) or "nothing to score"


# ------------------------------------------------------------------------------------------------------------
# The command


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a checkpoint on grounded data: full or LoRA",
        description=__doc__.split("\n\n")[0],
    )
    d = FinetuneConfig()
    p.add_argument("--model", default="", help="checkpoint directory (default: the built-in default model)")
    p.add_argument(
        "--data", action="append", required=True, help="KIND:PATH[:KEY=VAL]...[*WEIGHT],... (repeatable)"
    )
    p.add_argument("--out", default="", help="output directory (rerun the same command to resume)")
    p.add_argument(
        "--eval-only", action="store_true", help="score --model on --data (all of it held out); no training"
    )
    p.add_argument("--eval-data", action="append", default=[], help="held-out data spec (default: --holdout)")
    p.add_argument(
        "--holdout", type=float, default=d.holdout, help="fraction of images held out for evaluation"
    )
    for name in (
        "steps",
        "batch_size",
        "grad_accum",
        "warmup",
        "eval_every",
        "eval_limit",
        "save_every",
        "seed",
        "threads",
        "lora_rank",
    ):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "weight_decay", "clip", "lora_alpha", "lora_dropout"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights")
    p.add_argument("--lora-mlp", action="store_true", help="LoRA on fc1/fc2 too")
    p.add_argument(
        "--save-adapter", action="store_true", help="write peft's adapter files instead of merging"
    )
    p.add_argument("--freeze-vision", action="store_true")
    p.add_argument("--freeze-connector", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--device", default=d.device)
    p.add_argument("--eval-at-start", action="store_true", help="score the checkpoint before training too")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    from kosmos2.finetune_draft.collate import UnknownWordsError

    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    cfg = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names})
    if args.eval_only:
        try:
            result = evaluate_checkpoint(cfg.model, cfg.data, cfg.eval_limit, cfg.threads, cfg.out)
        except (UnknownWordsError, ValueError, FileNotFoundError) as e:
            print(f"kosmos2 finetune: {e}", file=sys.stderr)
            return 2
        print(f"{result['model']}: {_fmt(result)}")
        return 0
    if not cfg.out:
        print(
            "kosmos2 finetune: --out DIR is required (where the model, logs and resume state go)",
            file=sys.stderr,
        )
        return 2
    if cfg.save_adapter and not cfg.lora:
        print("kosmos2 finetune: --save-adapter needs --lora", file=sys.stderr)
        return 2
    try:
        result = finetune(cfg)
    except (UnknownWordsError, ValueError, FileNotFoundError) as e:
        print(f"kosmos2 finetune: {e}", file=sys.stderr)
        return 2
    best = result["best"]
    print(f"wrote {cfg.out}" + (f" (best at step {best['step']}: {_fmt(best)})" if best else ""))
    return 0
