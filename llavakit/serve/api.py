"""``llavakit serve``: an OpenAI-compatible chat API over the continuous-batching engine.

Routes: ``POST /v1/chat/completions`` (text + ``image_url`` parts, ``stream: true`` as
server-sent events), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text),
and the Gradio web UI at ``/ui``. Every refusal is JSON ``{"error": {"message", "type",
"code"}}`` with a status that says what was wrong; the server keeps serving.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llavakit.engine.engine import Engine, Finish
from llavakit.errors import (
    EngineBusy,
    EngineStopped,
    ImageCountMismatch,
    LlavakitError,
    PromptTooLong,
)
from llavakit.serve.requests import (
    ChatRequest,
    RequestError,
    ServeLimits,
    parse_chat_request,
    to_messages,
)

DEFAULT_MAX_TOKENS = 512
DEFAULT_SERVE_LIMITS = ServeLimits()


class ModelServer:
    """One model, its engine and its counters; the app's routes call into it."""

    def __init__(
        self,
        pipe,
        name: str = "llavakit",
        limits: ServeLimits = DEFAULT_SERVE_LIMITS,
        max_batch: int = 16,
        max_queue: int = 64,
        engine: Engine | None = None,
    ) -> None:
        self.pipe, self.name, self.limits = pipe, name, limits
        self.engine = engine or Engine(pipe, max_batch=max_batch, max_queue=max_queue)
        self.errors: Counter[int] = Counter()
        self.started = int(time.time())

    def close(self) -> None:
        self.engine.close()

    # -- requests ----------------------------------------------------------------------------
    def prepare(self, request: ChatRequest):
        """Check the model, decode images, encode the prompt: (encoded, GenerationConfig)."""
        if request.model not in (self.name, "default"):
            raise RequestError(
                404,
                f"model {request.model!r} not found; this server serves {self.name!r}",
                "not_found_error",
            )
        messages, images, system = to_messages(request, self.limits)
        try:
            encoded = self.pipe.processor.encode(images=images, messages=messages, system=system)
        except PromptTooLong as exc:
            raise RequestError(400, str(exc)) from None
        except (ImageCountMismatch, LlavakitError, ValueError) as exc:
            raise RequestError(400, str(exc)) from None
        context = self.engine.max_len
        room = context - len(encoded.input_ids)
        asked = request.max_completion_tokens or request.max_tokens
        if asked is not None and asked > room:
            raise RequestError(
                400,
                f"max_tokens={asked} plus the prompt's {len(encoded.input_ids)} tokens exceeds "
                f"the model's context of {context} tokens (at most {room} new tokens fit)",
            )
        stop = request.stop
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stop) > 4 or any(not isinstance(s, str) or len(s) > 256 for s in stop):
            raise RequestError(400, "stop: at most 4 strings of at most 256 characters")
        cfg = self.pipe.generation_config(
            max_new_tokens=asked or min(room, DEFAULT_MAX_TOKENS),
            temperature=request.temperature,
            top_p=request.top_p,
            stop=stop,
            seed=request.seed,
            ignore_eos=request.ignore_eos,
        )
        return encoded, cfg

    @property
    def queue_length(self) -> int:
        """Requests waiting or running (what a worker reports to the controller)."""
        return self.engine.queue_depth + self.engine.running

    def submit(self, encoded, cfg, loop):
        try:
            return self.engine.submit(encoded, cfg, loop=loop)
        except EngineBusy as exc:
            raise RequestError(429, str(exc), "rate_limit_error") from None
        except EngineStopped as exc:
            raise RequestError(503, str(exc), "server_error") from None
        except PromptTooLong as exc:
            raise RequestError(400, str(exc)) from None

    def metrics(self) -> str:
        s, e = self.engine.stats, self.engine
        rows = [
            ("llavakit_queue_depth", "gauge", "Requests waiting for a slot.", e.queue_depth),
            ("llavakit_running_requests", "gauge", "Requests in the running batch.", e.running),
            ("llavakit_batch_slots", "gauge", "Slots of the running batch.", e.max_batch),
            (
                "llavakit_tokens_per_second",
                "gauge",
                "Generated tokens/s over 10 s.",
                round(s.tokens_per_second(), 3),
            ),
            ("llavakit_requests_total", "counter", "Requests accepted.", s.requests),
            ("llavakit_requests_finished_total", "counter", "Requests completed.", s.finished),
            ("llavakit_requests_cancelled_total", "counter", "Requests cancelled.", s.cancelled),
            ("llavakit_requests_rejected_total", "counter", "Refused: queue full.", s.rejected),
            ("llavakit_prompt_tokens_total", "counter", "Prompt tokens.", s.prompt_tokens),
            ("llavakit_generated_tokens_total", "counter", "Tokens generated.", s.generated_tokens),
            (
                "llavakit_prefix_cache_hits_total",
                "counter",
                "Prompts reusing cached KV.",
                s.prefix_hits,
            ),
            (
                "llavakit_prefix_cache_tokens_reused_total",
                "counter",
                "Prompt tokens not prefilled.",
                s.prefix_tokens_reused,
            ),
            ("llavakit_image_cache_hits_total", "counter", "Images not re-encoded.", s.image_hits),
            ("llavakit_image_cache_misses_total", "counter", "Images encoded.", s.image_misses),
        ]
        lines = []
        for name, kind, help_, value in rows:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        lines += [
            "# HELP llavakit_http_errors_total Refused requests by status.",
            "# TYPE llavakit_http_errors_total counter",
        ]
        lines += [
            f'llavakit_http_errors_total{{status="{k}"}} {v}'
            for k, v in sorted(self.errors.items())
        ]
        return "\n".join(lines) + "\n"


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def usage(finish: Finish) -> dict[str, Any]:
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": finish.cached_tokens},
    }


def create_app(server: ModelServer, api_key: str | None = None, ui: bool = True) -> FastAPI:
    """The FastAPI app for ``server``; ``api_key`` guards /v1 and /metrics."""
    import asyncio

    app = FastAPI(title="llavakit", version="0.1", docs_url="/docs", redoc_url=None)
    app.state.server = server

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        server.errors[status] += 1
        return JSONResponse(
            {"error": {"message": message, "type": kind, "code": status}}, status_code=status
        )

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError):
        return error(exc.status, exc.message, exc.kind)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return error(422, f"invalid request: {exc.errors()[:3]}")

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        return error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise RequestError(
                401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error"
            )
        if not secrets.compare_digest(header[7:].strip(), api_key):
            raise RequestError(401, "invalid API key", "authentication_error")

    async def read_json(request: Request) -> Any:
        limit = server.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestError(
                413, f"request body of {declared} bytes is over the {limit}-byte limit"
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, f"request body is over the {limit}-byte limit")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"invalid JSON in the request body: {exc}") from None

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": server.name,
            "running": server.engine.running,
            "queue": server.engine.queue_depth,
        }

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": server.name,
                    "object": "model",
                    "created": server.started,
                    "owned_by": "llavakit",
                }
            ],
        }

    @app.get("/metrics")
    async def metrics(request: Request):
        check_key(request)
        return PlainTextResponse(server.metrics(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        chat = parse_chat_request(await read_json(request))
        encoded, cfg = await run_in_threadpool(server.prepare, chat)
        handle = server.submit(encoded, cfg, asyncio.get_running_loop())
        cid, created = completion_id(), int(time.time())
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return StreamingResponse(
                _sse(handle, cid, created, server.name, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        pieces = []
        try:
            async for delta in handle.aiter():
                pieces.append(delta)
        except Exception as exc:
            raise RequestError(500, f"generation failed: {exc}", "server_error") from None
        finish = handle.finish
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": server.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(pieces)},
                    "finish_reason": finish.reason,
                    "logprobs": None,
                }
            ],
            "usage": usage(finish),
        }

    if ui:
        from llavakit.serve.webui import mount_ui

        mount_ui(app, server, api_key)
    return app


async def _sse(
    handle, cid: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[str]:
    def chunk(delta: dict, finish_reason: str | None = None, **extra: Any) -> str:
        body = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            ],
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for delta in handle.aiter():
            yield chunk({"content": delta})
    except Exception as exc:  # reported in-band: the status line is already sent
        payload = {
            "error": {"message": f"generation failed: {exc}", "type": "server_error", "code": 500}
        }
        yield f"data: {json.dumps(payload)}\n\n"
        return
    finish = handle.finish
    yield chunk({}, finish.reason)
    if include_usage:
        body = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage(finish),
        }
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


def serve(
    model: str = "demo",
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    name: str | None = None,
    dtype: str | None = None,
    limits: ServeLimits = DEFAULT_SERVE_LIMITS,
    max_batch: int = 16,
    max_queue: int = 64,
    ui: bool = True,
    quantize: str | None = None,
    gguf: str | None = None,
) -> None:
    """Load ``model`` and serve it until interrupted (binds 127.0.0.1 unless told otherwise)."""
    import uvicorn

    server = load_server(model, name, dtype, quantize, limits, max_batch, max_queue, gguf)
    app = create_app(server, api_key=api_key, ui=ui)
    print(f"llavakit: serving {server.name!r} on http://{host}:{port} (UI: /ui)", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        server.close()


def load_server(
    model: str = "demo",
    name: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    limits: ServeLimits = DEFAULT_SERVE_LIMITS,
    max_batch: int = 16,
    max_queue: int = 64,
    gguf: str | None = None,
) -> ModelServer:
    """Load (and optionally quantize) ``model`` behind a ModelServer: ``serve`` and ``worker``.

    ``gguf`` ("f16" / "q8_0"): the language model runs in llama.cpp (``GGUFEngine``).
    """
    import llavakit

    if quantize and gguf:
        raise ValueError("use either --quantize (PyTorch int8) or --gguf (llama.cpp), not both")
    pipe = llavakit.load(model, dtype=dtype)
    if quantize:
        from llavakit.engine.quant import quantize_pipeline

        quantize_pipeline(pipe, quantize)
    engine = None
    if gguf:
        from llavakit.demo import resolve_model
        from llavakit.engine.gguf import GGUFEngine, gguf_for

        path = gguf_for(pipe, resolve_model(model), gguf)
        engine = GGUFEngine(pipe, path, max_batch=max_batch, max_queue=max_queue)
    return ModelServer(pipe, name or _model_name(model), limits, max_batch, max_queue, engine)


def _model_name(model: str) -> str:
    from pathlib import Path

    return "demo" if model in ("demo", "") else Path(model.rstrip("/")).name or model
