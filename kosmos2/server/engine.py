"""The batching engine: one worker thread owns the model and runs every admitted request in one batch.

Continuous batching over the model's static KV cache (`Kosmos2.setup_cache` / `forward_cached`):

    submit(job)      -> the bounded waiting queue (`QueueFull` when it holds `max_queue` jobs)
    worker loop      admit waiting jobs while the batch has room (`max_batch` rows), then one decode step
    join             new jobs' images are encoded and their prompts prefilled together (left-padded), in a
                     cache of their own; it is merged with the running batch's cache at the step boundary
    step             one token for every row; a row that ends (`</s>`, its `max_new_tokens`, a client that
                     went away) leaves the batch before the next step

Why each row gets exactly the output it would get alone: the cache slots are shared by all rows, and a row's
prompt sits right-aligned before the current slot with its unused slots masked out of attention; positions
are explicit per row (as in `generate`'s left-padded batches), the n-gram bans see only the row's own tokens,
and every row picks its token with its own settings and its own random generator (`sample_logits` on its own
logits). The batch changes only which rows share a matrix product, as `generate`'s left-padded batches do.

Beam search (`num_beams > 1`) keeps its beams in the cache's rows; such a job runs alone, through
`generate`, when the batch is empty.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kosmos2.generate import (
    GenerationConfig,
    NGramBlocker,
    decode_one_token,
    encode_images,
    generate,
    prefill,
    sample_logits,
    token_logprobs,
)
from kosmos2.image import preprocess
from kosmos2.predictor import Predictor, StreamDecoder


class QueueFull(Exception):
    """The waiting queue holds `max_queue` jobs: the caller answers 503 with Retry-After."""


@dataclass
class Job:
    """One generation request. `sink(kind, payload)` is called from the worker thread:
    ("event", StreamEvent) as the text grows, then once ("finish", info) or ("error", message)."""

    prompt: str
    image: Any  # a decoded RGB PIL image
    config: GenerationConfig
    sink: Callable[[str, Any], None]
    stream: bool = True  # False: no per-token events, only the final ones (saves work per token)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    started: float = 0.0


@dataclass
class _Row:
    job: Job
    decoder: StreamDecoder
    blocker: NGramBlocker | None
    generator: torch.Generator | None
    generated: int = 0


class BatchEngine:
    """Runs jobs through `predictor`'s model, up to `max_batch` at once; at most `max_queue` wait."""

    def __init__(self, predictor: Predictor, max_batch: int = 8, max_queue: int = 64, metrics=None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.predictor = predictor
        self.model = predictor.model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        # the running batch: rows, next-token logits [B,V], positions of the last token [B,1], next cache slot
        self._rows: list[_Row] = []
        self._logits: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._slot = 0

    # -- the caller's side (any thread) ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kosmos2-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue})")
            self._waiting.append(job)
            self._gauge()
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the worker thread ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._rows:
                    self._cond.wait()
                if self._stop:
                    break
                new, beam = self._admit()
            if beam is not None:
                self._run_alone(beam)
            if new:
                self._join(new)
            if self._rows:
                self._step()
        for job in list(self._waiting) + [r.job for r in self._rows]:
            job.sink("error", "the server is shutting down")

    def _admit(self) -> tuple[list[Job], Job | None]:
        """Waiting jobs that fit in the batch (FIFO); a beam-search job only once the batch is empty."""
        new: list[Job] = []
        while self._waiting and len(self._rows) + len(new) < self.max_batch:
            job = self._waiting[0]
            if job.cancelled.is_set():
                self._waiting.popleft()
                self._finish(job, "cancelled", 0)
                continue
            if job.config.num_beams > 1:
                if self._rows or new:
                    break  # wait for the batch to drain
                self._waiting.popleft()
                self._gauge()
                return [], job
            new.append(self._waiting.popleft())
        self._gauge()
        return new, None

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.running.set(len(self._rows))

    @torch.no_grad()
    def _join(self, jobs: list[Job]) -> None:
        """Encode and prefill `jobs` together, then merge them into the running batch."""
        p, model = self.predictor, self.model
        now = time.monotonic()
        for job in jobs:
            job.started = now
        old = self._take_cache() if self._rows else None
        try:
            pixels = preprocess([j.image for j in jobs], size=p.image_resolution).to(p.device)
            embeds = encode_images(model, pixels)
            batch = p.tokenizer.batch_encode([j.prompt for j in jobs], num_image_tokens=p.num_image_tokens)
            batch = {k: v.to(p.device) for k, v in batch.items()}
            ids, mask = batch["input_ids"], batch["attention_mask"]
            budget = max(j.config.max_new_tokens for j in jobs)
            T = ids.shape[1]
            # alone: room for the whole continuation now; joining: the merge allocates the room
            logits, positions = prefill(
                model, ids, mask, embeds, batch["image_mask"], T + budget if old is None else T
            )
        except Exception as e:  # a failed join fails its own jobs, never the running batch
            for job in jobs:
                job.sink("error", f"generation failed: {e}")
            if old is not None:
                self._put_cache(*old)
            return
        rows = []
        for b, job in enumerate(jobs):
            cfg = job.config
            history = ids[b][mask[b].bool()].tolist()
            generator = None
            if cfg.do_sample and cfg.seed is not None:
                generator = torch.Generator(device=p.device)
                generator.manual_seed(cfg.seed)
            row = _Row(
                job,
                StreamDecoder(p, job.prompt, job.image.size),
                NGramBlocker([history], cfg.no_repeat_ngram_size) if cfg.no_repeat_ngram_size > 0 else None,
                generator,
            )
            self._emit(row, row.decoder.start())
            rows.append(row)
        if old is None:
            self._rows, self._logits, self._positions, self._slot = rows, logits, positions, T
        else:
            new_cache = self._take_cache()
            self._merge(old, new_cache, T, rows, logits, positions)
        self._gauge()

    def _take_cache(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """The model's cache tensors: per layer (k, v) [B,H,L,hd], and the key mask [B,L]."""
        kv = [(layer.self_attn.kv_cache.k, layer.self_attn.kv_cache.v) for layer in self._layers()]
        return kv, self.model.cache_key_mask

    def _put_cache(self, kv: list[tuple[torch.Tensor, torch.Tensor]], key_mask: torch.Tensor) -> None:
        """Install cache tensors (the KV cache modules of the last `setup_cache` take them over)."""
        B, L = key_mask.shape
        if self.model.cache_key_mask is None:
            self.model.setup_cache(1, 1)
        for layer, (k, v) in zip(self._layers(), kv, strict=True):
            layer.self_attn.kv_cache.k, layer.self_attn.kv_cache.v = k, v
        self.model.cache_key_mask = key_mask

    def _layers(self):
        return self.model.text_model.model.layers

    def _merge(self, old, new, T: int, rows: list[_Row], logits: torch.Tensor, positions: torch.Tensor):
        """One cache for the running rows (content in slots [first, slot)) and the new ones ([0, T)):
        both right-aligned before a common next slot S, with room for the longest remaining budget."""
        (old_kv, old_mask), (new_kv, new_mask) = old, new
        used = old_mask[:, : self._slot].any(0).nonzero()
        first = int(used[0]) if len(used) else self._slot  # leading slots no running row uses: dropped
        n_old = self._slot - first
        S = max(n_old, T)
        remaining = [r.job.config.max_new_tokens - r.generated for r in self._rows + rows]
        L = S + max(remaining)
        B_old, B_new = old_mask.shape[0], new_mask.shape[0]
        mask = torch.zeros(B_old + B_new, L, dtype=torch.bool, device=old_mask.device)
        mask[:B_old, S - n_old : S] = old_mask[:, first : self._slot]
        mask[B_old:, S - T : S] = new_mask[:, :T]
        kv = []
        for (ko, vo), (kn, vn) in zip(old_kv, new_kv, strict=True):
            merged = []
            for o, n in ((ko, kn), (vo, vn)):
                t = o.new_zeros(B_old + B_new, o.shape[1], L, o.shape[3])
                t[:B_old, :, S - n_old : S] = o[:, :, first : self._slot]
                t[B_old:, :, S - T : S] = n[:, :, :T]
                merged.append(t)
            kv.append((merged[0], merged[1]))
        self._put_cache(kv, mask)
        self._rows = self._rows + rows
        self._logits = torch.cat([self._logits, logits])
        self._positions = torch.cat([self._positions, positions])
        self._slot = S

    @torch.no_grad()
    def _step(self) -> None:
        """One token per row; rows that end leave; the rest go one step through the decoder."""
        try:
            tokens, keep = [], []
            # each token's log-probability under the plain distribution (the entity scores), before bans
            logp = torch.log_softmax(self._logits.float(), dim=-1) if self.predictor.scores else None
            for b, row in enumerate(self._rows):
                if row.blocker is not None:
                    row.blocker.ban(self._logits[b : b + 1])
            greedy = self._logits.argmax(dim=-1).tolist()  # one call for every greedy row
            for b, row in enumerate(self._rows):
                cfg = row.job.config
                if row.job.cancelled.is_set():
                    self._close(row, "cancelled")
                    continue
                if cfg.do_sample:
                    t = int(sample_logits(self._logits[b : b + 1], cfg, row.generator)[0])
                else:
                    t = greedy[b]
                if t == cfg.eos_token_id:
                    self._close(row, "stop")
                    continue
                row.generated += 1
                lp = float(logp[b, t]) if logp is not None else None
                if row.job.stream:
                    self._emit(row, row.decoder.feed(t, lp))
                else:
                    row.decoder.ids.append(t)
                    if lp is not None:
                        row.decoder.logprobs.append(lp)
                if row.generated >= cfg.max_new_tokens:
                    self._close(row, "length")
                    continue
                if row.blocker is not None:
                    row.blocker.append([t])
                tokens.append(t)
                keep.append(b)
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(self._rows))
                self.metrics.count_tokens(len(self._rows))
            if not keep:
                self._rows = []
                self.model.clear_cache()
                self._gauge()
                return
            if len(keep) < len(self._rows):
                index = torch.tensor(keep, device=self._positions.device)
                self.model.reorder_cache(index)
                self._positions = self._positions.index_select(0, index)
                self._rows = [self._rows[b] for b in keep]
                self._gauge()
            self._positions = self._positions + 1
            token = torch.tensor(tokens, device=self._positions.device).unsqueeze(1)
            self._logits = decode_one_token(self.model, token, self._slot, self._positions)
            self._slot += 1
        except Exception as e:  # never leave requests hanging: fail the batch and start clean
            for row in self._rows:
                row.job.sink("error", f"generation failed: {e}")
            self._rows = []
            self.model.clear_cache()
            self._gauge()

    def _run_alone(self, job: Job) -> None:
        """A beam-search job: `generate` on its own, then its events all at once."""
        p = self.predictor
        job.started = time.monotonic()
        try:
            embeds, _ = p.encode_images([job.image])
            batch = p.tokenizer.batch_encode([job.prompt], num_image_tokens=p.num_image_tokens)
            batch = {k: v.to(p.device) for k, v in batch.items()}
            args = (batch["input_ids"], batch["attention_mask"], embeds, batch["image_mask"])
            (ids,) = generate(self.model, *args, job.config)
            logprobs = token_logprobs(self.model, *args, [ids])[0] if p.scores else None
        except Exception as e:
            job.sink("error", f"generation failed: {e}")
            return
        row = _Row(job, StreamDecoder(p, job.prompt, job.image.size), None, None, len(ids))
        self._emit(row, row.decoder.start())
        for i, t in enumerate(ids):
            self._emit(row, row.decoder.feed(t, logprobs[i] if logprobs is not None else None))
        if self.metrics is not None:
            self.metrics.batch_size.observe(1)
            self.metrics.count_tokens(len(ids))
        self._close(row, "length" if len(ids) >= job.config.max_new_tokens else "stop")

    def _emit(self, row: _Row, events: list) -> None:
        for event in events:
            row.job.sink("event", event)

    def _close(self, row: _Row, reason: str) -> None:
        if reason != "cancelled":
            self._emit(row, row.decoder.finish())
        self._finish(row.job, reason, row.generated)

    def _finish(self, job: Job, reason: str, tokens: int) -> None:
        now = time.monotonic()
        started = job.started or now
        job.sink(
            "finish",
            {
                "reason": reason,
                "completion_tokens": tokens,
                "queue_ms": round(1000 * (started - job.submitted), 2),
                "generate_ms": round(1000 * (now - started), 2),
            },
        )
        if self.metrics is not None:
            self.metrics.finished.labels(reason).inc()
