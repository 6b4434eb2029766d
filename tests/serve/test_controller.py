"""Controller + two model workers (bundled demo model), as separate processes: dispatch, a worker
killed with SIGKILL mid-stream, heartbeat expiry, the original worker API."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from llavakit.serve.client import ControllerClient, WorkerError
from tests.serve.test_openai_e2e import ROOT, SCENE, free_port, wait_healthy

EXPIRY = 3.0


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "llavakit", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )


def workers(controller: str) -> list[str]:
    return [w["address"] for w in httpx.get(controller + "/workers").json()["workers"]]


def wait_registered(controller: str, addresses: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while sorted(workers(controller)) != sorted(addresses) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted(workers(controller)) == sorted(addresses)


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    logs = tmp_path_factory.mktemp("trio")
    cport = free_port()
    controller = f"http://127.0.0.1:{cport}"
    procs = {
        "controller": spawn(
            ["controller", "--port", str(cport), "--heartbeat-expiry", str(EXPIRY)], logs / "c.log"
        )
    }
    try:
        wait_healthy(controller, procs["controller"])
        addresses = []
        for i in range(2):
            port = free_port()
            address = f"http://127.0.0.1:{port}"
            procs[address] = spawn(
                ["worker", "--port", str(port), "--controller", controller, "--heartbeat", "0.5"],
                logs / f"w{i}.log",
            )
            addresses.append(address)
        for address in addresses:
            wait_healthy(address, procs[address])
        wait_registered(controller, addresses)
        yield controller, procs
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)


def test_dispatch_and_both_worker_apis(trio):
    controller, _ = trio
    client = ControllerClient(controller)
    assert client.list_models() == ["demo"]
    import llavakit

    pipe = llavakit.load("demo")
    expected = pipe.chat([SCENE], "How many shapes are there?", max_new_tokens=12)
    from PIL import Image

    image = Image.open(SCENE)
    messages = [{"role": "user", "content": "<image>\nHow many shapes are there?"}]
    used, answers = set(), []
    for _ in range(4):  # shortest queue: consecutive requests spread over both workers
        *_, text = client.stream("demo", messages, [image], max_new_tokens=12)
        answers.append(text)
        used.add(client.last_worker)
    assert answers == [expected] * 4 and len(used) == 2
    # the original worker API: a rendered prompt with <image> and base64 images
    prompt = pipe.processor.render([("user", "<image>\nHow many shapes are there?")])
    body = {
        "prompt": prompt,
        "images": [base64.b64encode(SCENE.read_bytes()).decode()],
        "max_new_tokens": 12,
        "temperature": 0,
    }
    raw = httpx.post(client.worker_for("demo") + "/worker_generate_stream", json=body, timeout=60)
    events = [json.loads(x) for x in raw.content.split(b"\0") if x]
    assert events[-1]["text"] == expected and events[-1]["error_code"] == 0
    # ... and through the controller's relay
    raw = httpx.post(
        controller + "/worker_generate_stream", json=body | {"model": "demo"}, timeout=60
    )
    assert [json.loads(x) for x in raw.content.split(b"\0") if x][-1]["text"] == expected
    # a bad request to a worker is a clear 4xx, not a broken stream
    bad = httpx.post(
        client.worker_for("demo") + "/worker_generate_stream",
        json={"prompt": "<image> hi", "images": []},
        timeout=30,
    )
    assert bad.status_code == 400 and "image" in bad.json()["error"]["message"]


def test_worker_killed_mid_stream(trio):
    controller, procs = trio
    client = ControllerClient(controller, timeout=60)
    story = [{"role": "user", "content": "Write a very long story about a cat and a dog."}]
    stream = client.stream("demo", story, max_new_tokens=1000)
    for _ in range(3):
        next(stream)
    victim = client.last_worker
    procs[victim].send_signal(signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerError, match="stopped mid-answer|lost the connection"):
        for _ in stream:
            pass
    assert time.monotonic() - start < 10  # an error, not a hang
    # the dead worker misses its heartbeats and leaves the list within the expiry
    killed = time.monotonic()
    while victim in workers(controller) and time.monotonic() - killed < EXPIRY + 3:
        time.sleep(0.1)
    assert victim not in workers(controller)
    assert client.list_models() == ["demo"]  # still served by the live worker
    for _ in range(3):
        *_, text = client.stream(
            "demo", [{"role": "user", "content": "Say hello."}], max_new_tokens=8
        )
        assert text.strip() and client.last_worker != victim
