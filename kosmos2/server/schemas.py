"""The bodies of the server's requests and answers (pydantic models): their OpenAPI schema is at /docs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# -- request bodies --------------------------------------------------------------------------------------


class Options(BaseModel):
    """Decoding options shared by the native endpoints (the task's defaults apply to what is left out)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(None, ge=1, description="at most this many new tokens")
    temperature: float | None = Field(None, ge=0, description="0 or absent: greedy; > 0: sampling")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling (implies sampling)")
    seed: int | None = Field(None, description="sampling: a fixed seed makes the result repeatable")
    num_beams: int | None = Field(None, ge=1, le=8, description="beam search (runs alone, not batched)")
    stream: bool = Field(False, description="server-sent events: text, entity, then done")


class GroundRequest(Options):
    image: str = Field(description="base64, a data URL, or a multipart file field")
    prompt: str | None = Field(None, description="any Kosmos-2 prompt, e.g. '<grounding>An image of'")
    task: Literal["brief", "detailed", "caption"] | None = Field(
        None, description="brief: grounded brief caption (default); detailed; caption: plain, beam 5"
    )


class LocateRequest(Options):
    image: str
    expression: str = Field(min_length=1, description="a referring expression, e.g. 'the red circle'")


class DescribeRequest(Options):
    image: str
    box: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2")
    normalized: bool = Field(False, description="box in [0, 1] instead of pixels of the image")


class VQARequest(Options):
    image: str
    question: str = Field(min_length=1)
    grounded: bool = Field(False, description="ask for boxes of the phrases in the answer")


class PhrasesRequest(Options):
    image: str
    caption: str = Field(min_length=1, description="a caption of the image")
    phrases: list[str | tuple[int, int]] = Field(
        min_length=1, max_length=32, description="phrases of the caption (text, or [start, end) spans)"
    )


class EntityOut(BaseModel):
    phrase: str
    span: tuple[int, int] | None = Field(
        description="[start, end) in caption (chat: in content; null: in the prompt)"
    )
    boxes: list[tuple[float, float, float, float]] = Field(description="normalised x1, y1, x2, y2")
    pixel_boxes: list[tuple[float, float, float, float]] = Field(description="pixels of the original image")
    scores: list[float | None] | None = Field(
        None,
        description="per box: the model's probability of its two location tokens (null: the prompt's box)",
    )
    phrase_score: float | None = Field(None, description="the phrase's mean token probability, if generated")


class Timings(BaseModel):
    queue_ms: float
    generate_ms: float
    total_ms: float


class GroundResponse(BaseModel):
    id: str
    model: str
    task: str
    prompt: str
    text: str = Field(description="the generated continuation, markup kept")
    caption: str = Field(description="prompt + continuation without markup; entity spans index it")
    answer: str = Field(description="the continuation without markup")
    entities: list[EntityOut]
    image_size: tuple[int, int]
    finish_reason: str
    usage: dict[str, int]
    timings: Timings


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    """OpenAI's chat request; fields it has that this server cannot honour are refused by name."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int | None = Field(None, ge=1, le=1, description="one choice per request")
    user: str | None = None
