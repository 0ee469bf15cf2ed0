"""Generation speed of kosmos2 against transformers on the same random weights, in the same run.

    python benchmarks/generate.py                  # full size (1.66 B parameters, float32), ~10-15 minutes
    python benchmarks/generate.py --quick          # fewer new tokens and repeats, ~5 minutes
    python benchmarks/generate.py --preset tiny    # smoke test, seconds

What it does (benchmarks/README.md explains every number):
1. Measures the memory read bandwidth: `sum()` of a 1 GiB float32 tensor with the benchmark's thread count,
   repeated; the best repeat is the bandwidth (an upper bound should use the best the machine showed).
2. Builds the architecture once with seeded random weights and writes it as a Hugging Face layout checkpoint
   (`kosmos2.checkpoint.save_pretrained`) into a temporary folder.
3. Starts two worker processes, one per implementation, each loading that checkpoint the way a user would
   (`kosmos2.checkpoint.load_pretrained`; `Kosmos2ForConditionalGeneration.from_pretrained`). Separate
   processes give each side its own peak RSS. Both stay alive and the parent runs them in turn (ABBA order),
   so machine noise hits both sides alike.
4. Each measurement is a greedy generation (no-repeat-ngram 3, no early stop: exactly `--new-tokens` tokens)
   from random pixels + the 71-token prompt `<s><image>[64 slots]</image><grounding> w1 w2 w3` (the length of
   "<grounding>An image of"), timed at every new token: prefill = call -> first new token (image encoder,
   connector, prompt through the decoder, first token chosen); decode tokens/s = B * (N - 1) / (time of the
   last token - time of the first).
5. Prints a Markdown table with the ratio ours / transformers and the batch-1 decode speed against the
   bandwidth bound (bandwidth / bytes of the weights read per token), twice: with the best bandwidth of
   step 1 and of the same measurement at the end, and ("share beside") with the bandwidth the parent
   measures right before and after each batch-1 run (256 MiB, best of 3; the higher of the two), the median
   over runs. The host's bandwidth drifted between 33 and 63 GB/s within minutes on our machine, so only
   the second compares a run with the bandwidth it had.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import platform
import resource
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kosmos2.config import Kosmos2Config
from kosmos2.quantize import DTYPES

GB = 1e9
IMAGE_START, IMAGE_END, GROUNDING = 64003, 64004, 64012
WORDS = (1250, 3410, 111)  # three ordinary text ids standing in for "An image of"


# -- machine measurements -----------------------------------------------------------------------------------


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> dict[str, float]:
    """Read bandwidth (bytes/s) of `x.sum()` over an `nbytes` float32 tensor: best and median of `repeats`.

    Also the copy bandwidth (`y.copy_(x)`, read + write bytes counted) for reference.
    """
    x = torch.ones(nbytes // 4)
    y = torch.empty_like(x)
    sums, copies = [], []
    x.sum()
    y.copy_(x)  # first touch of y's pages is not a measurement
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        sums.append(time.perf_counter() - start)
        start = time.perf_counter()
        y.copy_(x)
        copies.append(time.perf_counter() - start)
    return {
        "read_best": nbytes / min(sums),
        "read_median": nbytes / statistics.median(sums),
        "copy_best": 2 * nbytes / min(copies),
        "copy_median": 2 * nbytes / statistics.median(copies),
    }


def probe_bandwidth(x: torch.Tensor, repeats: int = 3) -> float:
    """Read bandwidth (bytes/s) of `x.sum()` over the float32 tensor `x` (256-512 MiB): best of `repeats`
    after one untimed pass. Short (~0.1 s), for measuring right beside a run: this machine's bandwidth
    drifts by 2x within minutes (benchmarks/README.md), so a bound measured at another time says little."""
    return x.numel() * x.element_size() / best_seconds(x.sum, repeats)


def best_seconds(call, repeats: int) -> float:
    """The fastest of `repeats` timed calls, after one untimed warm-up call."""
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_rate(repeats: int = 10) -> dict[str, float]:
    """The best multiply-add rate (FLOP/s) of a prompt-sized product, 71 x 2048 -> 8192 (a decoder fc1 at
    prefill), with torch's current threads: float32 through oneDNN on the plain weight, bfloat16 on the
    oneDNN-packed weight (what our arms run). Prefill's compute floor = its FLOPs / this rate."""
    from kosmos2.quantize import packing_available

    x, w = torch.randn(71, 2048), torch.randn(8192, 2048)
    flops = 2 * 71 * 2048 * 8192
    calls = {"float32": lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")}
    if packing_available():
        xb, packed = x.bfloat16(), torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), 1)
        calls["bfloat16"] = lambda: torch.ops.mkldnn._linear_pointwise(xb, packed, None, "none", [], "")
    return {name: flops / best_seconds(call, repeats) for name, call in calls.items()}


def prefill_flops(config: Kosmos2Config, prompt_length: int) -> float:
    """Multiply-add FLOPs of a batch-1 prefill: every linear layer over the rows it sees (vision tokens,
    connector queries and keys, the prompt; the head for the last position only), the patch convolution,
    and the attention products (QK^T and AV; the decoder's over the prompt's causal half)."""
    from kosmos2.model import Kosmos2

    with torch.device("meta"):
        model = Kosmos2(config)
    v, t = config.vision, config.text
    tokens = v.num_positions  # 257 with the class token
    n = config.latent_query_num
    total = 0.0
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        if name.startswith("vision_model") or name == "image_to_text_projection.dense":
            rows = tokens
        elif name.startswith("image_to_text_projection.x_attn."):
            rows = tokens + n if name.endswith(("k_proj", "v_proj")) else n
        elif name == "text_model.lm_head":
            rows = 1
        else:
            rows = prompt_length
        total += 2 * rows * m.in_features * m.out_features
    total += 2 * v.num_patches * (v.num_channels * v.patch_size**2) * v.width  # patch embedding
    total += v.layers * 4 * tokens * tokens * v.width  # vision attention
    total += 4 * n * (tokens + n) * t.width  # connector attention
    total += t.layers * 2 * prompt_length * prompt_length * t.width  # causal decoder attention
    return total


def weight_bytes(config: Kosmos2Config, element_size: int = 4) -> dict[str, int]:
    """Bytes of the weights: all of them, and those one decoding step reads (decoder blocks, final LayerNorm
    and the tied embedding once, as the output head; the vision encoder and connector run at prefill only)."""
    from kosmos2.model import Kosmos2

    with torch.device("meta"):
        model = Kosmos2(config)
    params = dict(model.named_parameters())  # a tied tensor appears once
    total = sum(p.numel() for p in params.values())
    decoder = sum(p.numel() for n, p in params.items() if n.startswith("text_model."))
    return {"all": total * element_size, "per_token": decoder * element_size}


def kv_bytes_per_step(config: Kosmos2Config, batch: int, length: int, element_size: int = 4) -> int:
    """Keys and values one step reads from a cache of `length` slots (our static cache reads all of them)."""
    t = config.text
    return 2 * t.layers * batch * length * t.width * element_size


def _memory_status() -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of this process in bytes, from /proc (Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":")
                    out[key] = int(value.split()[0]) * 1024
    except OSError:  # not Linux: fall back to getrusage's peak (kilobytes on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["VmHWM"] = peak if sys.platform == "darwin" else peak * 1024
    return out


def wait_until_idle(max_wait_s: float, poll_s: float = 0.5, quiet_polls: int = 4) -> float:
    """Wait (at most `max_wait_s`) until no other process is running on the CPUs: /proc/stat's
    procs_running counts runnable threads, this one included, so 1 means idle. Needs `quiet_polls`
    consecutive idle polls. Returns the seconds waited (Linux only; elsewhere returns at once)."""
    start = time.monotonic()
    quiet = 0
    while time.monotonic() - start < max_wait_s:
        try:
            with open("/proc/stat") as f:
                running = next(int(line.split()[1]) for line in f if line.startswith("procs_running"))
        except (OSError, StopIteration):
            return 0.0
        quiet = quiet + 1 if running <= 1 else 0
        if quiet >= quiet_polls:
            break
        time.sleep(poll_s)
    return time.monotonic() - start


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux clear_refs 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- inputs -------------------------------------------------------------------------------------------------


def make_inputs(
    config: Kosmos2Config, batch: int, prompt_length: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """pixels [B,3,S,S] (seeded, one image per row), input_ids, attention_mask, image_mask [B,T].

    Every row carries the same prompt, so there is no padding (transformers' cached decoding mis-positions
    left-padded rows; SPEC §6). The prompt is `<s> <image> [N slots] </image> <grounding> words...`.
    """
    n = config.latent_query_num
    if prompt_length < n + 4:
        raise ValueError(
            f"--prompt-length must be at least {n + 4} (BOS, <image>, {n} slots, </image>, text)"
        )
    text = [GROUNDING, *WORDS][: prompt_length - (n + 3)]
    text += range(200, 200 + prompt_length - (n + 3) - len(text))  # longer prompts: more ordinary ids
    ids = [0, IMAGE_START, *range(4, 4 + n), IMAGE_END, *text]
    mask = [False, False, *([True] * n), False, *([False] * len(text))]
    g = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    input_ids = torch.tensor([ids] * batch)
    return pixels, input_ids, torch.ones_like(input_ids), torch.tensor([mask] * batch)


# -- the two workers ----------------------------------------------------------------------------------------


class _Ours:
    """kosmos2: load_pretrained + prepare_model (the dtype), encode_images, stream (the predictor's path)."""

    def __init__(self, checkpoint: Path, options: dict):
        from kosmos2.checkpoint import load_pretrained
        from kosmos2.quantize import bytes_read_per_token, prepare_model

        dtype = options["dtype"]
        self.name = f"kosmos2 {dtype}"
        # as Predictor.from_pretrained(dtype=...): bfloat16 converted on load; int8 quantised from float32
        load_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        self.model = prepare_model(load_pretrained(checkpoint, dtype=load_dtype), dtype)
        self.config = self.model.config
        self.bytes_per_token = bytes_read_per_token(self.model)

    def generate(self, pixels, input_ids, attention_mask, image_mask, new_tokens: int):
        from kosmos2.generate import GenerationConfig, encode_images, stream

        cfg = GenerationConfig(max_new_tokens=new_tokens, no_repeat_ngram_size=3, eos_token_id=None)
        times, tokens = [], []
        start = time.perf_counter()
        embeds = encode_images(self.model, pixels)
        for step_tokens, _finished in stream(self.model, input_ids, attention_mask, embeds, image_mask, cfg):
            times.append(time.perf_counter() - start)
            tokens.append(step_tokens.tolist())
        return times, tokens


class _Transformers:
    """transformers: from_pretrained, generate with a streamer that timestamps every new token."""

    def __init__(self, checkpoint: Path, options: dict):
        from transformers import Kosmos2ForConditionalGeneration
        from transformers.utils import logging

        logging.disable_progress_bar()
        self.attn = options["hf_attn"]
        dtype = options["dtype"]
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"transformers arm: dtype {dtype!r}; use float32 or bfloat16")
        self.name = f"transformers ({self.attn}) {dtype}"
        self.model = Kosmos2ForConditionalGeneration.from_pretrained(
            checkpoint, attn_implementation=self.attn, dtype=getattr(torch, dtype)
        ).eval()
        text = self.model.text_model
        params = {id(p): p for p in text.parameters()}  # the tied head counted once, as on our side
        self.bytes_per_token = sum(p.numel() * p.element_size() for p in params.values())
        self.model.generation_config.eos_token_id = None  # no early stop, as on our side

    def generate(self, pixels, input_ids, attention_mask, image_mask, new_tokens: int):
        from transformers.generation.streamers import BaseStreamer

        class Timer(BaseStreamer):
            def __init__(self):
                self.prompt_seen, self.times, self.tokens = False, [], []

            def put(self, value):
                if not self.prompt_seen:  # generate first puts the prompt
                    self.prompt_seen = True
                    return
                self.times.append(time.perf_counter() - start)
                self.tokens.append(value.reshape(-1).tolist())

            def end(self):
                pass

        timer = Timer()
        start = time.perf_counter()
        with torch.no_grad():
            self.model.generate(
                pixel_values=pixels.to(self.model.dtype),
                input_ids=input_ids,
                attention_mask=attention_mask,
                image_embeds_position_mask=image_mask.long(),
                max_new_tokens=new_tokens,
                do_sample=False,
                num_beams=1,
                no_repeat_ngram_size=3,
                streamer=timer,
            )
        return timer.times, timer.tokens


SIDES = {"ours": _Ours, "transformers": _Transformers}


def _worker(conn, side: str, checkpoint: str, threads: int, options: dict) -> None:
    """One implementation in its own process: load, warm up, then answer ("generate", B, N) requests."""
    try:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        impl = SIDES[side](Path(checkpoint), options)
        load_s = time.perf_counter() - start
        config = Kosmos2Config.from_json_file(Path(checkpoint) / "config.json")
        # warm-up: touches every weight page and builds the kernels' plans; not measured
        impl.generate(*make_inputs(config, 1, options["prompt_length"], seed=99), new_tokens=2)
        memory = _memory_status()
        reset = _reset_peak_rss()
        conn.send(
            {
                "name": impl.name,
                "bytes_per_token": impl.bytes_per_token,
                "load_s": load_s,
                "rss_after_load": memory.get("VmRSS"),
                "peak_until_now": memory.get("VmHWM"),
                "peak_reset": reset,
            }
        )
        while True:
            request = conn.recv()
            if request[0] == "stop":
                conn.send(_memory_status())
                return
            _, batch, new_tokens, seed = request
            inputs = make_inputs(config, batch, options["prompt_length"], seed=seed)
            times, tokens = impl.generate(*inputs, new_tokens=new_tokens)
            conn.send({"times": times, "tokens": tokens})
    except BaseException:
        conn.send({"error": traceback.format_exc()})


class Worker:
    """Parent-side handle of a worker process."""

    def __init__(self, side: str, checkpoint: Path, threads: int, options: dict):
        ctx = mp.get_context("spawn")
        self.side = side
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker, args=(child, side, str(checkpoint), threads, options), daemon=True
        )
        self.process.start()
        self.info = self._receive()

    def _receive(self) -> dict:
        message = self.conn.recv()
        if "error" in message:
            raise RuntimeError(f"{self.side} worker failed:\n{message['error']}")
        return message

    def generate(self, batch: int, new_tokens: int, seed: int) -> dict:
        self.conn.send(("generate", batch, new_tokens, seed))
        return self._receive()

    def stop(self) -> dict:
        self.conn.send(("stop",))
        final = self._receive()
        self.process.join(timeout=60)
        return final


# -- the run ------------------------------------------------------------------------------------------------


@dataclass
class SideResult:
    name: str = ""
    load_s: float = 0.0
    prefill_s: list[float] = field(default_factory=list)  # batch 1: call -> first new token
    prefill_b8_s: list[float] = field(default_factory=list)
    decode: dict[int, list[float]] = field(default_factory=dict)  # batch -> tokens/s per repeat
    step_s: dict[int, list[float]] = field(default_factory=dict)  # batch -> every decode step's seconds
    tokens: dict[int, list] = field(default_factory=dict)  # batch -> tokens of the first repeat [steps][B]
    rss_after_load: int | None = None
    peak_rss: int | None = None  # whole process, load included
    peak_rss_generation: int | None = None  # after load and warm-up (None if the reset is not allowed)
    bytes_per_token: int = 0  # weights one batch-1 decoding step reads, as this arm stores them
    bandwidth_beside: list[float] = field(default_factory=list)  # batch 1: max(read bw before, after) a run


def build_checkpoint(config: Kosmos2Config, directory: Path, seed: int) -> float:
    """Seeded random weights for `config`, saved as a HF-layout checkpoint; returns seconds taken.

    Matrices ~ N(0, 0.02^2) (the usual initialisation: deep random networks with much larger weights are
    chaotic, and float32 rounding differences between two implementations grow into different outputs),
    except the token embedding ~ N(0, 0.3^2): as the tied output head it makes the logits peaked (std ~14),
    so rounding cannot flip a greedy choice and the benchmark can check that both sides generate the same
    tokens. LayerNorm weights ~ 1 + N(0, 0.1^2), vectors ~ N(0, 0.1^2).
    """
    from torch import nn

    from kosmos2.checkpoint import save_pretrained
    from kosmos2.model import Kosmos2

    start = time.perf_counter()
    with torch.device("meta"):
        model = Kosmos2(config)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    g = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm)}
    embedding = model.text_model.model.embed_tokens.weight
    with torch.no_grad():
        for p in model.parameters():
            if id(p) in norms:
                p.normal_(1.0, 0.1, generator=g)
            elif p is embedding:
                p.normal_(0.0, 0.3, generator=g)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.normal_(0.0, 0.1, generator=g)
    save_pretrained(model.eval(), directory)
    del model
    gc.collect()
    return time.perf_counter() - start


DEFAULT_ARMS = (
    "ours:float32,ours:bfloat16,ours:int8,ours:int8-dynamic,transformers:float32,transformers:bfloat16"
)
OUR_DTYPES = DTYPES  # kosmos2.quantize's: every dtype `prepare_model` takes


def parse_arms(text: str) -> list[tuple[str, str]]:
    """ "ours:float32,transformers:bfloat16" -> [("ours", "float32"), ("transformers", "bfloat16")]."""
    arms = []
    for item in text.split(","):
        side, _, dtype = item.strip().partition(":")
        dtype = dtype or "float32"
        if side not in SIDES or dtype not in OUR_DTYPES or (side, dtype) in arms:
            raise ValueError(
                f"--arms: {item!r} is not SIDE:DTYPE with SIDE ours|transformers and DTYPE "
                "float32|bfloat16|int8|int8-dynamic (int8*: ours only), each once"
            )
        if side == "transformers" and dtype.startswith("int8"):
            raise ValueError("--arms: transformers:int8 is not an arm (transformers' int8 needs torchao)")
        arms.append((side, dtype))
    return arms


def _arm_key(side: str, dtype: str) -> str:
    return f"{side}:{dtype}"


def run(args: argparse.Namespace) -> dict:
    config = Kosmos2Config.from_preset(args.preset)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    new_tokens = args.new_tokens or (8 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 3)
    repeats_b8 = args.repeats_b8 or (1 if args.quick else 2)
    arms = parse_arms(args.arms)
    load_start = os.getloadavg()[0]

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log(f"read bandwidth: sum() over 1 GiB float32, {threads} threads, 10 repeats ...")
    if args.wait_idle:
        wait_until_idle(args.wait_idle)
    bandwidth = read_bandwidth()
    sizes = weight_bytes(config)
    result: dict = {
        "preset": args.preset,
        "threads": threads,
        "new_tokens": new_tokens,
        "prompt_length": args.prompt_length,
        "repeats": repeats,
        "repeats_b8": repeats_b8,
        "hf_attn": args.hf_attn,
        "arms": [_arm_key(*arm) for arm in arms],
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {_cpu_name()}, {os.cpu_count()} cores",
        "weights_all_bytes": sizes["all"],
        "weights_per_token_bytes": sizes["per_token"],
        "kv_bytes_per_step_b1": kv_bytes_per_step(config, 1, args.prompt_length + new_tokens),
        "bandwidth": bandwidth,
        "gemm_rate": gemm_rate(),
        "prefill_flops": prefill_flops(config, args.prompt_length),
    }
    sides = {_arm_key(*arm): SideResult() for arm in arms}
    probe = torch.ones((256 << 20) // 4)  # the parent reads it right before and after each batch-1 run
    # float32 arms run together, then the others: at most ~3 models in memory at once (full size: 6.7 GB
    # mapped float32 shared by both float32 arms; then 3.3 + 3.3 + 2.3 GB)
    phases = [[a for a in arms if a[1] == "float32"], [a for a in arms if a[1] != "float32"]]
    with tempfile.TemporaryDirectory(prefix="kosmos2-bench-", dir=args.workdir) as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        log(f"building {args.preset} with random weights ({sizes['all'] / GB:.2f} GB float32) ...")
        result["build_s"] = build_checkpoint(config, checkpoint, args.seed)
        log(f"  built and saved in {result['build_s']:.1f} s")
        for phase in (p for p in phases if p):
            _run_phase(phase, checkpoint, threads, args, new_tokens, repeats, repeats_b8, sides, log, probe)
    result["loadavg"] = [load_start, os.getloadavg()[0]]
    if args.wait_idle:
        wait_until_idle(args.wait_idle)
    result["bandwidth_end"] = read_bandwidth()
    best_read = max(result["bandwidth"]["read_best"], result["bandwidth_end"]["read_best"])
    result["read_bandwidth"] = best_read
    result["bound_b1"] = best_read / sizes["per_token"]
    result["sides"] = {k: v.__dict__ for k, v in sides.items()}
    reference = "ours:float32" if "ours:float32" in sides else next(iter(sides))
    result["same_tokens"] = {
        key: {b: _agreement(sides[reference].tokens.get(b), s.tokens.get(b)) for b in (1, 8)}
        for key, s in sides.items()
    }
    result["same_tokens_reference"] = reference
    return result


def _run_phase(phase, checkpoint, threads, args, new_tokens, repeats, repeats_b8, sides, log, probe) -> None:
    """Start one worker per arm of `phase`, run every measurement on each in rotating order, stop them.

    Around each batch-1 run the parent (idle while a worker runs) measures the read bandwidth with `probe`;
    the higher of the two is that run's bandwidth, for the share of the bound beside it."""
    workers = {}
    try:
        for side, dtype in phase:
            key = _arm_key(side, dtype)
            options = {"hf_attn": args.hf_attn, "prompt_length": args.prompt_length, "dtype": dtype}
            workers[key] = Worker(side, checkpoint, threads, options)
            info, s = workers[key].info, sides[key]
            s.name, s.load_s, s.rss_after_load = info["name"], info["load_s"], info["rss_after_load"]
            s.peak_rss, s.bytes_per_token = info["peak_until_now"], info["bytes_per_token"]
            log(f"  {s.name}: loaded in {s.load_s:.1f} s, RSS {s.rss_after_load / GB:.2f} GB")
        order = list(workers)
        plan = [(1, r) for r in range(repeats)] + [(8, r) for r in range(repeats_b8)]
        for i, (batch, r) in enumerate(plan):
            shift = i % len(order)  # rotate who goes first, so a burst of load hits every arm alike
            for key in order[shift:] + order[:shift]:
                if args.wait_idle:
                    waited = wait_until_idle(args.wait_idle)
                    log(f"  waited {waited:.0f} s for idle CPUs (load {os.getloadavg()[0]:.1f})")
                before = probe_bandwidth(probe) if batch == 1 else None
                out = workers[key].generate(batch, new_tokens, seed=r)
                if before is not None:
                    sides[key].bandwidth_beside.append(max(before, probe_bandwidth(probe)))
                times, s = out["times"], sides[key]
                if len(times) != new_tokens:
                    raise RuntimeError(f"{s.name} generated {len(times)} tokens, expected {new_tokens}")
                (s.prefill_s if batch == 1 else s.prefill_b8_s).append(times[0])
                rate = batch * (new_tokens - 1) / (times[-1] - times[0]) if new_tokens > 1 else 0.0
                s.decode.setdefault(batch, []).append(rate)
                s.step_s.setdefault(batch, []).extend(
                    b - a for a, b in zip(times[:-1], times[1:], strict=True)
                )
                s.tokens.setdefault(batch, out["tokens"])
                log(f"  batch {batch} run {r + 1}: {s.name}: first token {times[0]:.2f} s, {rate:.2f} tok/s")
        for key, worker in workers.items():
            final = worker.stop()
            s = sides[key]
            if worker.info["peak_reset"]:
                s.peak_rss_generation = final.get("VmHWM")
                s.peak_rss = max(s.peak_rss or 0, s.peak_rss_generation or 0)
            else:
                s.peak_rss = final.get("VmHWM", s.peak_rss)
    finally:
        for worker in workers.values():
            if worker.process.is_alive():
                worker.process.kill()


def _agreement(a: list | None, b: list | None) -> str:
    if a is None or b is None:
        return "not run"
    if a == b:
        return "identical"
    first = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    return f"differ from new token {first + 1}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# -- report -------------------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(r: dict) -> str:
    """One Markdown row per arm (medians over repeats), the issue's targets, and lines explaining them."""
    bw = r["read_bandwidth"]
    arms = r["sides"]

    def med(key: str, field_: str, batch: int | None = None) -> float:
        s = arms.get(key)
        if s is None:
            return float("nan")
        values = s[field_] if batch is None else s[field_].get(batch, s[field_].get(str(batch), []))
        return _median(values)

    def gb(x: int | None) -> str:
        return f"{x / GB:.2f}" if x else "n/a"

    def beside(key: str) -> str:
        """Median over batch-1 runs of (that run's tokens/s) / (bandwidth measured beside it / bytes)."""
        s = arms.get(key)
        if s is None:
            return "n/a"
        rates = s["decode"].get(1, s["decode"].get("1", []))
        runs = list(zip(rates, s.get("bandwidth_beside", []), strict=False))
        if not runs or not s["bytes_per_token"]:
            return "n/a"
        return f"{100 * _median([rate * s['bytes_per_token'] / b for rate, b in runs]):.0f} %"

    lines = [
        f"| {r['preset']}, {r['threads']} threads | prefill b1 (s) | prefill b8 (s) | decode b1 (tok/s) "
        "| bound b1 (tok/s) | share of bound | share beside | decode b8 (tok/s) | b8 / b1 "
        "| GB read per token | peak RSS gen. (GB) | load (s) | tokens vs "
        + r["same_tokens_reference"]
        + " (b1; b8) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, s in arms.items():
        d1, d8 = med(key, "decode", 1), med(key, "decode", 8)
        bound = bw / s["bytes_per_token"] if s["bytes_per_token"] else float("nan")
        same = r["same_tokens"][key]
        lines.append(
            f"| {s['name']} | {med(key, 'prefill_s'):.2f} | {med(key, 'prefill_b8_s'):.2f} | {d1:.2f} | "
            f"{bound:.2f} | {100 * d1 / bound:.0f} % | {beside(key)} | {d8:.2f} | {d8 / d1:.2f} | "
            f"{s['bytes_per_token'] / GB:.2f} | {gb(s['peak_rss_generation'])} | {s['load_s']:.1f} | "
            f"{same.get(1, same.get('1'))}; {same.get(8, same.get('8'))} |"
        )

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}" if a == a and b == b and b else "n/a"

    def share(key: str) -> str:
        s = arms.get(key)
        return f"{100 * med(key, 'decode', 1) * s['bytes_per_token'] / bw:.0f} %" if s else "n/a"

    d1 = {k: med(k, "decode", 1) for k in arms}
    targets = [
        ("batch-1 decode, share of the bound: fp32 / bf16 / int8 / int8-dynamic",
         f"{share('ours:float32')} / {share('ours:bfloat16')} / {share('ours:int8')} / "
         f"{share('ours:int8-dynamic')}", "each ≥ 85 %"),
        ("the same, against the bandwidth measured beside each run",
         " / ".join(beside(k) for k in ("ours:float32", "ours:bfloat16", "ours:int8", "ours:int8-dynamic")),
         "each ≥ 85 %"),
        ("batch-1 decode, bf16 / our fp32", ratio(d1.get("ours:bfloat16", nan), d1.get("ours:float32", nan)),
         "≥ 1.7"),
        ("batch-1 decode, int8 / our fp32", ratio(d1.get("ours:int8", nan), d1.get("ours:float32", nan)),
         "≥ 3"),
        ("batch-1 decode, int8 / transformers bf16",
         ratio(d1.get("ours:int8", nan), d1.get("transformers:bfloat16", nan)), "≥ 2"),
        ("batch-1 decode, int8-dynamic / our fp32",
         ratio(d1.get("ours:int8-dynamic", nan), d1.get("ours:float32", nan)), "≥ 3"),
        ("batch-1 decode, int8-dynamic / transformers bf16",
         ratio(d1.get("ours:int8-dynamic", nan), d1.get("transformers:bfloat16", nan)), "≥ 2"),
        ("prefill b1, our bf16 / transformers bf16",
         ratio(med("ours:bfloat16", "prefill_s"), med("transformers:bfloat16", "prefill_s")), "≤ 0.5"),
        ("bf16 decode, batch 8 / batch 1",
         ratio(med("ours:bfloat16", "decode", 8), d1.get("ours:bfloat16", nan)), "≥ 6"),
        ("fp32 prefill b1, ours / transformers",
         ratio(med("ours:float32", "prefill_s"), med("transformers:float32", "prefill_s")), "≤ 0.70"),
        ("fp32 decode batch 8, ours / transformers",
         ratio(med("ours:float32", "decode", 8), med("transformers:float32", "decode", 8)), "≥ 1.5"),
    ]  # fmt: skip
    lines += ["", "| target | measured | goal |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {goal} |" for name, value, goal in targets]
    band = r["bandwidth"]
    floors = {k: r["prefill_flops"] / rate for k, rate in r["gemm_rate"].items()}
    lines += [
        "",
        f"- Prefill compute floor (batch 1): {r['prefill_flops'] / 1e9:.0f} GFLOP / the best rate of a "
        "71 x 2048 -> 8192 product ("
        + ", ".join(
            f"{k} {rate / 1e9:.0f} GFLOP/s: {floors[k]:.2f} s, ours at "
            f"{floors[k] / med('ours:' + k, 'prefill_s') if 'ours:' + k in arms else nan:.0%} of it"
            for k, rate in r["gemm_rate"].items()
        )
        + ").",
    ]
    lines += [
        "",
        f"- {r['machine']}; torch {r['torch']}; load average {r['loadavg'][0]:.1f} at start, "
        f"{r['loadavg'][1]:.1f} at end.",
        f"- Read bandwidth (sum of 1 GiB): best {bw / GB:.1f} GB/s "
        f"(start: best {band['read_best'] / GB:.1f}, median {band['read_median'] / GB:.1f}; "
        f"copy best {band['copy_best'] / GB:.1f} GB/s read+write).",
        "- Each arm's bound = bandwidth / the bytes of weights its batch-1 step reads as it stores them "
        "(decoder blocks, final LayerNorm and the output head once; float32: "
        f"{r['weights_per_token_bytes'] / GB:.2f} GB); the KV cache is not counted "
        f"({r['kv_bytes_per_step_b1'] / 1e6:.0f} MB a step in float32 at batch 1).",
        f"- Prompt {r['prompt_length']} tokens (image + text), {r['new_tokens']} new tokens, greedy, "
        f"no-repeat-ngram 3, no early stop; medians of {r['repeats']} repeats at batch 1 and "
        f"{r['repeats_b8']} at batch 8. Float32 arms ran together, then the others (rotating order).",
        "- From the median step instead of the mean (less sensitive to bursts of load): "
        + "; ".join(
            f"{s['name']}: b1 {1 / _median(s['step_s'].get(1, s['step_s'].get('1', []))):.2f}, "
            f"b8 {8 / _median(s['step_s'].get(8, s['step_s'].get('8', []))):.2f} tok/s"
            for s in arms.values()
        )
        + ".",
    ]
    return "\n".join(lines)


nan = float("nan")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--preset", default="kosmos-2-patch14-224", help="model size (default: the released one)"
    )
    parser.add_argument("--quick", action="store_true", help="8 new tokens, one repeat per batch size")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per run (default 32)")
    parser.add_argument("--repeats", type=int, default=None, help="batch-1 runs per side (default 3)")
    parser.add_argument("--repeats-b8", type=int, default=None, help="batch-8 runs per side (default 2)")
    parser.add_argument(
        "--prompt-length", type=int, default=71, help="prompt tokens including the image slots"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads for both sides (default: all)"
    )
    parser.add_argument("--hf-attn", choices=["sdpa", "eager"], default="sdpa", help="transformers attention")
    parser.add_argument(
        "--arms",
        default=DEFAULT_ARMS,
        help="SIDE:DTYPE pairs to run, comma-separated (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--workdir", default=None, help="where the temporary checkpoint goes (default: $TMPDIR)"
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="on a shared machine: before each run wait up to SECONDS until no other process is running",
    )
    parser.add_argument("--json", default=None, help="also write all measurements to this JSON file")
    args = parser.parse_args(argv)
    if args.new_tokens is not None and args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode speed is measured between new tokens)")
    # a plain `kill` ends the run through the cleanup below (workers stopped, temporary checkpoint removed)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    result = run(args)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
