"""OpenAI chat requests -> llavakit messages and images, with limits and specific errors.

Shared by the OpenAI-compatible server and the model worker: every way a request can be wrong
maps to one ``RequestError`` with the HTTP status that says what went wrong.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llavakit.errors import (
    ImageDecodeError,
    ImageError,
    ImageTooLarge,
    ImageTooSmall,
    ImageURLNotAllowed,
)
from llavakit.processing.image import ImageLimits, load_image


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx/5xx), ``message`` for the client."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 20 * 1024 * 1024
    max_images: int = 4
    max_pixels: int = 16_000_000
    allow_url_fetch: bool = False


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    frequency_penalty: float | None = None
    ignore_eos: bool = False  # as in vLLM: generate max_tokens whatever the model says
    presence_penalty: float | None = None


def parse_chat_request(payload: Any) -> ChatRequest:
    """Validate the JSON body; a 422 names each wrong field."""
    if not isinstance(payload, dict):
        raise RequestError(400, "the request body must be a JSON object")
    try:
        return ChatRequest.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise RequestError(422, f"invalid request: {problems}") from None


_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*),(?P<data>.*)$", re.S
)


def decode_data_url(url: str) -> bytes:
    match = _DATA_URL.match(url)
    if not match:
        raise RequestError(400, "malformed data URL (expected data:image/...;base64,...)")
    mime = (match.group("mime") or "").lower()
    if not mime.startswith("image/"):
        raise RequestError(400, f"data URL has type {mime or 'none'!r}, not an image")
    if ";base64" not in match.group("params").lower():
        raise RequestError(400, "data URL images must be base64-encoded (;base64,)")
    try:
        return base64.b64decode(match.group("data"), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "invalid base64 in the image data URL") from None


def load_request_image(url: str, limits: ServeLimits):
    """A PIL image from a data URL (always) or an http(s) URL (only when enabled, public)."""
    image_limits = ImageLimits(
        max_bytes=limits.max_body_bytes,
        max_pixels=limits.max_pixels,
        allow_urls=limits.allow_url_fetch,
    )
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    try:
        if scheme == "data":
            return load_image(decode_data_url(url), image_limits)
        if scheme in ("http", "https"):
            if not limits.allow_url_fetch:
                raise RequestError(
                    400,
                    "image URLs are disabled on this server (start it with --allow-url-fetch), "
                    "send the image as a data URL instead",
                )
            return load_image(url, image_limits)
    except ImageTooLarge as exc:
        raise RequestError(413, str(exc)) from None
    except (ImageURLNotAllowed, ImageDecodeError, ImageTooSmall, ImageError) as exc:
        raise RequestError(400, str(exc)) from None
    raise RequestError(
        400, f"unsupported image URL scheme {scheme or url[:16]!r}: use data: or https:"
    )


def to_messages(request: ChatRequest, limits: ServeLimits) -> tuple[list[dict], list, str | None]:
    """(llavakit messages with <image> placeholders, PIL images, system prompt)."""
    from llavakit.processing.processor import IMAGE

    messages, images, system = [], [], None
    urls: list[str] = []
    for message in request.messages:
        if message.role in ("system", "developer"):
            text = _text_only(message)
            system = text if system is None else system + "\n" + text
            continue
        content = message.content
        if content is None:
            content = ""
        if isinstance(content, str):
            if IMAGE in content:
                raise RequestError(
                    400, f"{IMAGE!r} in message text: send images as image_url parts"
                )
            messages.append({"role": message.role, "content": content})
            continue
        pieces = []
        for part in content:
            if part.type == "text":
                if part.text and IMAGE in part.text:
                    raise RequestError(
                        400, f"{IMAGE!r} in message text: send images as image_url parts"
                    )
                pieces.append(part.text or "")
            else:
                if message.role != "user":
                    raise RequestError(400, "images are only accepted in user messages")
                if part.image_url is None:
                    raise RequestError(422, "image_url part without an image_url")
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                urls.append(url)
                pieces.append(IMAGE + "\n")
        messages.append({"role": message.role, "content": "".join(pieces)})
    if len(urls) > limits.max_images:
        raise RequestError(
            400,
            f"{len(urls)} images in the request; this server accepts at most {limits.max_images}",
        )
    if not messages or messages[-1]["role"] != "user":
        raise RequestError(400, "the last message must come from the user")
    images = [load_request_image(url, limits) for url in urls]
    return messages, images, system


def _text_only(message: Message) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    if any(p.type != "text" for p in message.content):
        raise RequestError(400, "system messages cannot contain images")
    return "".join(p.text or "" for p in message.content)
