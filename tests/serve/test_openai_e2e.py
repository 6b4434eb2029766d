"""``llavakit serve`` in a subprocess with the bundled demo model, driven by the openai client."""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[2]
SCENE = ROOT / "examples" / "scene.png"
KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(
    url: str, proc: subprocess.Popen, timeout: float = 240, path: str = "/health"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


@pytest.fixture(scope="module", params=["torch", "gguf-q8_0"])
def server_url(request, tmp_path_factory):
    """The same tests against the PyTorch engine and the llama.cpp (GGUF q8_0) engine."""
    port = free_port()
    backend = ["--gguf", "q8_0"] if request.param == "gguf-q8_0" else []
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "LLAVAKIT_API_KEY": KEY}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llavakit",
                "serve",
                "--port",
                str(port),
                "--no-ui",
                "--max-batch",
                "16",
                *backend,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture
def client(server_url):
    return OpenAI(base_url=server_url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def image_message(question: str) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(SCENE.read_bytes()).decode()
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": question},
            ],
        }
    ]


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_image_question_streaming_and_not_give_the_same_answer(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"]
    messages = image_message("How many shapes are there?")
    reply = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=16, temperature=0
    )
    text = reply.choices[0].message.content
    assert text.strip()
    assert reply.usage.prompt_tokens > 10 and reply.usage.completion_tokens >= 1
    stream = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=16, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == text
    import llavakit

    assert text == llavakit.load("demo").chat(
        [SCENE], "How many shapes are there?", max_new_tokens=16
    )


def test_sixteen_concurrent_streaming_clients_all_complete(client, server_url):
    questions = [
        "How many shapes are there?",
        "What colour is the circle?",
        "What shape is the yellow object?",
        "Describe the image.",
    ]
    results: dict[int, tuple[str, str | None]] = {}

    def run(i: int) -> None:
        stream = client.chat.completions.create(
            model="demo",
            messages=image_message(questions[i % 4]),
            max_tokens=24,
            temperature=0,
            stream=True,
        )
        text, reason = "", None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        results[i] = (text, reason)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == 16
    assert all(text.strip() and reason in ("stop", "length") for text, reason in results.values())
    for i in range(4, 16):  # same question, same greedy answer, whatever the batch around it
        assert results[i][0] == results[i % 4][0]
    assert metric(server_url, "llavakit_running_requests") == 0


def test_closed_stream_frees_its_slot(client, server_url):
    cancelled = metric(server_url, "llavakit_requests_cancelled_total")
    stream = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Write a very long story about a cat and a dog."}],
        max_tokens=1000,
        temperature=0,
        stream=True,
    )
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got >= 3:
            break
    assert metric(server_url, "llavakit_running_requests") == 1
    stream.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if metric(server_url, "llavakit_running_requests") == 0:
            break
        time.sleep(0.05)
    assert metric(server_url, "llavakit_running_requests") == 0
    assert metric(server_url, "llavakit_requests_cancelled_total") == cancelled + 1


def test_wrong_api_key_is_401(server_url):
    bad = OpenAI(base_url=server_url + "/v1", api_key="wrong", max_retries=0)
    from openai import AuthenticationError

    with pytest.raises(AuthenticationError, match="invalid API key"):
        bad.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
