"""The OpenAI-compatible chat API's inputs and outputs: a chat request's prompt, image and box, and the
content of the answer (the continuation's readable text)."""

from __future__ import annotations

from kosmos2 import grounding
from kosmos2.predictor import PROMPT_BRIEF, GroundingResult, Predictor
from kosmos2.server.inputs import ApiError, Limits, image_bytes
from kosmos2.server.schemas import ChatMessage


def chat_input(messages: list[ChatMessage], allow_remote: bool, limits: Limits):
    """(prompt, image bytes, box or None) of a chat request: the last user message's text and box, the one
    image among the user messages.

    The prompt: a box (an extra `{"type": "box", "box": [x1, y1, x2, y2], "normalized": false}` part, or
    `<object><patch_index_A><patch_index_B></object>` markup in the text) asks for a region description;
    text with Kosmos-2 markup is the prompt as written; empty text asks for the grounded brief caption; text
    ending in "?" is a grounded question; any other text is continued as a grounded prompt.
    """
    images, text, box = [], "", None
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last_user is None:
        raise ApiError(400, "messages: no user message; send one with the image and the text", "messages")
    for i, m in enumerate(messages):
        if m.role != "user":
            continue
        parts = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else (m.content or [])
        for j, part in enumerate(parts):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type")
            if kind == "text":
                if i == last_user:
                    text += str(part.get("text", ""))
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                images.append(image_bytes(url, f"{where}.image_url", allow_remote, limits))
            elif kind == "box":
                b = part.get("box")
                if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)):
                    raise ApiError(400, f"{where}.box: give [x1, y1, x2, y2] as four numbers", f"{where}.box")
                if i == last_user:
                    box = (b, bool(part.get("normalized", False)))
            else:
                raise ApiError(
                    400,
                    f"{where}: content part type {kind!r} is not supported; use text, image_url or box",
                    where,
                )
    if len(images) != 1:
        raise ApiError(
            400,
            f"messages: {len(images)} images; send exactly one image as an image_url content part "
            "(data:image/png;base64,...)",
            "messages",
        )
    marked = grounding.parse(text)
    markup_boxes = [b for e in marked.entities for b in e.boxes]
    if box is None and markup_boxes and "<phrase>" not in text:
        if len(markup_boxes) > 1:
            raise ApiError(400, "messages: one box per request", "messages")
        box = (list(markup_boxes[0]), True)
    q = text.strip()
    if box is not None:
        prompt = ""  # built from the box once the image's size is known
    elif any(t in q for t in grounding.TAG_TOKENS) or "<patch_index_" in q:
        prompt = q
    elif not q:
        prompt = PROMPT_BRIEF
    elif q.endswith("?"):
        prompt = f"{grounding.GROUNDING} Question: {q} Answer:"
    else:
        prompt = f"{grounding.GROUNDING}{q}"
    return prompt, images[0], box


def prompt_text(predictor: Predictor, prompt: str) -> str:
    """The readable text of a prompt: the first text piece of its stream."""
    return grounding.parse(predictor.tokenizer.decode(predictor.tokenizer.encode(prompt.strip()))).caption


def content_of(predictor: Predictor, prompt: str, result: GroundingResult) -> tuple[str, int]:
    """Chat content (the continuation's readable text) and its offset in the caption."""
    head = prompt_text(predictor, prompt)
    rest = result.caption[len(head) :] if result.caption.startswith(head) else result.caption
    stripped = rest.lstrip()
    return stripped, len(result.caption) - len(stripped)
