"""The HTTP app: the native grounding API, the OpenAI-compatible chat API, metrics and the web demo.

    POST /v1/ground     {image, prompt | task}          grounded caption (or any prompt)
    POST /v1/locate     {image, expression}             referring expression -> boxes
    POST /v1/describe   {image, box, normalized}        box -> description
    POST /v1/vqa        {image, question, grounded}     question -> answer
    POST /v1/phrases    {image, caption, phrases}       phrase grounding: boxes for phrases of a caption
    POST /v1/chat/completions, GET /v1/models           OpenAI's chat format (plain and `stream: true`)
    GET  /health, /metrics, /docs, /                     liveness, Prometheus, OpenAPI, the web demo

Images come as base64, data URLs or multipart uploads (`image` file field). Every request goes through one
`BatchEngine` (kosmos2/server/engine.py), so concurrent requests share decode steps. Every error is a JSON
body in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status for bad input.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from kosmos2 import grounding
from kosmos2.generate import GenerationConfig
from kosmos2.predictor import PROMPT_BRIEF, PROMPT_DETAILED, PROMPT_PLAIN, GroundingResult, Predictor
from kosmos2.server.chat import chat_input, content_of, prompt_text
from kosmos2.server.engine import BatchEngine, Job, QueueFull
from kosmos2.server.inputs import ApiError, Limits, decode_image, image_bytes
from kosmos2.server.metrics import Metrics
from kosmos2.server.schemas import (
    ChatRequest,
    DescribeRequest,
    GroundRequest,
    GroundResponse,
    LocateRequest,
    Options,
    PhrasesRequest,
    VQARequest,
)

STATIC = Path(__file__).parent / "static"


@dataclass
class ServeConfig:
    """What `kosmos2 serve` sets besides the model: batching, the queue, auth, limits."""

    model_name: str = "kosmos2"
    max_batch: int = 8
    max_queue: int = 64
    api_key: str | None = None
    allow_remote_images: bool = False
    retry_after_s: int = 1
    limits: Limits = field(default_factory=Limits)


# -- tasks: a prompt and decoding defaults each (SPEC §1, as the Predictor's task helpers) ------------------


def task_prompt(endpoint: str, **k: Any) -> tuple[str, dict[str, Any]]:
    """The prompt of a native endpoint's request (`k`: its fields) and the task's decoding defaults."""
    if endpoint == "ground":
        if k.get("prompt") is not None:
            return k["prompt"], {}
        kind = k.get("task") or "brief"
        return {
            "brief": (PROMPT_BRIEF, {}),
            "detailed": (PROMPT_DETAILED, {"max_new_tokens": 128}),
            "caption": (PROMPT_PLAIN, {"num_beams": 5}),
        }[kind]
    if endpoint == "locate":
        return (
            f"{grounding.GROUNDING}{grounding.PHRASE_START}{k['expression'].strip()}{grounding.PHRASE_END}",
            {"max_new_tokens": 24},
        )
    if endpoint == "describe":
        return (
            f"{grounding.PHRASE_START} It{grounding.PHRASE_END}{grounding.object_markup([k['box']])} is",
            {},
        )
    if endpoint == "vqa":
        q = k["question"].strip()
        return (
            f"{grounding.GROUNDING} Question: {q} Answer:" if k.get("grounded") else f"Question: {q} Answer:"
        ), {"max_new_tokens": 24}
    raise ValueError(endpoint)


def _entity(e, offset: int | None = None) -> dict[str, Any]:
    span = list(e.span)
    if offset is not None:  # chat: spans index the content; a phrase of the prompt has none
        span = [span[0] - offset, span[1] - offset] if span[0] >= offset else None
    out = {
        "phrase": e.phrase,
        "span": span,
        "boxes": [list(b) for b in e.boxes],
        "pixel_boxes": [[round(v, 2) for v in b] for b in e.pixel_boxes],
    }
    if getattr(e, "scores", None):  # the predictor's box scores (docs/TRUST.md); None: a box of the prompt
        out["scores"] = e.scores
        out["phrase_score"] = e.phrase_score
    return out


def _sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n"


# -- the app ----------------------------------------------------------------------------------------------


def create_app(predictor: Predictor, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app over one predictor; its batching engine starts and stops with the app."""
    config = config or ServeConfig()
    limits = config.limits
    metrics = Metrics()
    engine = BatchEngine(predictor, config.max_batch, config.max_queue, metrics)
    created = int(time.time())

    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(
        title="kosmos2",
        summary="Kosmos-2 grounding: captions with boxes, referring expressions, region descriptions, VQA",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- errors, auth and body size -----------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        headers = {"Retry-After": str(config.retry_after_s)} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):  # a bug: still one JSON line, never a traceback
        return await api_error(request, ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return await api_error(request, _validation_error(e.errors()))

    def check(scope) -> ApiError | None:
        """Auth and the declared body size, before the route reads anything."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"].startswith("/v1/") and config.api_key:
            given = headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                return ApiError(
                    401,
                    "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                    None,
                    "invalid_api_key",
                )
        size = headers.get("content-length", "")
        if size.isdigit() and int(size) > limits.max_body_bytes:
            return ApiError(
                413,
                f"request body is {int(size):,} bytes; this server's max_body_bytes is "
                f"{limits.max_body_bytes:,}",
                None,
                "max_body_bytes",
            )
        return None

    app.add_middleware(_Guard, check=check, metrics=metrics, retry_after=config.retry_after_s)

    async def read_body(request: Request) -> tuple[dict[str, Any], bytes | None]:
        """A JSON or multipart body as a dict, and an uploaded image file's bytes (if one came)."""
        body = bytearray()
        async for chunk in request.stream():  # counted, for bodies without a content-length
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise ApiError(
                    413,
                    f"request body is over this server's max_body_bytes of {limits.max_body_bytes:,}",
                    None,
                    "max_body_bytes",
                )
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            request._body = bytes(body)
            fields: dict[str, Any] = {}
            upload = None
            async with request.form() as form:
                for key, value in form.multi_items():
                    if hasattr(value, "read"):
                        upload = await value.read()
                        fields[key] = "<upload>"
                    else:
                        fields[key] = _form_value(key, value)
            return fields, upload
        try:
            data = json.loads(body)
        except ValueError as e:
            raise ApiError(
                400, f"request body is not valid JSON ({e}); send a JSON object", None, "bad_json"
            ) from None
        if not isinstance(data, dict):
            raise ApiError(
                400, f"request body must be a JSON object, got {type(data).__name__}", None, "bad_json"
            )
        return data, None

    # -- one generation -----------------------------------------------------------------------------------

    def generation(defaults: dict[str, Any], o: Any, max_tokens: int | None, prompt: str) -> GenerationConfig:
        options = dict(defaults)
        name = "max_tokens" if isinstance(o, ChatRequest) else "max_new_tokens"
        if max_tokens is not None:
            if max_tokens > limits.max_new_tokens:
                raise ApiError(
                    400,
                    f"{name}={max_tokens} exceeds this server's limit max_new_tokens={limits.max_new_tokens}",
                    name,
                    "max_new_tokens",
                )
            options["max_new_tokens"] = max_tokens
        if o.temperature is not None:
            options["do_sample"] = o.temperature > 0
            if o.temperature > 0:
                options["temperature"] = o.temperature
        if o.top_p is not None:
            options["top_p"] = o.top_p
            options.setdefault("do_sample", o.top_p < 1)
        if o.seed is not None:
            options["seed"] = o.seed
        if getattr(o, "num_beams", None) is not None:
            options["num_beams"] = o.num_beams
        try:
            grounding.check_prompt(prompt, predictor.grid, predictor.tokenizer.token_to_id)
        except ValueError as e:  # PromptError: what is wrong and where
            raise ApiError(400, f"prompt {prompt!r}: {e}", "prompt", "bad_prompt") from None
        try:
            cfg = GenerationConfig.from_kwargs(predictor.generation, **options)
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e)) from None
        if cfg.max_new_tokens > limits.max_new_tokens:  # a default above the limit is capped
            cfg = GenerationConfig.from_kwargs(cfg, max_new_tokens=limits.max_new_tokens)
        n = len(predictor.tokenizer.encode_prompt(prompt, num_image_tokens=predictor.num_image_tokens)[0])
        positions = predictor.model.config.text.max_positions
        if n + cfg.max_new_tokens > positions - 2:
            raise ApiError(
                400,
                f"prompt ({n} tokens with the image) + {name}={cfg.max_new_tokens} exceeds the model's "
                f"{positions - 2} positions; shorten the prompt or ask for fewer tokens",
                name,
                "max_positions",
            )
        return cfg

    async def submit(
        request: Request, prompt: str, image, cfg: GenerationConfig, stream: bool
    ) -> tuple[Job, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(kind: str, payload: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        job = Job(prompt, image, cfg, sink, stream=stream)
        try:
            engine.submit(job)
        except QueueFull as e:
            metrics.rejected.inc()
            raise ApiError(
                503, f"server busy: {e}; retry after {config.retry_after_s} s", None, "queue_full"
            ) from None
        return job, events

    async def events_of(request: Request, job: Job, events: asyncio.Queue, watch: bool):
        """The job's (kind, payload) pairs until it ends; `watch`: cancel it if the client goes away (checked
        every 0.1 s; a streaming response learns it from Starlette, which cancels the stream)."""
        checked = time.monotonic()
        while True:
            try:
                kind, payload = await asyncio.wait_for(events.get(), timeout=0.1 if watch else None)
            except TimeoutError:
                kind = None
            if watch and time.monotonic() - checked >= 0.1:
                checked = time.monotonic()
                if await request.is_disconnected():
                    job.cancelled.set()
                    return
            if kind is None:
                continue
            yield kind, payload
            if kind in ("finish", "error"):
                return

    async def final_result(request: Request, job: Job, events: asyncio.Queue):
        """Wait for a non-streaming job: (its result, the finish payload), or None when it was cancelled or
        the client went away."""
        result = None
        async for kind, payload in events_of(request, job, events, watch=True):
            if kind == "error":
                raise ApiError(500, payload)
            if kind == "finish":
                return None if payload["reason"] == "cancelled" else (result, payload)
            if payload.kind == "done":
                result = payload.result
        return None

    async def load(data: dict[str, Any], upload: bytes | None) -> Any:
        if upload is not None:
            raw = upload
        else:
            raw = await run_in_threadpool(
                image_bytes, data.get("image"), "image", config.allow_remote_images, limits
            )
        return await run_in_threadpool(decode_image, raw, "image", limits)

    async def native(request: Request, task: str, model: type[Options]) -> Any:
        t0 = time.monotonic()
        data, upload = await read_body(request)
        if upload is not None:
            data["image"] = "<upload>"
        try:
            o = model.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e.errors()) from None
        image = await load(data, upload)
        fields = o.model_dump()
        if task == "describe":
            fields["box"] = _box(o.box, o.normalized, image.size)
        if task == "ground" and o.prompt is not None and o.task is not None:
            raise ApiError(400, "give either prompt or task, not both", "task")
        prompt, defaults = task_prompt(task, **fields)
        cfg = generation(defaults, o, o.max_new_tokens, prompt)
        job, events = await submit(request, prompt, image, cfg, o.stream)
        name = task
        if task == "ground":
            name = o.task or ("prompt" if o.prompt is not None else "brief")
        route = request.url.path

        def body(result: GroundingResult, info: dict) -> dict:
            total = round(1000 * (time.monotonic() - t0), 2)
            metrics.latency.labels(route).observe(total / 1000)
            return {
                "id": f"k2-{uuid.uuid4().hex[:16]}",
                "model": config.model_name,
                "task": name,
                "prompt": prompt,
                "text": result.text,
                "caption": result.caption,
                "answer": result.answer,
                "entities": [_entity(e) for e in result.entities],
                "image_size": list(result.image_size),
                "finish_reason": info["reason"],
                "usage": {"completion_tokens": info["completion_tokens"]},
                "timings": {
                    "queue_ms": info["queue_ms"],
                    "generate_ms": info["generate_ms"],
                    "total_ms": total,
                },
            }

        if o.stream:

            async def sse():
                done = False
                result = None
                try:
                    async for kind, payload in events_of(request, job, events, watch=False):
                        if kind == "error":
                            yield _sse(ApiError(500, payload).body(), "error")
                        elif kind == "finish":
                            done = True
                            yield _sse(body(result, payload), "done")
                        elif payload.kind == "text":
                            yield _sse({"text": payload.text}, "text")
                        elif payload.kind == "entity":
                            yield _sse(_entity(payload.entity), "entity")
                        else:
                            result = payload.result
                finally:
                    if not done:
                        job.cancelled.set()  # the client went away: stop its generation

            return StreamingResponse(
                sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )

        finished = await final_result(request, job, events)
        if finished is None:
            return Response(status_code=499)  # cancelled, or the client went away
        return body(*finished)

    def docs(model: type[BaseModel], summary: str) -> dict[str, Any]:
        schema = model.model_json_schema()
        form = json.loads(json.dumps(schema))
        form["properties"]["image"] = {"type": "string", "format": "binary", "description": "the image file"}
        return {
            "summary": summary,
            "responses": {200: {"model": GroundResponse, "description": "JSON, or SSE when stream is true"}},
            "openapi_extra": {
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": schema},
                        "multipart/form-data": {"schema": form},
                    },
                }
            },
        }

    @app.post("/v1/ground", **docs(GroundRequest, "Grounded caption, or any prompt"))
    async def ground(request: Request):
        return await native(request, "ground", GroundRequest)

    @app.post("/v1/locate", **docs(LocateRequest, "Referring expression -> boxes"))
    async def locate(request: Request):
        return await native(request, "locate", LocateRequest)

    @app.post("/v1/describe", **docs(DescribeRequest, "Box -> description of that region"))
    async def describe(request: Request):
        return await native(request, "describe", DescribeRequest)

    @app.post("/v1/vqa", **docs(VQARequest, "Question -> answer (grounded: with boxes)"))
    async def vqa(request: Request):
        return await native(request, "vqa", VQARequest)

    @app.post("/v1/phrases", **docs(PhrasesRequest, "Phrase grounding: boxes for phrases of a caption"))
    async def phrases(request: Request):
        """Flickr30k Entities' protocol, as `Predictor.ground_phrases`: one prompt per phrase, run batched."""
        t0 = time.monotonic()
        data, upload = await read_body(request)
        if upload is not None:
            data["image"] = "<upload>"
        try:
            o = PhrasesRequest.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e.errors()) from None
        if o.stream:
            raise ApiError(400, "stream is not supported by /v1/phrases; leave it out", "stream")
        items = []  # (phrase, span, prompt)
        for i, ph in enumerate(o.phrases):
            if isinstance(ph, str):
                start = o.caption.find(ph)
                if start < 0 or not ph.strip():
                    raise ApiError(400, f"phrases[{i}] {ph!r} does not occur in the caption", f"phrases[{i}]")
                end = start + len(ph)
            else:
                start, end = ph
                if not 0 <= start < end <= len(o.caption):
                    raise ApiError(
                        400,
                        f"phrases[{i}] {list(ph)} is not a non-empty span of the caption "
                        f"({len(o.caption)} characters)",
                        f"phrases[{i}]",
                    )
            name = o.caption[start:end].strip()
            prompt = (
                f"{grounding.GROUNDING}{o.caption[:start].strip()} "
                f"{grounding.PHRASE_START}{name}{grounding.PHRASE_END}"
            )
            items.append((name, [start, end], prompt))
        image = await load(data, upload)
        cfg = generation({"max_new_tokens": 24}, o, o.max_new_tokens, max((p for *_, p in items), key=len))
        jobs = []
        try:
            for _, _, prompt in items:
                jobs.append(await submit(request, prompt, image, cfg, False))
        except ApiError:
            for job, _ in jobs:
                job.cancelled.set()
            raise
        out, tokens = [], 0
        for (name, span, _), (job, events) in zip(items, jobs, strict=True):
            result = None
            async for kind, payload in events_of(request, job, events, watch=True):
                if kind == "error":
                    raise ApiError(500, payload)
                if kind == "finish":
                    tokens += payload["completion_tokens"]
                elif payload.kind == "done":
                    result = payload.result
            if result is None:  # the client went away
                for j, _ in jobs:
                    j.cancelled.set()
                return Response(status_code=499)
            e = next((e for e in result.entities if e.phrase.strip() == name and e.boxes), None)
            boxes = [list(b) for b in e.boxes] if e else []
            pixels = [[round(v, 2) for v in b] for b in e.pixel_boxes] if e else []
            out.append({"phrase": name, "span": span, "boxes": boxes, "pixel_boxes": pixels})
        total = round(1000 * (time.monotonic() - t0), 2)
        metrics.latency.labels("/v1/phrases").observe(total / 1000)
        return {
            "id": f"k2-{uuid.uuid4().hex[:16]}",
            "model": config.model_name,
            "task": "phrases",
            "caption": o.caption,
            "phrases": out,
            "image_size": list(image.size),
            "usage": {"completion_tokens": tokens},
            "timings": {"total_ms": total},
        }

    # -- OpenAI-compatible ----------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": config.model_name, "object": "model", "created": created, "owned_by": "kosmos2"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatRequest):
        t0 = time.monotonic()
        if body.model != config.model_name:
            raise ApiError(
                404,
                f"model {body.model!r} is not served here; this server serves {config.model_name!r} "
                "(GET /v1/models)",
                "model",
                "model_not_found",
            )
        prompt, raw, box = await run_in_threadpool(
            chat_input, body.messages, config.allow_remote_images, limits
        )
        image = await run_in_threadpool(decode_image, raw, "messages.image_url", limits)
        if box is not None:
            b, normalized = box
            prompt, _ = task_prompt("describe", box=_box(b, normalized, image.size))
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        cfg = generation({}, body, max_tokens, prompt)
        job, events = await submit(request, prompt, image, cfg, body.stream)
        cid, name = f"chatcmpl-{uuid.uuid4().hex}", config.model_name
        prompt_tokens = len(
            predictor.tokenizer.encode_prompt(prompt, num_image_tokens=predictor.num_image_tokens)[0]
        )

        def usage(info: dict) -> dict[str, int]:
            n = info["completion_tokens"]
            return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}

        def finish_reason(info: dict) -> str:
            return "length" if info["reason"] == "length" else "stop"

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            def chunk(delta: dict, reason: str | None = None, **extra: Any) -> str:
                c = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": name}
                c["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]
                return _sse({**c, **extra})

            async def sse():
                done = False
                offset = None  # where the content starts in the caption
                sent = ""  # caption so far
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    async for kind, payload in events_of(request, job, events, watch=False):
                        if kind == "error":
                            yield _sse(ApiError(500, payload).body())
                        elif kind == "finish":
                            done = True
                            metrics.latency.labels("/v1/chat/completions").observe(time.monotonic() - t0)
                            yield chunk(
                                {}, finish_reason(payload), usage=usage(payload) if include_usage else None
                            )
                        elif payload.kind == "text":
                            piece = payload.text
                            if offset is None:
                                if sent == "" and job_prompt_text is not None and piece == job_prompt_text:
                                    sent += piece  # the prompt's own text is not content
                                    continue
                                stripped = piece.lstrip()
                                offset = len(sent) + len(piece) - len(stripped)
                                piece = stripped
                            sent += payload.text
                            if piece:
                                yield chunk({"content": piece})
                        elif payload.kind == "entity":
                            yield chunk(
                                {
                                    "entities": [
                                        _entity(payload.entity, offset if offset is not None else len(sent))
                                    ]
                                }
                            )
                    yield "data: [DONE]\n\n"
                finally:
                    if not done:
                        job.cancelled.set()

            job_prompt_text = prompt_text(predictor, prompt)
            return StreamingResponse(
                sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )

        finished = await final_result(request, job, events)
        if finished is None:
            return Response(status_code=499)  # cancelled, or the client went away
        result, payload = finished
        metrics.latency.labels("/v1/chat/completions").observe(time.monotonic() - t0)
        content, offset = content_of(predictor, prompt, result)
        message = {
            "role": "assistant",
            "content": content,
            "entities": [_entity(e, offset) for e in result.entities],
            "grounded_text": result.text,
        }
        return {
            "id": cid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": finish_reason(payload),
                }
            ],
            "usage": usage(payload),
        }

    # -- operations and the demo ------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        alive = engine.alive()
        body = {
            "status": "ok" if alive else "engine stopped",
            "model": config.model_name,
            "queue_depth": engine.queue_depth,
            "running": engine.running,
            "max_batch": config.max_batch,
            "max_queue": config.max_queue,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def demo():
        return FileResponse(STATIC / "index.html")

    return app


# -- helpers ----------------------------------------------------------------------------------------------


class _Guard:
    """Pure ASGI middleware (it leaves streaming and disconnect detection alone): refuses a request that
    `check` rejects, and counts the answers of /v1/ routes by status."""

    def __init__(self, app, check, metrics: Metrics, retry_after: int):
        self.app, self.check, self.metrics, self.retry_after = app, check, metrics, retry_after

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = [0]

        async def counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        error = self.check(scope)
        if error is not None:
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, counted)
        else:
            await self.app(scope, receive, counted)
        if path.startswith("/v1/") and status[0]:
            self.metrics.requests.labels(path, str(status[0])).inc()


def _validation_error(errors: list[dict]) -> ApiError:
    """Pydantic's errors as one line naming the fields."""
    for e in errors:
        if e.get("type") == "json_invalid":
            return ApiError(
                400,
                f"request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})",
                None,
                "bad_json",
            )
    parts = []
    for e in errors[:4]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        if e.get("type") == "extra_forbidden":
            parts.append(f"unknown field {loc!r}")
        elif e.get("type") == "missing":
            parts.append(f"missing field {loc!r}")
        else:
            parts.append(f"{loc}: {e['msg']}")
    first = ".".join(str(x) for x in errors[0].get("loc", ()) if x != "body") if errors else None
    return ApiError(422, "invalid request: " + "; ".join(parts), first or None, "invalid_request")


def _form_value(key: str, value: str) -> Any:
    """A multipart field: lists (box, phrases) as JSON, a box also as comma-separated numbers, a phrase as
    itself; the rest as text for pydantic."""
    if key == "phrases":
        text = value.strip()
        try:
            return json.loads(text) if text.startswith("[") else [value]
        except ValueError:
            return value
    if key == "box":
        text = value.strip()
        try:
            return json.loads(text) if text.startswith("[") else [float(v) for v in text.split(",")]
        except ValueError:
            return value
    return value


def _box(box: list[float], normalized: bool, size: tuple[int, int]) -> grounding.Box:
    """A request's box as a normalised box inside the image; errors speak the caller's units."""
    W, H = size
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x1 < x2 and y1 < y2):
        raise ApiError(400, f"box {box}: needs x1 < x2 and y1 < y2", "box")
    if normalized:
        if min(x1, y1) < 0 or max(x2, y2) > 1:
            raise ApiError(
                400, f"box {box}: normalized boxes lie in [0, 1]; for pixels set normalized false", "box"
            )
        return (x1, y1, x2, y2)
    if min(x1, y1) < 0 or x2 > W or y2 > H:
        raise ApiError(400, f"box {box}: pixel box outside the {W}x{H} image", "box")
    return grounding.box_to_normalized((x1, y1, x2, y2), W, H)
