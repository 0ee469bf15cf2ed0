"""`kosmos2 finetune --model DIR --data SPEC --out DIR`: fine-tune any Kosmos-2 checkpoint on grounded data.

    checkpoint (HF layout: official, default model, an earlier fine-tune) + its own tokenizer
    --data SPEC ──kosmos2.data.sources──► samples ──held out by image (or --eval-data)──► train / eval
        vocabulary check: words the tokenizer cannot encode stop the run before training, named
    full fine-tuning, or LoRA (peft) on the attention projections [+ fc1/fc2] (lora.py)
    the general loop (loop.fit): --freeze-vision / --freeze-connector, gradient accumulation, gradient
        checkpointing, bf16 autocast, checkpoints + resume (rerun the same command), JSONL log, progress bar,
        torchrun; every --eval-every steps REC Acc@0.5 and grounded-caption entity P/R on the held-out split
        through the evaluation harness (Predictor + run_queries + kosmos2.eval.metrics)
    OUT/best: the best held-out score's model, OUT/model: the last step's, both in the HF layout Predictor,
        `kosmos2 ground` and `kosmos2 eval` load unchanged (LoRA merged); with --save-adapter peft's
        adapter_config.json + adapter_model.safetensors instead. OUT/eval.json, OUT/bad_records.jsonl.

`kosmos2 finetune --eval-only --model DIR --data SPEC` scores a checkpoint on every sample of SPEC.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kosmos2.fileio import atomic_write_text
from kosmos2.train.config import TrainConfig

EVAL_FILE = "eval.json"
BAD_RECORDS_FILE = "bad_records.jsonl"
COPIED_FILES = ("generation_config.json", "preprocessor_config.json")
# generation budget per evaluated task: a REC answer is <object><ul><lr></object></s>
MAX_NEW_TOKENS = {"rec": 8, "caption": 96}
RETRIES = 8  # a sample collation drops is replaced by a later draw, at most this many times


@dataclass
class FinetuneConfig(TrainConfig):
    """The loop's settings (TrainConfig) plus the data, the starting checkpoint and LoRA; saved as
    OUT/recipe.json, which a resumed run must match."""

    model: str = ""  # checkpoint directory ("" = the built-in default model)
    data: tuple[str, ...] = ()
    eval_data: tuple[str, ...] = ()  # default: `holdout` of the images of `data`
    holdout: float = 0.05
    batch_size: int = 16  # samples per step (all processes and micro-batches together)
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_mlp: bool = False
    save_adapter: bool = False
    eval_limit: int = 200  # held-out queries per task per evaluation
    # fine-tuning defaults of the loop's fields
    steps: int = 500
    lr: float = 1e-4
    warmup_steps: int = 20
    final_lr_fraction: float = 0.0
    checkpoint_every: int = 50
    eval_every: int = 100
    best_metric: str = "score"
    export_dtype: str = "float32"

    def validate(self) -> FinetuneConfig:
        super().validate()
        if not self.data:
            raise ValueError("--data is required: KIND:PATH[:KEY=VALUE]...[*WEIGHT]")
        if self.batch_size < 1 or self.lora_rank < 1 or not 0 <= self.holdout < 1:
            raise ValueError("batch_size and lora_rank must be >= 1 and holdout in [0, 1)")
        if self.save_adapter and not self.lora:
            raise ValueError("--save-adapter needs --lora")
        return self


# ------------------------------------------------------------------------------------------------------------
# Batches and evaluation


class SampleBatches:
    """`batches(step, part, parts)` for the loop: rows part, part + parts, ... of the step's `batch_size`
    draws (`sources.draw`, a pure function of the draw's index), collated. A sample collation cannot use is
    replaced by a later draw (deterministically), so a bad image never shrinks or stops a step."""

    def __init__(self, per_source, weights, seed: int, batch_size: int, collate) -> None:
        self.per_source, self.weights, self.seed = per_source, list(weights), seed
        self.batch_size, self.collate = batch_size, collate

    def __call__(self, step: int, part: int, parts: int) -> dict[str, Any]:
        from kosmos2.data.sources import draw

        rows = range(part, self.batch_size, parts)
        chosen = [draw(self.per_source, self.weights, self.seed, step * self.batch_size + j) for j in rows]
        batch = self.collate(chosen)
        for retry in range(1, RETRIES + 1):
            if batch is not None and batch["input_ids"].shape[0] == len(chosen):
                return batch
            # redraw the whole micro-batch further along the stream (beyond any step's indices)
            offset = retry * 1_000_003 * self.batch_size
            chosen = [
                draw(self.per_source, self.weights, self.seed, offset + step * self.batch_size + j)
                for j in rows
            ]
            batch = self.collate(chosen)
        if batch is None:
            raise ValueError(f"step {step}: no usable sample in {RETRIES + 1} draws; see the bad records")
        return batch


def evaluate(
    model, tokenizer, samples, generation, limit: int = 200, batch_size: int = 16, progress: bool = False
) -> dict[str, float]:
    """REC Acc@0.5 (first box) over held-out REC samples and entity P/R/F1 over held-out grounded captions;
    "score" is the REC accuracy when there are REC samples, else the caption F1."""
    from kosmos2.eval import metrics
    from kosmos2.eval.runner import Query, run_queries
    from kosmos2.predictor import Predictor

    predictor = Predictor(model, tokenizer, generation, batch_size=batch_size)
    out: dict[str, float] = {}
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
            out.update(rec_acc=summary["acc_first"] / 100, rec_count=summary["count"])
            out["rec_undecodable"] = summary["undecodable"]
        else:
            counts = [
                metrics.entity_pair_counts(preds[q.id].entities, s.truth)
                for q, s in zip(queries, chosen, strict=True)
            ]
            pr = metrics.precision_recall(counts)
            out.update(caption_precision=pr["precision"], caption_recall=pr["recall"], caption_f1=pr["f1"])
            out["caption_count"] = len(chosen)
    out["score"] = out.get("rec_acc", out.get("caption_f1", 0.0))
    return out


def _fmt(result: dict[str, Any]) -> str:
    parts = []
    if "rec_acc" in result:
        parts.append(f"REC Acc@0.5 {result['rec_acc']:.3f} ({result['rec_count']} queries)")
    if "caption_f1" in result:
        parts.append(f"caption entities P {result['caption_precision']:.3f} R {result['caption_recall']:.3f}")
    return ", ".join(parts) or "nothing to score"


# ------------------------------------------------------------------------------------------------------------
# The run


def write_model(model, peft_model, tokenizer, source: Path, directory: Path, cfg: FinetuneConfig) -> None:
    """The HF layout into `directory` (LoRA merged, weights in cfg.export_dtype), or peft's adapter files
    with --save-adapter; the tokenizer and the source checkpoint's generation/preprocessor settings beside."""
    import torch

    from kosmos2.checkpoint import _write_checkpoint

    directory.mkdir(parents=True, exist_ok=True)
    if peft_model is not None and cfg.save_adapter:
        from kosmos2.train.lora import save_adapter

        save_adapter(peft_model, directory, str(source))
    else:
        from kosmos2.train.lora import merged_state_dict

        state = merged_state_dict(peft_model) if peft_model is not None else model.state_dict()
        dtype = getattr(torch, cfg.export_dtype)
        state = {
            k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in state.items()
        }
        _write_checkpoint(state, model.config, directory)  # atomic per file, the tied head left out
    tokenizer.save_pretrained(directory)
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, directory / name)


def finetune(
    cfg: FinetuneConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    device: str = "cpu",
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) a fine-tuning in `out_dir`; returns {"best", "last", "bad_records"}."""
    import torch

    from kosmos2.checkpoint import load_pretrained
    from kosmos2.data.sources import load_sources, parse_spec
    from kosmos2.predictor import default_model_dir, generation_defaults
    from kosmos2.tokenizer import Kosmos2Tokenizer
    from kosmos2.train.collate import Collator, check_vocabulary
    from kosmos2.train.distributed import current
    from kosmos2.train.loop import LOG_FILE, TrainTask, fit
    from kosmos2.train.lora import add_lora

    cfg.validate()
    out = Path(out_dir)
    source = Path(cfg.model) if cfg.model else default_model_dir()
    me = current()

    # 1. data, the held-out split, the vocabulary check (before any training)
    data = load_sources(
        parse_spec(list(cfg.data)), holdout=0.0 if cfg.eval_data else cfg.holdout, seed=cfg.seed
    )
    heldout = data.heldout
    if cfg.eval_data:
        heldout = [
            s for part in load_sources(parse_spec(list(cfg.eval_data)), data.report).train for s in part
        ]
    tokenizer = Kosmos2Tokenizer.from_pretrained(source)
    check_vocabulary(tokenizer, [s for part in data.train for s in part] + heldout, str(source))
    if me.main:
        n = sum(len(p) for p in data.train)
        print(
            f"data: {n} training samples from {len(data.sources)} source(s), {len(heldout)} held out",
            file=sys.stderr,
        )
        print(data.report.summary(), file=sys.stderr)

    # 2. the model: full or LoRA (frozen parts get no LoRA either)
    model = load_pretrained(source, dtype=torch.float32)
    peft_model = None
    frozen = set(cfg.freeze)
    if cfg.lora:
        parts = tuple(
            part
            for part, prefix in (("text", "text_model"), ("vision", "vision_model"),
                                 ("connector", "image_to_text_projection"))
            if prefix not in frozen
        )  # fmt: skip
        peft_model = add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, parts, cfg.lora_mlp)
        model = peft_model.base_model.model  # the Kosmos2 with LoRA layers inside: what the loop trains
    generation = generation_defaults(source, tokenizer)
    t = model.config
    collate = Collator(tokenizer, t.vision.image_size, t.latent_query_num, t.text.max_positions, data.report)

    def export(trained, directory: Path) -> None:
        write_model(trained, peft_model, tokenizer, source, Path(directory), cfg)

    def run_eval(trained, step: int) -> dict[str, float]:
        with torch.no_grad():
            result = evaluate(trained, tokenizer, heldout, generation, cfg.eval_limit)
        print(f"step {step}: held-out {_fmt(result)}", file=sys.stderr)
        return result

    from kosmos2.train.loss import IGNORE, causal_lm_loss

    task = TrainTask(
        model=model,
        batches=SampleBatches(data.train, data.weights, cfg.seed, cfg.batch_size, collate),
        loss=causal_lm_loss,
        weight=lambda b: int((b["targets"] != IGNORE).sum()),
        describe=lambda b: {
            "rows": int(b["input_ids"].shape[0]),
            "tokens": int((b["targets"] != IGNORE).sum()),
        },
        export=export,
        evaluate=run_eval if heldout else None,
    )
    if not heldout:
        cfg = dataclasses.replace(cfg, best_metric="")
    fit(task, cfg, out, progress=progress, device=device, stop_after=stop_after)

    # 3. the record: evaluations from the log, bad records
    evals = []
    log = out / LOG_FILE
    if log.is_file():
        evals = [r for r in map(json.loads, log.read_text().splitlines()) if "eval" in r]
    best = max(evals, key=lambda r: r["eval"].get("score", 0.0), default=None)
    result = {"best": best, "last": evals[-1] if evals else None, "bad_records": data.report.total}
    if me.main:
        atomic_write_text(out / EVAL_FILE, json.dumps(result, indent=2) + "\n")
        if data.report.items:
            text = "".join(json.dumps(i) + "\n" for i in data.report.items)
            atomic_write_text(out / BAD_RECORDS_FILE, text)
    return result


def evaluate_checkpoint(
    model_dir: str, data: list[str], limit: int = 1000, out: str = "", device: str = "cpu"
) -> dict[str, Any]:
    """Score a checkpoint on every sample of `data` (all of it held out): what `--eval-only` runs."""
    from kosmos2.data.sources import load_sources, parse_spec
    from kosmos2.predictor import Predictor, default_model_dir
    from kosmos2.train.collate import check_vocabulary

    source = Path(model_dir) if model_dir else default_model_dir()
    dataset = load_sources(parse_spec(data))
    samples = [s for part in dataset.train for s in part]
    predictor = Predictor.from_pretrained(source, device=device)
    check_vocabulary(predictor.tokenizer, samples, str(source))
    result: dict[str, Any] = dict(
        evaluate(predictor.model, predictor.tokenizer, samples, predictor.generation, limit, progress=True)
    )
    result["model"] = str(source)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out) / EVAL_FILE, json.dumps(result, indent=2) + "\n")
    return result


# ------------------------------------------------------------------------------------------------------------
# The command

# CLI flag -> config field, for the loop's fields whose flag reads better under another name
RENAMED = {"warmup": "warmup_steps", "clip": "grad_clip", "save_every": "checkpoint_every"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a checkpoint on your grounded data (COCO, RefCOCO, Flickr30k, ODVG, GRIT, JSONL)",
        description="Fine-tune a checkpoint (full or LoRA) on grounded data. Rerun the same command to "
        "resume a killed run. OUT/best holds the best held-out model (Hugging Face layout), OUT/model the "
        "last. "
        "--data: KIND:PATH[:KEY=VALUE]...[*WEIGHT], KIND one of coco refer mdetr flickr odvg grit jsonl, "
        "e.g. coco:data/instances.json:images=data/images:tasks=caption+rec (kosmos2/data/sources.py).",
    )
    d = FinetuneConfig()
    p.add_argument("--model", default="", help="checkpoint directory (default: the built-in default model)")
    p.add_argument("--data", action="append", required=True, help="data spec (repeatable: sources mix)")
    p.add_argument("--out", default="", help="run folder (rerun the same command to resume)")
    p.add_argument("--eval-data", action="append", default=[], help="held-out data spec (default: --holdout)")
    p.add_argument(
        "--holdout", type=float, default=d.holdout, help="fraction of images held out (%(default)s)"
    )
    p.add_argument("--eval-only", action="store_true", help="score --model on all of --data; no training")
    for flag, kind in (("steps", int), ("batch_size", int), ("grad_accum", int), ("warmup", int),
                       ("eval_every", int), ("eval_limit", int), ("save_every", int), ("seed", int),
                       ("lora_rank", int), ("lr", float), ("weight_decay", float), ("clip", float),
                       ("lora_alpha", float), ("lora_dropout", float), ("max_minutes", float)):  # fmt: skip
        field = RENAMED.get(flag, flag)
        p.add_argument("--" + flag.replace("_", "-"), dest=field, type=kind, default=getattr(d, field))
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights")
    p.add_argument(
        "--lora-mlp", action="store_true", help="LoRA on fc1/fc2 and the connector's dense projection too"
    )
    p.add_argument(
        "--save-adapter", action="store_true", help="write peft's adapter files instead of merging"
    )
    p.add_argument("--freeze-vision", action="store_true", help="do not train the vision encoder")
    p.add_argument("--freeze-connector", action="store_true", help="do not train the connector")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
                   help="any other loop field, e.g. --set optimizer=muon --set ema_decay=0.999")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_finetune)


def error(message: str) -> int:
    print(f"kosmos2 finetune: {message}", file=sys.stderr)
    return 2


def run_finetune(args: argparse.Namespace) -> int:
    from kosmos2.train.collate import UnknownWordsError
    from kosmos2.train.config import parse_overrides, with_overrides

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.eval_only:
        try:
            result = evaluate_checkpoint(args.model, args.data, args.eval_limit, args.out, args.device)
        except (UnknownWordsError, ValueError, FileNotFoundError) as e:
            return error(str(e))
        print(f"{result['model']}: {_fmt(result)}")
        return 0
    if not args.out:
        return error("--out DIR is required (the run folder: models, log, resume state)")
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    fields = {k: v for k, v in vars(args).items() if k in names}
    fields.update(data=tuple(args.data), eval_data=tuple(args.eval_data))
    fields["freeze"] = tuple(
        prefix
        for flag, prefix in (
            (args.freeze_vision, "vision_model"),
            (args.freeze_connector, "image_to_text_projection"),
        )
        if flag
    )
    try:
        cfg = with_overrides(FinetuneConfig(**fields), **parse_overrides(args.overrides))
        result = finetune(cfg, args.out, progress=args.progress, device=args.device)
    except (UnknownWordsError, ValueError, FileNotFoundError) as e:
        return error(str(e))
    best = result["best"]
    where = Path(args.out) / ("best" if best else "model")
    print(f"wrote {where}" + (f" (best at step {best['step']}: {_fmt(best['eval'])})" if best else ""))
    return 0
