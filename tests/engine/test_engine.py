"""Continuous batching engine: same greedy text as Pipeline.chat, caches, cancellation, limits."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import llavakit
from llavakit.engine.engine import Engine
from llavakit.errors import EngineBusy, PromptTooLong
from tests.conftest import random_image


@pytest.fixture(scope="module")
def next_pipe(llava_next_dir):
    return llavakit.load(llava_next_dir, dtype="float32")


@pytest.fixture
def engine(next_pipe):
    eng = Engine(next_pipe, max_batch=4, max_queue=8)
    yield eng
    eng.close()


def _cfg(pipe, **kw):
    return pipe.generation_config(**({"max_new_tokens": 10} | kw))


REQUESTS = [
    ([random_image(80, 40, 1)], "What is in the image?", 10),
    ([random_image(23, 97, 2)], "Describe it.", 4),
    ([random_image(56, 56, 3)], "How many shapes?", 13),
    ([random_image(150, 31, 4), random_image(40, 41, 5)], "Compare them.", 7),
    ([], "Hello there, how are you?", 9),
    ([random_image(60, 60, 6)], "Again?", 1),
]


def test_concurrent_requests_equal_chat_one_by_one(next_pipe, engine):
    expected = [next_pipe.chat(im, p, max_new_tokens=n) for im, p, n in REQUESTS]
    assert len(set(expected)) > 2
    # 6 requests, 4 slots: requests join as others leave (different lengths)
    handles = [
        engine.submit(next_pipe.encode(im, p), _cfg(next_pipe, max_new_tokens=n))
        for im, p, n in REQUESTS
    ]
    got = [h.text() for h in handles]
    assert got == expected
    for h, (_, _, n) in zip(handles, REQUESTS, strict=True):
        assert h.finish.reason in ("stop", "length") and 0 < h.finish.completion_tokens <= n
    assert engine.stats.decode_steps < sum(n for _, _, n in REQUESTS)  # rows shared steps
    assert engine.running == 0 and engine.queue_depth == 0


def test_streamed_deltas_and_seeded_sampling_match_pipeline(next_pipe, engine):
    image = random_image(64, 48, 9)
    kw = dict(max_new_tokens=10, temperature=1.5, top_p=0.95, seed=123)
    pieces = list(engine.submit(next_pipe.encode([image], "Tell me."), _cfg(next_pipe, **kw)))
    assert len(pieces) > 1
    assert "".join(pieces) == next_pipe.chat([image], "Tell me.", **kw)
    # per-request settings: a greedy request and a sampled one side by side
    a = engine.submit(next_pipe.encode([image], "Tell me."), _cfg(next_pipe, **kw))
    b = engine.submit(next_pipe.encode([image], "Tell me."), _cfg(next_pipe))
    assert a.text() == "".join(pieces)
    assert b.text() == next_pipe.chat([image], "Tell me.", max_new_tokens=10)


def test_follow_up_turn_reuses_image_features_and_prefix(next_pipe, engine):
    image = random_image(90, 70, 11)
    first = engine.submit(next_pipe.encode([image], "What is it?"), _cfg(next_pipe))
    answer = first.text()
    misses = engine.stats.image_misses
    messages = [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And the colour?"},
    ]
    enc = next_pipe.processor.encode(images=[image], messages=messages)
    second = engine.submit(enc, _cfg(next_pipe))
    text = second.text()
    assert engine.stats.prefix_hits >= 1
    assert second.finish.cached_tokens > len(first_prompt_ids(next_pipe, image)) - 1
    assert engine.stats.image_misses == misses  # the image was not encoded again
    assert text == next_pipe.chat([image], messages=messages, max_new_tokens=10)


def first_prompt_ids(pipe, image):
    return pipe.encode([image], "What is it?").input_ids


def test_cancel_frees_the_slot_at_the_next_step(next_pipe, engine):
    handle = engine.submit(
        next_pipe.encode([random_image(50, 50, 3)], "Go on."), _cfg(next_pipe, max_new_tokens=500)
    )
    pieces = iter(handle)
    next(pieces)
    assert engine.running == 1
    handle.cancel()
    rest = list(pieces)
    assert handle.finish.reason == "cancelled"
    assert handle.finish.completion_tokens < 500 and len(rest) < 50
    deadline = time.monotonic() + 5
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running == 0 and engine.stats.cancelled == 1


def test_queue_is_bounded_and_prompt_past_context_is_refused(next_pipe):
    eng = Engine(next_pipe, max_batch=1, max_queue=2, max_len=128)
    try:
        long = eng.submit(next_pipe.encode(None, "hi"), _cfg(next_pipe, max_new_tokens=100))
        handles, busy = [], 0
        for _ in range(6):
            try:
                handles.append(eng.submit(next_pipe.encode(None, "hi"), _cfg(next_pipe)))
            except EngineBusy as exc:
                busy += 1
                assert "queue is full" in str(exc)
        assert busy >= 3 and eng.stats.rejected == busy
        with pytest.raises(PromptTooLong):
            eng.submit(next_pipe.encode(None, "word " * 200), _cfg(next_pipe))
        long.cancel()
        assert all(isinstance(h.text(), str) for h in handles)
        # the KV buffer never passes slots x max_len, whatever was served
        k = eng.cache.k[0]
        assert k.shape[0] == 1 and k.shape[2] == 128
    finally:
        eng.close()


def test_kv_cache_grows_on_demand_up_to_max_len(next_pipe):
    eng = Engine(next_pipe, max_batch=2, max_len=1000)
    try:
        assert eng.cache.capacity == 256
        small = eng.cache.nbytes
        enc = next_pipe.encode(None, "word " * 60)
        new = 400 - len(enc.input_ids)  # prompt + answer = 400 positions
        text = eng.generate(enc, _cfg(next_pipe, max_new_tokens=new, ignore_eos=True))
        assert text == next_pipe.chat(None, "word " * 60, max_new_tokens=new, ignore_eos=True)
        assert eng.cache.capacity == 512 and eng.cache.nbytes == 2 * small
        long = next_pipe.encode(None, "word " * 60)
        eng.generate(long, _cfg(next_pipe, max_new_tokens=900, ignore_eos=True))
        assert eng.cache.capacity == 1000  # capped at max_len
    finally:
        eng.close()


def test_many_threads_share_the_engine(next_pipe):
    engine = Engine(next_pipe, max_batch=4, max_queue=16)
    prompts = [f"Question number {i}?" for i in range(10)]
    expected = [next_pipe.chat(None, p, max_new_tokens=6) for p in prompts]
    results = [None] * len(prompts)

    def client(i):
        results[i] = engine.submit(
            next_pipe.encode(None, prompts[i]), _cfg(next_pipe, max_new_tokens=6)
        ).text()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    engine.close()
    assert results == expected


def test_bad_request_does_not_stop_the_engine(next_pipe, engine):
    enc = next_pipe.encode([random_image(40, 40, 1)], "Hi")
    enc.pixel_values = [torch.zeros(1, 3, 7, 7)]  # wrong tile size: the vision tower fails
    handle = engine.submit(enc, _cfg(next_pipe))
    with pytest.raises(Exception):  # noqa: B017 - any error, delivered to this request only
        handle.text()
    assert handle.finish.reason == "error"
    assert engine.generate(next_pipe.encode(None, "Hello"), _cfg(next_pipe)) == next_pipe.chat(
        None, "Hello", max_new_tokens=10
    )
