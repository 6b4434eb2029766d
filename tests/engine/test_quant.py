"""Quantized inference: int8 layers in the LM, close logits, same engine behaviour."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import llavakit
from llavakit.engine.engine import Engine
from llavakit.engine.quant import QuantizationUnavailable, quantize_pipeline
from tests.conftest import random_image


def close_and_engine_matches(ref, q, seed: int, min_cos: float) -> None:
    """Logits of ``q`` differ from ``ref`` but stay close; the engine on ``q`` equals its chat."""
    image = random_image(40, 30, seed)
    batch = ref.processor.collate([ref.encode([image], "What is it?")])
    with torch.no_grad():
        a = ref.model(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_sizes)
        b = q.model(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_sizes)
    cos = torch.nn.functional.cosine_similarity(
        a.logits.float().flatten(), b.logits.float().flatten(), dim=0
    )
    assert not torch.equal(a.logits, b.logits) and cos > min_cos, cos  # quantized, but close
    engine = Engine(q, max_batch=2)
    try:
        cfg = q.generation_config(max_new_tokens=8)
        assert engine.generate(q.encode([image], "What is it?"), cfg) == q.chat(
            [image], "What is it?", max_new_tokens=8
        )
    finally:
        engine.close()


def test_int8_replaces_linear_layers_and_stays_close(llava15_dir):
    ref = llavakit.load(llava15_dir, dtype="float32")
    q = quantize_pipeline(llavakit.load(llava15_dir, dtype="float32"), "int8")
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    layers = [
        m for m in q.model.language_model.modules() if isinstance(m, torch.nn.Linear | dynamic)
    ]
    assert layers and all(isinstance(m, dynamic) for m in layers)
    assert type(q.model.multi_modal_projector.linear_1) is torch.nn.Linear  # projector kept
    close_and_engine_matches(ref, q, seed=1, min_cos=0.97)


def test_weight_only_int8_keeps_activations_and_matches_bf16_closely(llava15_dir):
    from llavakit.engine.quant import WeightInt8Linear

    ref = llavakit.load(llava15_dir, dtype="bfloat16")
    q = quantize_pipeline(llavakit.load(llava15_dir, dtype="float32"), "int8w")
    modules = list(q.model.language_model.modules())
    layers = [m for m in modules if isinstance(m, WeightInt8Linear)]
    assert layers and not any(isinstance(m, torch.nn.Linear) for m in modules)
    assert all(m.weight.dtype == torch.int8 for m in layers)
    close_and_engine_matches(ref, q, seed=3, min_cos=0.99)


def test_bitsandbytes_missing_is_a_clear_error(llava15_dir, block_import):
    block_import("bitsandbytes")
    pipe = llavakit.load(llava15_dir, dtype="float32")
    with pytest.raises(QuantizationUnavailable, match="pip install bitsandbytes"):
        quantize_pipeline(pipe, "bnb8")
    with pytest.raises(ValueError, match="int8"):
        quantize_pipeline(pipe, "fp3")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_bitsandbytes_8bit_runs_and_4bit_explains_shapes(llava15_dir):
    import bitsandbytes as bnb

    ref = llavakit.load(llava15_dir, dtype="float32")
    q = quantize_pipeline(llavakit.load(llava15_dir, dtype="float32"), "bnb8")
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in q.model.language_model.modules())
    image = random_image(40, 30, 2)
    engine = Engine(q, max_batch=2)
    try:
        got = engine.generate(q.encode([image], "Hi"), q.generation_config(max_new_tokens=6))
    finally:
        engine.close()
    assert got == q.chat([image], "Hi", max_new_tokens=6)
    assert ref.chat([image], "Hi", max_new_tokens=6)  # the float model answers too
    with pytest.raises(QuantizationUnavailable, match="divisible by 32"):
        quantize_pipeline(llavakit.load(llava15_dir, dtype="float32"), "bnb4")
