"""GGUF backend: the demo model's LM in llama.cpp, its images encoded by llavakit."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
import torch

import llavakit
from llavakit.cli import main
from llavakit.demo import demo_checkpoint
from llavakit.engine import gguf
from llavakit.engine.gguf import GGUFEngine, GGUFPipeline, GGUFUnavailable, convert_lm, load_gguf
from llavakit.errors import PromptTooLong

ROOT = Path(__file__).resolve().parents[2]
SCENE, ITEM = str(ROOT / "examples" / "scene.png"), str(ROOT / "examples" / "fashion_item.png")
QUESTIONS = [
    (SCENE, "How many shapes are there?"),
    (SCENE, "Where is the blue square?"),
    (SCENE, "Is there a yellow triangle?"),
    (ITEM, "What is this item?"),
]


@pytest.fixture(scope="module")
def torch_pipe():
    return llavakit.load("demo", dtype="float32")


@pytest.fixture(scope="module")
def q8(torch_pipe):
    pipe = load_gguf("demo", "q8_0", n_threads=2, dtype="float32")
    yield pipe
    pipe.close()


def test_q8_0_answers_equal_the_torch_model(q8, torch_pipe):
    for image, question in QUESTIONS:
        want = torch_pipe.chat([image], question, max_new_tokens=16)
        assert q8.chat([image], question, max_new_tokens=16) == want, question
    text = "What is the capital of France?"
    assert "Paris" in q8.chat(prompt=text, max_new_tokens=24)
    batch = q8.generate_batch(
        [{"images": [i], "prompt": q} for i, q in QUESTIONS], max_new_tokens=16
    )
    assert batch == [torch_pipe.chat([i], q, max_new_tokens=16) for i, q in QUESTIONS]
    pieces = list(q8.stream([SCENE], QUESTIONS[0][1], max_new_tokens=16))
    assert "".join(pieces) == torch_pipe.chat([SCENE], QUESTIONS[0][1], max_new_tokens=16)


def test_f16_logits_match_the_torch_model(torch_pipe):
    """The converted LM fed llavakit's image features gives the torch model's next-token
    distribution (logit-checked conversion)."""
    path = gguf.gguf_for(torch_pipe, demo_checkpoint(), "f16")
    f16 = GGUFPipeline(torch_pipe, path, n_threads=2)
    try:
        enc = torch_pipe.encode([SCENE], "Where is the blue square?")
        keys, rows = f16._keys(enc)
        f16._prefill(keys, rows)
        got = f16._logits()
        batch = torch_pipe.processor.collate([enc])
        with torch.no_grad():
            out = torch_pipe.model(
                batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_sizes
            )
        want = out.logits[0, -1].float()
        cos = torch.nn.functional.cosine_similarity(got, want, dim=0)
        assert cos > 0.999, cos
        assert got.argmax() == want.argmax()
        assert (got.softmax(-1) - want.softmax(-1)).abs().max() < 0.02
    finally:
        f16.close()


def test_follow_up_reuses_the_image_and_the_prefix(q8, torch_pipe):
    q8.reset()
    first = [{"role": "user", "content": "<image>\nHow many shapes are there?"}]
    answer = q8.chat([SCENE], messages=first, max_new_tokens=16)
    before = dict(q8.stats)
    messages = first + [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Where is the blue square?"},
    ]
    second = q8.chat([SCENE], messages=messages, max_new_tokens=16)
    assert second == torch_pipe.chat([SCENE], messages=messages, max_new_tokens=16)
    assert q8.stats["image_cache_hits"] == before["image_cache_hits"] + 1  # not re-encoded
    prompt = len(torch_pipe.encode([SCENE], messages=messages).input_ids)
    prefilled = q8.stats["prefilled"] - before["prefilled"]
    reused = q8.stats["reused"] - before["reused"]
    assert prefilled + reused == prompt
    assert prefilled < 20 and reused > prompt / 2, (prefilled, reused)  # only the new turn
    # a different image shares only the template's opening tokens
    q8.chat([ITEM], "How many shapes are there?", max_new_tokens=2)
    assert q8.stats["reused"] - before["reused"] - reused < 10


def test_sampling_is_seeded_and_the_context_is_checked(q8, torch_pipe):
    a = q8.chat([SCENE], "Describe the image.", max_new_tokens=12, temperature=1.0, seed=7)
    b = q8.chat([SCENE], "Describe the image.", max_new_tokens=12, temperature=1.0, seed=7)
    assert a == b and a
    small = GGUFPipeline(q8.pipe, q8.lm.path, n_threads=1, n_ctx=32)
    try:
        with pytest.raises(PromptTooLong, match="context is 32 tokens"):
            small.chat([SCENE], "Describe the image in great detail, please. " * 3)
        assert small.chat([SCENE], "How many shapes are there?", max_new_tokens=4) == "3"
    finally:
        small.close()


def test_a_failed_conversion_leaves_the_old_file(tmp_path, monkeypatch, torch_pipe):
    fake = tmp_path / "convert_hf_to_gguf.py"
    fake.write_text("import sys\nsys.exit('unsupported architecture XYZ')\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(gguf, "find_converter", lambda: fake)
    out = tmp_path / "lm-q8_0.gguf"
    out.write_bytes(b"previous conversion")
    lm = torch_pipe.model.language_model
    with pytest.raises(GGUFUnavailable, match="unsupported architecture XYZ"):
        convert_lm(lm, torch_pipe.tokenizer, out, "q8_0")
    assert out.read_bytes() == b"previous conversion"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(ValueError, match="outtype"):
        convert_lm(lm, torch_pipe.tokenizer, out, "q4_k")


def test_cli_chat_with_gguf(capsys):
    assert main(["chat", "--gguf", "q8_0", "--image", SCENE, "How many shapes are there?"]) == 0
    assert capsys.readouterr().out.strip() == "3"


def test_missing_llama_cpp_is_a_clear_error(block_import, torch_pipe, tmp_path):
    block_import("llama_cpp")
    with pytest.raises(GGUFUnavailable, match="make llamacpp"):
        GGUFPipeline(torch_pipe, tmp_path / "missing.gguf")
    assert os.path.exists(tmp_path) and not (tmp_path / "missing.gguf").exists()


@pytest.fixture(scope="module")
def engine(q8):
    eng = GGUFEngine(q8.pipe, q8.lm.path, max_batch=3, max_queue=8, prefix_entries=2, n_threads=2)
    yield eng
    eng.close()


def test_engine_batches_and_equals_the_pipeline(engine, q8):
    pipe = q8.pipe
    asks = QUESTIONS + [(SCENE, "Describe the image."), (ITEM, "Describe the item.")]
    steps = engine.stats.decode_steps
    handles = [
        engine.submit(pipe.encode([image], q), pipe.generation_config(max_new_tokens=12))
        for image, q in asks
    ]
    texts = [h.text() for h in handles]
    assert texts == [q8.chat([image], q, max_new_tokens=12) for image, q in asks]
    tokens = sum(h.finish.completion_tokens for h in handles)
    assert engine.stats.decode_steps - steps < tokens - len(asks)  # rows shared decode steps
    assert engine.running == 0


def test_engine_cancel_frees_the_sequence_and_follow_ups_reuse_the_prefix(engine, q8):
    pipe, lm = q8.pipe, engine.lm
    story = pipe.encode(None, "Write a very long story about a cat.")
    handle = engine.submit(story, pipe.generation_config(max_new_tokens=400, ignore_eos=True))
    pieces = iter(handle)
    next(pieces), next(pieces)
    assert engine.running == 1
    handle.cancel()
    deadline = time.monotonic() + 10
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.running == 0
    list(pieces)  # the stream ends
    assert handle.finish.reason == "cancelled" and handle.finish.completion_tokens < 400
    assert lm.lib.llama_memory_seq_pos_max(lm.mem, 0) == -1  # its KV cells are free
    first = [{"role": "user", "content": "<image>\nHow many shapes are there?"}]
    cfg = pipe.generation_config(max_new_tokens=8)
    answer = engine.generate(pipe.encode([SCENE], messages=first), cfg)
    hits = engine.stats.prefix_hits
    messages = first + [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Where is the blue square?"},
    ]
    again = engine.submit(pipe.encode([SCENE], messages=messages), cfg)
    assert again.text() == q8.chat([SCENE], messages=messages, max_new_tokens=8)
    assert engine.stats.prefix_hits == hits + 1 and again.finish.cached_tokens > 20
