"""``llavakit worker``: an engine behind the LLaVA model-worker API.

Registers with the controller, sends heartbeats with its queue length (re-registering if the
controller forgot it), and streams answers as the original does: JSON objects
``{"text": <answer so far>, "error_code": 0}`` separated by NUL bytes. Requests carry either
OpenAI-style ``messages`` (images as ``image_url`` parts) or the original ``prompt`` (already
rendered, ``<image>`` placeholders) with base64 ``images``. The worker also answers
``/v1/chat/completions`` like ``llavakit serve``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import threading

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from llavakit.errors import LlavakitError
from llavakit.serve.api import DEFAULT_SERVE_LIMITS, ModelServer, create_app, load_server
from llavakit.serve.controller import SEPARATOR
from llavakit.serve.requests import (
    RequestError,
    ServeLimits,
    load_request_image,
    parse_chat_request,
    to_messages,
)


def _chunk(text: str, code: int = 0, **extra) -> bytes:
    return json.dumps({"text": text, "error_code": code, **extra}).encode() + SEPARATOR


def create_worker_app(server: ModelServer) -> FastAPI:
    app = create_app(server, ui=False)  # /v1/chat/completions, /health, /metrics as well

    def prepare(body: dict):
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        max_new = int(body.get("max_new_tokens", body.get("max_tokens", 256)))
        if max_new < 1:
            raise RequestError(400, f"max_new_tokens must be >= 1, got {max_new}")
        if "messages" in body:
            chat = parse_chat_request(body | {"model": server.name, "stream": False})
            messages, images, system = to_messages(chat, server.limits)
            encoded = server.pipe.processor.encode(images=images, messages=messages, system=system)
        elif "prompt" in body:
            images = []
            for item in body.get("images") or []:
                if not isinstance(item, str):
                    raise RequestError(400, "images must be base64 strings or data URLs")
                if item.startswith("data:"):
                    images.append(load_request_image(item, server.limits))
                else:
                    try:
                        raw = base64.b64decode(item, validate=True)
                    except (binascii.Error, ValueError):
                        raise RequestError(400, "invalid base64 image") from None
                    images.append(
                        load_request_image(
                            "data:image/png;base64," + base64.b64encode(raw).decode(), server.limits
                        )
                    )
            if len(images) > server.limits.max_images:
                raise RequestError(400, f"{len(images)} images; at most {server.limits.max_images}")
            encoded = server.pipe.processor.encode_rendered(str(body["prompt"]), images)
        else:
            raise RequestError(422, "send 'messages' (OpenAI style) or 'prompt' + 'images'")
        room = server.engine.max_len - len(encoded.input_ids)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        cfg = server.pipe.generation_config(
            max_new_tokens=max(1, min(max_new, room)),
            temperature=float(body.get("temperature", 0.0)),
            top_p=float(body.get("top_p", 1.0)),
            stop=stop,
            seed=body.get("seed"),
        )
        return encoded, cfg

    @app.post("/worker_get_status")
    async def worker_get_status():
        return {
            "model_names": [server.name],
            "speed": 1,
            "queue_length": server.queue_length,
        }

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"invalid JSON: {exc}") from None
        try:
            encoded, cfg = await run_in_threadpool(prepare, body)
        except (LlavakitError, ValueError) as exc:
            if isinstance(exc, RequestError):
                raise
            raise RequestError(400, str(exc)) from None
        handle = server.submit(encoded, cfg, asyncio.get_running_loop())

        async def stream():
            text = ""
            try:
                async for delta in handle.aiter():
                    text += delta
                    yield _chunk(text)
            except Exception as exc:
                yield _chunk(f"generation failed: {exc}", 1)
                return
            yield _chunk(text, finish_reason=handle.finish.reason)

        return StreamingResponse(stream(), media_type="application/octet-stream")

    return app


class Heartbeat(threading.Thread):
    """Register, then beat every ``interval`` seconds; re-register when forgotten."""

    def __init__(self, controller: str, address: str, server: ModelServer, interval: float) -> None:
        super().__init__(daemon=True, name="llavakit-heartbeat")
        self.controller, self.address, self.server, self.interval = (
            controller.rstrip("/"),
            address,
            server,
            interval,
        )
        self.stopped = threading.Event()

    def register(self) -> bool:
        status = {
            "model_names": [self.server.name],
            "speed": 1,
            "queue_length": self.server.queue_length,
        }
        try:
            r = httpx.post(
                self.controller + "/register_worker",
                json={
                    "worker_name": self.address,
                    "check_heart_beat": True,
                    "worker_status": status,
                },
                timeout=5,
            )
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    def run(self) -> None:
        registered = self.register()
        while not self.stopped.wait(self.interval):
            if not registered:
                registered = self.register()
                continue
            queue = self.server.queue_length
            try:
                r = httpx.post(
                    self.controller + "/receive_heart_beat",
                    json={"worker_name": self.address, "queue_length": queue},
                    timeout=5,
                )
                if not r.json().get("exist", False):
                    registered = self.register()
            except (httpx.HTTPError, ValueError):
                registered = False  # controller down: keep trying


def run_worker(
    model: str = "demo",
    controller: str = "http://127.0.0.1:10000",
    host: str = "127.0.0.1",
    port: int = 40000,
    worker_address: str | None = None,
    name: str | None = None,
    dtype: str | None = None,
    limits: ServeLimits = DEFAULT_SERVE_LIMITS,
    max_batch: int = 16,
    max_queue: int = 64,
    heartbeat: float = 15.0,
    quantize: str | None = None,
    gguf: str | None = None,
) -> None:
    import uvicorn

    server = load_server(model, name, dtype, quantize, limits, max_batch, max_queue, gguf)
    address = worker_address or f"http://{host}:{port}"
    app = create_worker_app(server)
    beat = Heartbeat(controller, address, server, heartbeat)
    beat.start()  # registration sends the status: the controller need not call back first
    print(f"llavakit: worker {server.name!r} at {address}, controller {controller}", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        beat.stopped.set()
        server.close()
