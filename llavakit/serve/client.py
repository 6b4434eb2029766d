"""Talk to a LLaVA controller: list models, stream an answer from a worker.

Errors are exceptions with a message, never a hang: an unreachable worker is dropped and the
next one tried; a worker that dies mid-answer raises ``WorkerError``.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import httpx
from PIL import Image

from llavakit.serve.controller import SEPARATOR


class WorkerError(RuntimeError):
    """The answer could not be completed (worker died, refused, or none available)."""


def image_data_url(image: Image.Image | bytes) -> str:
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, "PNG")
        image = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(image).decode()


def openai_messages(messages: list[dict], images: list) -> list[dict]:
    """llavakit messages with ``<image>`` placeholders -> OpenAI parts (images in order)."""
    from llavakit.processing.processor import IMAGE

    out, pending = [], iter(images)
    for m in messages:
        text = m["content"]
        if IMAGE not in text:
            out.append({"role": m["role"], "content": text})
            continue
        parts = []
        for i, piece in enumerate(text.split(IMAGE)):
            if i:
                parts.append(
                    {"type": "image_url", "image_url": {"url": image_data_url(next(pending))}}
                )
            piece = piece[1:] if i and piece.startswith("\n") else piece
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": m["role"], "content": parts})
    return out


class ControllerClient:
    def __init__(self, controller: str, timeout: float = 120.0) -> None:
        self.controller = controller.rstrip("/")
        self.timeout = timeout
        self.last_worker: str | None = None

    def list_models(self) -> list[str]:
        try:
            r = httpx.post(self.controller + "/list_models", timeout=5)
            return r.json()["models"]
        except (httpx.HTTPError, ValueError, KeyError):
            return []

    def worker_for(self, model: str) -> str:
        r = httpx.post(self.controller + "/get_worker_address", json={"model": model}, timeout=5)
        address = r.json().get("address", "")
        if not address:
            raise WorkerError(f"no worker serves model {model!r} (is one running and registered?)")
        return address

    def stream(
        self, model: str, messages: list[dict], images: list | None = None, **settings
    ) -> Iterator[str]:
        """Yield the answer so far, growing, from a worker chosen by the controller."""
        body = {"model": model, "messages": openai_messages(messages, images or []), **settings}
        for _ in range(4):
            address = self.worker_for(model)
            self.last_worker = address
            try:
                yield from self._stream_from(address, body)
                return
            except httpx.ConnectError:  # dead before we started: tell the controller, retry
                httpx.post(
                    self.controller + "/remove_worker", json={"worker_name": address}, timeout=5
                )
        raise WorkerError(f"no reachable worker for model {model!r}")

    def _stream_from(self, address: str, body: dict) -> Iterator[str]:
        started = False
        try:
            with httpx.stream(
                "POST",
                address + "/worker_generate_stream",
                json=body,
                timeout=httpx.Timeout(self.timeout, connect=5),
            ) as response:
                if response.status_code != 200:
                    response.read()
                    try:
                        message = response.json()["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        message = response.text
                    raise WorkerError(
                        f"worker refused the request ({response.status_code}): {message}"
                    )
                buffer = b""
                for chunk in response.iter_bytes():
                    buffer += chunk
                    *complete, buffer = buffer.split(SEPARATOR)
                    for raw in complete:
                        if not raw:
                            continue
                        event = json.loads(raw)
                        if event.get("error_code", 0):
                            raise WorkerError(event["text"])
                        started = True
                        yield event["text"]
        except httpx.ConnectError:
            if started:
                raise WorkerError(f"lost the connection to worker {address}") from None
            raise
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ReadTimeout) as exc:
            raise WorkerError(
                f"worker {address} stopped mid-answer ({type(exc).__name__}); please retry"
            ) from None
