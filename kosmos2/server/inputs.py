"""Request inputs: the error every bad input becomes, images from base64 / data URLs / uploads / URLs, and
the server's limits."""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.request
from dataclasses import dataclass

from PIL import Image

from kosmos2.image import ImageError, load_image


@dataclass
class Limits:
    """What one request may ask for; each limit is named in the 4xx error of a request past it."""

    max_body_bytes: int = 20 * 1024 * 1024  # the whole request body
    max_image_pixels: int = 40_000_000  # width x height of a decoded image
    max_new_tokens: int = 256  # max_new_tokens / max_tokens of one request
    remote_timeout_s: float = 10.0  # fetching an http(s) image (only with --allow-remote-images)


class ApiError(Exception):
    """A request the server refuses: HTTP status, one line saying what is wrong and what to do, the field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large"}.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


_DATA_URL = re.compile(r"data:([\w/+.-]*)(;[\w=.-]+)*?(;base64)?,", re.ASCII)


def image_bytes(value: str, field: str, allow_remote: bool, limits: Limits) -> bytes:
    """The encoded image file in `value`: a data URL, plain base64, or (with allow_remote) an http(s) URL."""
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, f"{field}: empty; send the image as base64, a data URL or a file upload", field)
    value = value.strip()
    if value.startswith(("http://", "https://")):
        if not allow_remote:
            raise ApiError(
                400,
                f"{field}: remote image URLs are refused (the server never fetches addresses it is handed); "
                "send the image as a data URL or base64, or start the server with --allow-remote-images",
                field,
                "remote_images_disabled",
            )
        return _fetch(value, field, limits)
    match = _DATA_URL.match(value)
    if value.startswith("data:"):
        if not match or not match.group(3):
            raise ApiError(400, f"{field}: a data URL must be base64 (data:image/png;base64,...)", field)
        value = value[match.end() :]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(
            400,
            f"{field}: not valid base64 ({e}); send the file's bytes base64-encoded or as a data URL",
            field,
        ) from None


def _fetch(url: str, field: str, limits: Limits) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=limits.remote_timeout_s) as response:  # noqa: S310
            data = response.read(limits.max_body_bytes + 1)
    except Exception as e:
        raise ApiError(400, f"{field}: could not fetch {url!r} ({e})", field) from None
    if len(data) > limits.max_body_bytes:
        raise ApiError(
            413,
            f"{field}: {url!r} is over max_body_bytes={limits.max_body_bytes:,} bytes",
            field,
            "max_body_bytes",
        )
    return data


def decode_image(data: bytes, field: str, limits: Limits) -> Image.Image:
    """Bytes -> an RGB PIL image, within max_image_pixels (checked from the header, before decoding)."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
    except Exception:
        w = h = 0  # not an image, or not one Pillow can read: load_image names the problem
    if w * h > limits.max_image_pixels:
        raise ApiError(
            413,
            f"{field}: {w}x{h} = {w * h:,} pixels exceeds this server's "
            f"max_image_pixels={limits.max_image_pixels:,}; "
            "downscale the image",
            field,
            "max_image_pixels",
        )
    try:
        return load_image(data, max_pixels=limits.max_image_pixels)
    except ImageError as e:
        raise ApiError(400, f"{field}: {e}", field, "bad_image") from None
