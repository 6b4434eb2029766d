"""OpenAI-compatible API in-process (tiny model): answers, streaming, metrics, every refusal."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
from fastapi.testclient import TestClient

import llavakit
from llavakit.serve.api import ModelServer, create_app
from llavakit.serve.requests import ServeLimits
from tests.conftest import png_claiming, random_image


def data_url(image=None, fmt="PNG", raw: bytes | None = None, mime="image/png") -> str:
    if raw is None:
        buf = io.BytesIO()
        image.save(buf, fmt)
        raw = buf.getvalue()
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def user(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def pipe(llava15_dir):
    return llavakit.load(llava15_dir, dtype="float32")


@pytest.fixture(scope="module")
def server(pipe):
    srv = ModelServer(pipe, "tiny", ServeLimits(max_images=2, max_body_bytes=2_000_000), 4, 8)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    with TestClient(create_app(server, api_key="sekret", ui=False)) as c:
        c.headers["Authorization"] = "Bearer sekret"
        yield c


def test_answer_equals_chat_and_streaming_equals_non_streaming(client, pipe):
    image = random_image(60, 40, 3)
    body = {"model": "tiny", "messages": user("What is this?", data_url(image)), "max_tokens": 12}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    text = out["choices"][0]["message"]["content"]
    assert text == pipe.chat([image], "What is this?", max_new_tokens=12)
    assert out["object"] == "chat.completion" and out["choices"][0]["finish_reason"] in (
        "stop",
        "length",
    )
    assert out["usage"]["completion_tokens"] > 0
    assert (
        out["usage"]["total_tokens"]
        == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    )
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == text and len(chunks) > 3
    assert chunks[-1]["usage"]["completion_tokens"] == out["usage"]["completion_tokens"]
    assert chunks[-2]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]


def test_models_health_metrics(client, server):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.get("/health").json()["status"] == "ok"
    text = client.get("/metrics").text
    for name in ("queue_depth", "running_requests", "tokens_per_second", "prefix_cache_hits_total"):
        assert f"llavakit_{name} " in text
    assert "# TYPE llavakit_generated_tokens_total counter" in text


def test_follow_up_turn_hits_the_caches(client, server):
    image = random_image(50, 50, 8)
    url = data_url(image)
    first = client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": user("Describe.", url), "max_tokens": 6},
    ).json()
    hits = server.engine.stats.image_hits
    messages = user("Describe.", url) + [
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
        {"role": "user", "content": "More?"},
    ]
    second = client.post(
        "/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 6}
    ).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert server.engine.stats.image_hits == hits  # prefix covered the image: not even a lookup


def _err(r, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    message = r.json()["error"]["message"]
    for w in words:
        assert w.lower() in message.lower(), message


BAD = [
    ("invalid json", b"{not json", 400, ["invalid JSON"]),
    ("not an object", b"[1, 2]", 400, ["JSON object"]),
    ("missing messages", {"model": "tiny"}, 422, ["messages"]),
    ("empty messages", {"model": "tiny", "messages": []}, 422, ["messages"]),
    ("unknown model", {"model": "gpt-9", "messages": user("hi")}, 404, ["gpt-9", "tiny"]),
    (
        "invalid base64",
        {"model": "tiny", "messages": user("hi", "data:image/png;base64,@@@notbase64")},
        400,
        ["base64"],
    ),
    (
        "non-image data url",
        {"model": "tiny", "messages": user("hi", "data:text/plain;base64,aGVsbG8=")},
        400,
        ["not an image"],
    ),
    (
        "not an image inside",
        {"model": "tiny", "messages": user("hi", data_url(raw=b"hello world"))},
        400,
        ["not a recognised image"],
    ),
    (
        "decompression bomb",
        {"model": "tiny", "messages": user("hi", data_url(raw=png_claiming(40000, 40000)))},
        413,
        ["pixels"],
    ),
    (
        "too many images",
        {
            "model": "tiny",
            "messages": user("hi", *[data_url(random_image(8, 8, i)) for i in range(3)]),
        },
        400,
        ["3 images", "at most 2"],
    ),
    (
        "url without the flag",
        {"model": "tiny", "messages": user("hi", "https://example.com/cat.png")},
        400,
        ["--allow-url-fetch"],
    ),
    (
        "file url",
        {"model": "tiny", "messages": user("hi", "file:///etc/passwd")},
        400,
        ["scheme"],
    ),
    (
        "max_tokens negative",
        {"model": "tiny", "messages": user("hi"), "max_tokens": -5},
        422,
        ["max_tokens"],
    ),
    (
        "max_tokens past the context",
        {"model": "tiny", "messages": user("hi"), "max_tokens": 100000},
        400,
        ["context"],
    ),
    (
        "prompt past the context",
        {"model": "tiny", "messages": user("word " * 3000)},
        400,
        ["context"],
    ),
    (
        "bad temperature",
        {"model": "tiny", "messages": user("hi"), "temperature": 9},
        422,
        ["temperature"],
    ),
    ("n > 1", {"model": "tiny", "messages": user("hi"), "n": 3}, 422, ["n"]),
    (
        "image placeholder in text",
        {"model": "tiny", "messages": [{"role": "user", "content": "<image> hi"}]},
        400,
        ["image_url"],
    ),
    (
        "assistant last",
        {"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]},
        400,
        ["last message"],
    ),
]


@pytest.mark.parametrize("name,body,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_specific_errors_and_the_server_keeps_serving(
    client, pipe, name, body, status, words
):
    if isinstance(body, bytes):
        r = client.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    else:
        r = client.post("/v1/chat/completions", json=body)
    _err(r, status, *words)
    ok = client.post(
        "/v1/chat/completions", json={"model": "tiny", "messages": user("hi"), "max_tokens": 3}
    )
    assert ok.status_code == 200
    assert ok.json()["choices"][0]["message"]["content"] == pipe.chat(None, "hi", max_new_tokens=3)


def test_body_too_large_and_auth(client, server):
    big = {"model": "tiny", "messages": user("x" * 2_100_000)}
    _err(client.post("/v1/chat/completions", json=big), 413, "limit")
    body = {"model": "tiny", "messages": user("hi"), "max_tokens": 2}
    r = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
    _err(r, 401, "invalid API key")
    r = client.post("/v1/chat/completions", json=body, headers={"Authorization": ""})
    _err(r, 401, "missing API key")
    _err(client.get("/metrics", headers={"Authorization": "Bearer nope"}), 401, "API key")
    assert client.get("/health", headers={"Authorization": ""}).status_code == 200
    assert 'llavakit_http_errors_total{status="401"}' in client.get("/metrics").text


def test_full_queue_is_429(pipe):
    srv = ModelServer(pipe, "tiny", ServeLimits(), max_batch=1, max_queue=1)
    try:
        with TestClient(create_app(srv, ui=False)) as c:
            long = {"model": "tiny", "messages": user("go"), "max_tokens": 200}

            def block():
                return srv.engine.submit(
                    pipe.encode(None, "go"),
                    pipe.generation_config(max_new_tokens=400, ignore_eos=True),
                )

            blockers = [block()]
            while srv.engine.running < 1:  # the first holds the only slot ...
                time.sleep(0.01)
            blockers.append(block())  # ... the second fills the queue
            _err(c.post("/v1/chat/completions", json=long), 429, "queue is full")
            for h in blockers:
                h.cancel()
    finally:
        srv.close()


def test_private_address_refused_even_with_the_flag(pipe):
    srv = ModelServer(pipe, "tiny", ServeLimits(allow_url_fetch=True), max_batch=1)
    try:
        with TestClient(create_app(srv, ui=False)) as c:
            for url in (
                "http://127.0.0.1:9/x.png",
                "http://10.1.2.3/x.png",
                "http://localhost/a.png",
            ):
                body = {"model": "tiny", "messages": user("hi", url)}
                _err(c.post("/v1/chat/completions", json=body), 400, "non-public")
    finally:
        srv.close()
