"""Generation for Kosmos-2 over the static KV cache: small functions, one generator at the top.

    prefill(...)            image + prompt through the decoder once; fills the cache; last-token logits
    decode_one_token(...)   one new token per row through the cache
    stream(...)             generator of new tokens per step (greedy or sampling): the CLI and server share it
    generate(...)           whole continuations: greedy, sampling or beam search
    encode_images(...)      the model's image encoder with the fast linear layers (the prefill's first half)

Settings follow the official evaluation (SPEC §8): greedy decoding with no-repeat-ngram 3 applied over the
whole sequence, prompt included (image slot ids too), stopping at `</s>`. The n-gram bans of a row only see
that row's real tokens, never left padding, so a batched row generates exactly what it would alone.

Speed (benchmarks/generate.py): the model calls here run their float32 linear layers on the CPU through
oneDNN's matmul instead of PyTorch's default BLAS call (`onednn_linear`): the same float32 arithmetic, ~1.8x
faster for one decoding row and ~2x for eight on the 2-core AMD CPU we measured, with both cores free.
Everything else is plain eager PyTorch over the model's static KV cache (torch.compile gained nothing
measurable on the decode step). bfloat16 and int8 models bring their own linear layers (`kosmos2.quantize`:
oneDNN-packed bf16 weights, int8 weight-only kernels) and skip the float32 routing.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from kosmos2.model import Kosmos2, make_positions


@dataclass
class GenerationConfig:
    """Decoding options, named as transformers users know them."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    num_beams: int = 1
    length_penalty: float = 1.0  # beam score = sum log p / (generated length ** length_penalty)
    no_repeat_ngram_size: int = 3  # 0 = off
    eos_token_id: int | None = 2  # None = never stop early: exactly max_new_tokens tokens (benchmarks)
    pad_token_id: int = 1
    seed: int | None = None  # sampling: a fixed seed makes a run repeatable

    def validate(self) -> GenerationConfig:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam search with sampling is not supported: set do_sample=False or num_beams=1")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.no_repeat_ngram_size < 0:
            raise ValueError("top_k and no_repeat_ngram_size must be >= 0")
        return self

    @classmethod
    def from_kwargs(cls, base: GenerationConfig | None = None, **kwargs) -> GenerationConfig:
        """Override `base` (default: the official settings) with keyword options; unknown names raise."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown generation option(s) {unknown}; known: {sorted(known)}")
        given = {k: v for k, v in kwargs.items() if v is not None}
        return replace(base or cls(), **given).validate()


# -- float32 linear layers through oneDNN ----------------------------------------------------------------


def _find_onednn_linear():
    """oneDNN's fused linear (x @ W^T + b on the plain row-major W: no repacking, no copy) where this torch
    build has it, on x86-64 (the CPUs it was measured on); None elsewhere."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _find_onednn_linear()


class _OneDNNLinearMode(TorchFunctionMode):
    """Sends `F.linear` (every `nn.Linear`, and the tied output head) on float32 CPU tensors with autograd off
    to oneDNN's matmul; every other call runs unchanged.

    Why (benchmarks/README.md has the numbers): PyTorch's CPU `F.linear` calls MKL, which on the AMD EPYC we
    measured takes a generic code path. Its one-row product (batch-1 decoding) streams ~19 GB/s of weights on
    one thread and does not speed up with a second; oneDNN's threaded kernel streamed 32 GB/s on two, the
    machine's read bandwidth. With 8 rows (batch-8 decoding) MKL reached 6-12 GB/s of weights and oneDNN's
    AVX-512 brgemm 20-29; with 71-257 rows (prompt, vision encoder) oneDNN is about twice as fast. oneDNN
    takes the row-major weight as it is (no repacking, no copy). Both compute in float32; results differ by
    summation order only (~1e-6 relative). Every product is split across the threads, so on cores that other
    processes keep busy each one waits for a parked thread: give generation the idle cores
    (`torch.set_num_threads`).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and not torch.is_grad_enabled() and torch.backends.mkldnn.enabled:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (
                x.device.type == "cpu"
                and x.dtype == weight.dtype == torch.float32
                and weight.dim() == 2
                and (bias is None or bias.dtype == torch.float32)
            ):
                return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
        return func(*args, **kwargs)


@contextmanager
def onednn_linear(enabled: bool = True) -> Iterator[None]:
    """Inside this block, float32 CPU linear layers run through oneDNN (see `_OneDNNLinearMode`).

    A no-op when `enabled` is False, when torch was built without oneDNN, or for tensors it does not cover
    (other dtypes, other devices, autograd on). The mode is thread-local.
    """
    if not enabled or _ONEDNN_LINEAR is None:
        yield
        return
    with _OneDNNLinearMode():
        yield


def _float32(model: Kosmos2) -> bool:
    """Whether the model computes in float32, the only dtype `onednn_linear` reroutes: bfloat16 and int8
    models (`kosmos2.quantize`) run their own kernels, and the mode's per-call dispatch would only cost."""
    return model.text_model.model.embed_tokens.weight.dtype == torch.float32


def _float32_text(model: Kosmos2) -> bool:
    """Whether the decoder's linear layers are float32 `nn.Linear`s (float32 models), which `onednn_linear`
    reroutes. int8-dynamic models compute in float32 too, but their decoder layers are int8 modules: the
    mode would only add its Python dispatch to every operator of the step (~10 % of an int8-dynamic decoding
    step at full size, benchmarks/decode_step.py)."""
    head = model.text_model.lm_head
    return type(head) is torch.nn.Linear and head.weight.dtype == torch.float32


def text_kernels(model: Kosmos2):
    """The kernels of a decoder call: float32 linear layers through oneDNN (`onednn_linear`) where the
    decoder has them; a context manager. (Attention's kernel for a decoding step over a bfloat16 cache is
    chosen in the model: `DecoderAttention._attend`.)"""
    return onednn_linear(_float32_text(model))


@torch.no_grad()
def encode_images(model: Kosmos2, pixel_values: Tensor) -> Tensor:
    """`model.encode_image` ([B,3,H,W] -> [B, 64, C]) with the linear layers of `onednn_linear`."""
    with onednn_linear(_float32(model)):
        return model.encode_image(pixel_values)


# -- the two model calls ------------------------------------------------------------------------------------


@torch.no_grad()
def prefill(
    model: Kosmos2,
    input_ids: Tensor,
    attention_mask: Tensor,
    image_embeds: Tensor | None,
    image_mask: Tensor | None,
    max_len: int,
) -> tuple[Tensor, Tensor]:
    """Set up a cache of `max_len` slots and run the prompt [B,T] through it.

    Returns the last token's logits [B,V] and positions [B,1] of the last prompt token of each row.
    """
    B, T = input_ids.shape
    model.setup_cache(B, max_len)
    # pad tokens are exactly the attention_mask zeros here: positions from the ids equal those from the mask
    positions = make_positions(input_ids.masked_fill(attention_mask == 0, model.config.text.pad_token_id))
    positions = positions.masked_fill(attention_mask == 0, 1)
    with text_kernels(model):
        logits = model.forward_cached(
            input_ids,
            torch.arange(T, device=input_ids.device),
            positions,
            attention_mask,
            image_embeds,
            image_mask,
            last_only=True,
        )
    return logits[:, -1].float(), positions[:, -1:]


@torch.no_grad()
def decode_one_token(model: Kosmos2, token: Tensor, slot: int, positions: Tensor) -> Tensor:
    """token [B,1] at cache slot `slot` with positions [B,1] -> next-token logits [B,V]."""
    input_pos = torch.tensor([slot], device=token.device)
    with text_kernels(model):
        return model.forward_cached(token, input_pos, positions)[:, -1].float()


# -- logits processing --------------------------------------------------------------------------------------


class NGramBlocker:
    """No-repeat-ngram of size n per row, updated one token at a time (O(1) per step and row).

    A row's history is its real tokens (prompt without padding, then generated). The tokens banned next are
    those that followed the row's last n-1 tokens anywhere in its history.
    """

    def __init__(self, histories: list[list[int]], n: int):
        self.n = n
        self.histories = [list(h) for h in histories]
        self.seen: list[dict[tuple[int, ...], set[int]]] = []
        for h in self.histories:
            table: dict[tuple[int, ...], set[int]] = {}
            for i in range(len(h) - n + 1):
                table.setdefault(tuple(h[i : i + n - 1]), set()).add(h[i + n - 1])
            self.seen.append(table)

    def append(self, tokens: list[int]) -> None:
        n = self.n
        for h, table, t in zip(self.histories, self.seen, tokens, strict=True):
            h.append(t)
            if len(h) >= n:
                table.setdefault(tuple(h[len(h) - n : len(h) - 1]), set()).add(t)

    def reorder(self, index: list[int]) -> None:
        """Beam search: row b becomes a copy of old row index[b]."""
        self.histories = [list(self.histories[i]) for i in index]
        self.seen = [{k: set(v) for k, v in self.seen[i].items()} for i in index]

    def ban(self, logits: Tensor) -> Tensor:
        """Set banned tokens to -inf in logits [B,V] (in place) and return them."""
        n = self.n
        for b, (h, table) in enumerate(zip(self.histories, self.seen, strict=True)):
            if len(h) < n - 1:
                continue
            banned = table.get(tuple(h[len(h) - n + 1 :]) if n > 1 else ())
            if banned:
                logits[b, list(banned)] = -math.inf
        return logits


def sample_logits(logits: Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> Tensor:
    """Next tokens [B] from logits [B,V]: argmax, or temperature -> top-k -> top-p -> multinomial."""
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first is always kept)
        drop = (probs.cumsum(dim=-1) - probs) >= cfg.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _real_histories(input_ids: Tensor, attention_mask: Tensor) -> list[list[int]]:
    return [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask, strict=True)]


def _generator(cfg: GenerationConfig, device) -> torch.Generator | None:
    if not cfg.do_sample or cfg.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(cfg.seed)
    return g


# -- greedy / sampling: a generator of tokens ----------------------------------------------------------------


@torch.no_grad()
def stream(
    model: Kosmos2,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    image_embeds: Tensor | None = None,
    image_mask: Tensor | None = None,
    config: GenerationConfig | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (tokens [B], finished [B] bool) once per step, greedy or sampling.

    A row's `</s>` is yielded with finished=True; after that the row yields pad tokens. Stops when every row
    has finished or after `max_new_tokens` steps.
    """
    cfg = (config or GenerationConfig()).validate()
    if cfg.num_beams > 1:
        raise ValueError("stream() does greedy decoding or sampling; use generate() for beam search")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    B, T = input_ids.shape
    logits, positions = prefill(
        model, input_ids, attention_mask, image_embeds, image_mask, T + cfg.max_new_tokens
    )
    blocker = (
        NGramBlocker(_real_histories(input_ids, attention_mask), cfg.no_repeat_ngram_size)
        if cfg.no_repeat_ngram_size > 0
        else None
    )
    generator = _generator(cfg, input_ids.device)
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(cfg.max_new_tokens):
        if blocker is not None:
            blocker.ban(logits)
        tokens = sample_logits(logits, cfg, generator)
        tokens = tokens.masked_fill(finished, cfg.pad_token_id)
        if cfg.eos_token_id is not None:
            finished = finished | (tokens == cfg.eos_token_id)
        yield tokens, finished
        if bool(finished.all()) or step == cfg.max_new_tokens - 1:
            break
        if blocker is not None:
            blocker.append(tokens.tolist())
        positions = positions + 1
        logits = decode_one_token(model, tokens.unsqueeze(1), T + step, positions)
    model.clear_cache()


def _strip(tokens: list[int], cfg: GenerationConfig) -> list[int]:
    """Cut a generated row at its first `</s>` (excluded)."""
    eos = cfg.eos_token_id
    return tokens[: tokens.index(eos)] if eos is not None and eos in tokens else tokens


@torch.no_grad()
def generate(
    model: Kosmos2,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    image_embeds: Tensor | None = None,
    image_mask: Tensor | None = None,
    config: GenerationConfig | None = None,
) -> list[list[int]]:
    """Generated token ids per row (without the prompt and without `</s>`)."""
    cfg = (config or GenerationConfig()).validate()
    if cfg.num_beams > 1:
        return beam_search(model, input_ids, attention_mask, image_embeds, image_mask, cfg)
    rows: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    done = [False] * input_ids.shape[0]
    for tokens, finished in stream(model, input_ids, attention_mask, image_embeds, image_mask, cfg):
        for b, t in enumerate(tokens.tolist()):
            if not done[b]:
                rows[b].append(t)
        done = finished.tolist()
    return [_strip(r, cfg) for r in rows]


# -- beam search ---------------------------------------------------------------------------------------------


@torch.no_grad()
def beam_search(
    model: Kosmos2,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    image_embeds: Tensor | None,
    image_mask: Tensor | None,
    cfg: GenerationConfig,
) -> list[list[int]]:
    """Beam search over the cache: each row keeps `num_beams` hypotheses; the best finished one wins.

    Scores are summed log-probabilities; a finished hypothesis (ended by `</s>`, or by the token budget) is
    ranked by score / length**length_penalty. A row stops once it holds `num_beams` finished hypotheses and no
    running beam can beat the worst of them.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    B, T = input_ids.shape
    K = cfg.num_beams
    device = input_ids.device
    logits, positions = prefill(
        model, input_ids, attention_mask, image_embeds, image_mask, T + cfg.max_new_tokens
    )
    # expand every row to K beams: cache rows, positions and n-gram histories
    expand = torch.arange(B, device=device).repeat_interleave(K)
    model.reorder_cache(expand)
    positions = positions.index_select(0, expand)  # [B*K,1]
    logits = logits.index_select(0, expand)  # [B*K,V]
    histories = _real_histories(input_ids, attention_mask)
    blocker = (
        NGramBlocker([histories[i] for i in expand.tolist()], cfg.no_repeat_ngram_size)
        if cfg.no_repeat_ngram_size > 0
        else None
    )
    V = logits.shape[-1]
    # only the first beam of each row is live at the start, so the K beams do not all pick the same token
    scores = torch.full((B, K), -math.inf, device=device)
    scores[:, 0] = 0.0
    beams: list[list[int]] = [[] for _ in range(B * K)]  # generated tokens per beam row
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    row_done = [False] * B

    def rank(score: float, length: int) -> float:
        return score / (max(length, 1) ** cfg.length_penalty)

    for step in range(cfg.max_new_tokens):
        # ban after the softmax, as transformers does: banned tokens keep their share of the normalisation
        logp = torch.log_softmax(logits, dim=-1)
        if blocker is not None:
            blocker.ban(logp)
        logp = logp.view(B, K, V)
        total = (scores.unsqueeze(-1) + logp).view(B, K * V)
        top_scores, top_index = torch.topk(total, 2 * K, dim=-1)  # [B,2K]
        last = step == cfg.max_new_tokens - 1
        new_scores = torch.full((B, K), -math.inf, device=device)
        parent = torch.zeros(B, K, dtype=torch.long, device=device)
        token = torch.full((B, K), cfg.pad_token_id, dtype=torch.long, device=device)
        new_beams: list[list[int]] = [[] for _ in range(B * K)]
        for b in range(B):
            if row_done[b]:
                new_beams[b * K : (b + 1) * K] = beams[b * K : (b + 1) * K]
                continue
            k = 0
            for s, idx in zip(top_scores[b].tolist(), top_index[b].tolist(), strict=True):
                if s == -math.inf:
                    break
                src, tok = divmod(idx, V)
                seq = beams[b * K + src] + [tok]
                if tok == cfg.eos_token_id:
                    finished[b].append((rank(s, len(seq) - 1), seq[:-1]))
                    continue
                if last:
                    finished[b].append((rank(s, len(seq)), seq))
                new_scores[b, k], parent[b, k], token[b, k] = s, src, tok
                new_beams[b * K + k] = seq
                k += 1
                if k == K:
                    break
            finished[b] = sorted(finished[b], key=lambda h: -h[0])[:K]
            best_running = float(new_scores[b].max())
            if len(finished[b]) == K and (
                best_running == -math.inf
                or rank(best_running, step + 1) <= finished[b][-1][0]
                or cfg.length_penalty <= 0
            ):
                row_done[b] = True
        if all(row_done) or last:
            break
        # rows: beam k of row b continues from beam parent[b,k] of the same row
        index = (torch.arange(B, device=device).unsqueeze(1) * K + parent).view(-1)
        model.reorder_cache(index)
        positions = positions.index_select(0, index) + 1
        if blocker is not None:
            blocker.reorder(index.tolist())
            blocker.append(token.view(-1).tolist())
        scores, beams = new_scores, new_beams
        logits = decode_one_token(model, token.view(-1, 1), T + step, positions)
    model.clear_cache()
    out = []
    for b in range(B):
        if finished[b]:
            out.append(max(finished[b], key=lambda h: h[0])[1])
        else:  # no hypothesis finished (cannot happen with max_new_tokens >= 1), keep the best running beam
            out.append(beams[b * K])
    return out


# -- scores: the model's own probabilities of what it generated, and alternative boxes -----------------------


@torch.no_grad()
def token_logprobs(
    model: Kosmos2,
    input_ids: Tensor,
    attention_mask: Tensor,
    image_embeds: Tensor | None,
    image_mask: Tensor | None,
    continuations: list[list[int]],
) -> list[list[float]]:
    """log p(token | image, prompt, tokens before it) of every token of each row's continuation.

    One teacher-forced pass over the left-padded prompts [B,T] followed by each row's continuation (right
    padded), with the model's plain distribution: no temperature, no n-gram ban (what decoding did to pick
    a token does not change how likely the model found it). Returns one list per row, aligned with its
    continuation.
    """
    B, T = input_ids.shape
    N = max((len(c) for c in continuations), default=0)
    if N == 0:
        return [[] for _ in continuations]
    pad = model.config.text.pad_token_id
    tail = torch.full((B, N), pad, dtype=input_ids.dtype, device=input_ids.device)
    tail_mask = torch.zeros_like(tail)
    for b, c in enumerate(continuations):
        if c:
            tail[b, : len(c)] = torch.tensor(c, dtype=input_ids.dtype)
            tail_mask[b, : len(c)] = 1
    ids = torch.cat([input_ids, tail], dim=1)
    mask = torch.cat([attention_mask, tail_mask], dim=1)
    positions = make_positions(ids.masked_fill(mask == 0, pad), pad).masked_fill(mask == 0, 1)
    if image_mask is not None:
        image_mask = torch.cat([image_mask, torch.zeros_like(tail, dtype=torch.bool)], dim=1)
    with text_kernels(model):
        logits, _ = model(
            ids, image_embeds=image_embeds, image_mask=image_mask, attention_mask=mask, positions=positions
        )
    # the token at T + i is predicted at T + i - 1
    logp = torch.log_softmax(logits[:, T - 1 : T + N - 1].float(), dim=-1)
    picked = logp.gather(-1, tail.unsqueeze(-1)).squeeze(-1)
    return [picked[b, : len(c)].tolist() for b, c in enumerate(continuations)]


@dataclass
class LocationCandidate:
    """One box the model could attach next: its location tokens' cells and log-probabilities."""

    ul: int  # upper-left cell (row * grid + col)
    lr: int  # lower-right cell
    logp_ul: float  # log p(ul | image, prompt, <object>)
    logp_lr: float  # log p(lr | image, prompt, <object>, ul)

    @property
    def logp(self) -> float:
        return self.logp_ul + self.logp_lr


@torch.no_grad()
def location_candidates(
    model: Kosmos2,
    input_ids: Tensor,
    attention_mask: Tensor,
    image_embeds: Tensor | None,
    image_mask: Tensor | None,
    object_id: int,
    location_offset: int,
    grid: int,
    beams: int,
) -> tuple[list[float], list[list[LocationCandidate]]]:
    """The boxes each row's prompt could get next, by a search over the two location tokens.

    The prompts (left padded) are followed by `<object>`; the `beams` likeliest upper-left cells are each
    completed with the likeliest lower-right cell that makes a box with it (its row and column not before
    the upper-left's: the grid constraint), and the pairs are ranked by log p(ul) + log p(lr | ul). The first
    candidate is what greedy decoding writes after `<object>` whenever its own lower-right pick is valid.
    Probabilities are over the whole vocabulary (not renormalised to location tokens).

    Returns (log p(<object> | prompt) per row, the candidates of each row, best first). Costs one prefill of
    the prompt and one decoding step of `beams` rows per prompt.
    """
    B, T = input_ids.shape
    obj = torch.full((B, 1), object_id, dtype=input_ids.dtype, device=input_ids.device)
    ids = torch.cat([input_ids, obj], dim=1)
    mask = torch.cat([attention_mask, torch.ones_like(obj)], dim=1)
    if image_mask is not None:
        image_mask = torch.cat([image_mask, torch.zeros_like(obj, dtype=torch.bool)], dim=1)
    model.setup_cache(B, T + 2)
    positions = make_positions(ids.masked_fill(mask == 0, model.config.text.pad_token_id))
    positions = positions.masked_fill(mask == 0, 1)
    try:
        with text_kernels(model):
            h = model.forward_cached(
                ids, torch.arange(T + 1, device=ids.device), positions, mask, image_embeds, image_mask
            )
        logp = torch.log_softmax(h[:, -2:].float(), dim=-1)  # [B,2,V]: before <object>, after it
        logp_object = logp[:, 0, object_id].tolist()
        cells = grid * grid
        ul_logp = logp[:, 1, location_offset : location_offset + cells]  # [B,cells]
        K = min(beams, cells)
        top_logp, top_ul = torch.topk(ul_logp, K, dim=-1)  # [B,K]
        expand = torch.arange(B, device=ids.device).repeat_interleave(K)
        model.reorder_cache(expand)
        step_pos = positions[:, -1:].index_select(0, expand) + 1
        ul_tokens = (top_ul.reshape(-1, 1) + location_offset).to(ids.dtype)
        with text_kernels(model):
            lr_logits = model.forward_cached(ul_tokens, torch.tensor([T + 1], device=ids.device), step_pos)
        lr_logp = torch.log_softmax(lr_logits[:, -1].float(), dim=-1)[
            :, location_offset : location_offset + cells
        ]  # [B*K,cells]
        # the grid constraint: lower-right row >= upper-left row and column >= upper-left column
        index = torch.arange(cells, device=ids.device)
        ul_flat = top_ul.reshape(-1, 1)
        valid = (index // grid >= ul_flat // grid) & (index % grid >= ul_flat % grid)
        best_lr_logp, best_lr = lr_logp.masked_fill(~valid, -math.inf).max(dim=-1)
    finally:
        model.clear_cache()
    out = []
    for b in range(B):
        row = [
            LocationCandidate(
                int(top_ul[b, j]),
                int(best_lr[b * K + j]),
                float(top_logp[b, j]),
                float(best_lr_logp[b * K + j]),
            )
            for j in range(K)
        ]
        out.append(sorted(row, key=lambda c: -c.logp))
    return logp_object, out
