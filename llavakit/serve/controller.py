"""``llavakit controller``: the LLaVA controller. Workers register and send heartbeats; workers
silent for longer than the expiry drop out; requests go to the worker with the shortest queue.

Endpoints follow the original (``/register_worker``, ``/receive_heart_beat``, ``/list_models``,
``/get_worker_address``, ``/refresh_all_workers``, ``/worker_generate_stream``) plus
``GET /workers`` and ``GET /health``. The stream proxy retries another worker when one cannot
be reached, and ends with a clear error when a worker dies mid-answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

SEPARATOR = b"\0"  # the original worker stream: JSON objects separated by NUL bytes


@dataclass
class WorkerInfo:
    address: str
    model_names: list[str]
    queue_length: int = 0
    speed: float = 1.0
    check_heart_beat: bool = True
    last_beat: float = field(default_factory=time.monotonic)
    assigned: int = 0  # dispatched since the last heartbeat


class Controller:
    def __init__(self, heartbeat_expiry: float = 45.0) -> None:
        self.expiry = heartbeat_expiry
        self.workers: dict[str, WorkerInfo] = {}
        self.lock = threading.Lock()

    def register(self, address: str, status: dict | None, check: bool = True) -> bool:
        if status is None:
            status = self._probe(address)
            if status is None:
                return False
        with self.lock:
            self.workers[address] = WorkerInfo(
                address,
                list(status.get("model_names", [])),
                int(status.get("queue_length", 0)),
                float(status.get("speed", 1.0)),
                check,
            )
        return True

    def heartbeat(self, address: str, queue_length: int) -> bool:
        with self.lock:
            info = self.workers.get(address)
            if info is None:
                return False
            info.queue_length, info.last_beat, info.assigned = queue_length, time.monotonic(), 0
            return True

    def expire(self) -> list[str]:
        now = time.monotonic()
        with self.lock:
            dead = [
                a
                for a, w in self.workers.items()
                if w.check_heart_beat and now - w.last_beat > self.expiry
            ]
            for a in dead:
                del self.workers[a]
        return dead

    def remove(self, address: str) -> None:
        with self.lock:
            self.workers.pop(address, None)

    def models(self) -> list[str]:
        with self.lock:
            return sorted({m for w in self.workers.values() for m in w.model_names})

    def pick(self, model: str, exclude: set[str] = frozenset()) -> str | None:
        """Shortest queue (reported queue + requests sent since its last heartbeat)."""
        with self.lock:
            candidates = [
                w
                for w in self.workers.values()
                if model in w.model_names and w.address not in exclude
            ]
            if not candidates:
                return None
            best = min(
                candidates, key=lambda w: ((w.queue_length + w.assigned) / w.speed, w.address)
            )
            best.assigned += 1
            return best.address

    def refresh(self) -> None:
        for address in list(self.workers):
            status = self._probe(address)
            if status is None:
                self.remove(address)
            else:
                self.register(
                    address,
                    status,
                    self.workers.get(address, WorkerInfo(address, [])).check_heart_beat,
                )

    @staticmethod
    def _probe(address: str) -> dict | None:
        try:
            r = httpx.post(address + "/worker_get_status", timeout=5)
            r.raise_for_status()
            return r.json()
        except (httpx.HTTPError, ValueError):
            return None


def error_chunk(message: str, code: int = 1) -> bytes:
    return json.dumps({"text": message, "error_code": code}).encode() + SEPARATOR


def create_controller_app(controller: Controller) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        async def sweep() -> None:
            while True:
                await asyncio.sleep(max(0.2, controller.expiry / 4))
                controller.expire()

        task = asyncio.create_task(sweep())
        yield
        task.cancel()

    app = FastAPI(title="llavakit controller", lifespan=lifespan)

    @app.post("/register_worker")
    async def register_worker(request: Request):
        body = await request.json()
        ok = await asyncio.to_thread(
            controller.register,
            body["worker_name"],
            body.get("worker_status"),
            bool(body.get("check_heart_beat", True)),
        )
        if not ok:
            return JSONResponse({"error": f"cannot reach worker {body['worker_name']}"}, 400)
        return {"ok": True}

    @app.post("/receive_heart_beat")
    async def receive_heart_beat(request: Request):
        body = await request.json()
        return {
            "exist": controller.heartbeat(body["worker_name"], int(body.get("queue_length", 0)))
        }

    @app.post("/list_models")
    async def list_models():
        return {"models": controller.models()}

    @app.get("/workers")
    async def workers():
        with controller.lock:
            return {
                "workers": [
                    {
                        "address": w.address,
                        "models": w.model_names,
                        "queue_length": w.queue_length,
                        "seconds_since_heartbeat": round(time.monotonic() - w.last_beat, 2),
                    }
                    for w in controller.workers.values()
                ]
            }

    @app.post("/get_worker_address")
    async def get_worker_address(request: Request):
        body = await request.json()
        return {"address": controller.pick(body.get("model", "")) or ""}

    @app.post("/refresh_all_workers")
    async def refresh_all_workers():
        await asyncio.to_thread(controller.refresh)
        return {"models": controller.models()}

    @app.post("/remove_worker")
    async def remove_worker(request: Request):
        body = await request.json()
        controller.remove(body["worker_name"])
        return {"ok": True}

    @app.get("/health")
    async def health():
        return {"status": "ok", "workers": len(controller.workers)}

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request):
        body = await request.json()
        model = body.get("model", "")

        async def relay():
            tried: set[str] = set()
            while True:
                address = controller.pick(model, tried)
                if address is None:
                    yield error_chunk(
                        f"no worker serves model {model!r}"
                        + (" (the ones tried are unreachable)" if tried else "")
                    )
                    return
                tried.add(address)
                started = False
                try:
                    async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=5)) as client:
                        async with client.stream(
                            "POST", address + "/worker_generate_stream", json=body
                        ) as response:
                            async for chunk in response.aiter_bytes():
                                started = True
                                yield chunk
                    return
                except httpx.ConnectError:
                    controller.remove(address)  # unreachable: drop it now, try the next one
                    continue
                except httpx.HTTPError as exc:
                    if not started:
                        controller.remove(address)
                        continue
                    yield error_chunk(
                        f"worker {address} stopped mid-answer ({type(exc).__name__}); "
                        "the request was not completed, please retry"
                    )
                    return

        return StreamingResponse(relay(), media_type="application/octet-stream")

    return app


def run_controller(
    host: str = "127.0.0.1", port: int = 10000, heartbeat_expiry: float = 45.0
) -> None:
    import uvicorn

    app = create_controller_app(Controller(heartbeat_expiry))
    print(
        f"llavakit: controller on http://{host}:{port} (heartbeat expiry {heartbeat_expiry}s)",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
