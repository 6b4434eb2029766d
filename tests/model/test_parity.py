"""llavakit vs transformers on the same tiny checkpoints: ids, pixels, logits, greedy text."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

import llavakit
from tests.conftest import random_image

QUESTION = "What is in the image?"
SIZES = {
    "llava15_dir": [(80, 40), (37, 91)],
    "siglip_dir": [(80, 40), (56, 56)],
    # width x height: odd sizes and extreme aspect ratios exercise anyres + unpad
    "llava_next_dir": [(80, 40), (37, 91), (56, 56), (200, 13), (13, 300), (111, 57), (3, 5)],
}


def _hf(path, family):
    cls = (
        LlavaNextForConditionalGeneration
        if family == "llava_next"
        else LlavaForConditionalGeneration
    )
    return cls.from_pretrained(path, dtype=torch.float32).eval(), AutoProcessor.from_pretrained(
        path
    )


@pytest.mark.parametrize("fixture", list(SIZES))
def test_matches_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    pipe = llavakit.load(path, dtype="float32")
    hf_model, hf_proc = _hf(path, pipe.model.config.family)
    for i, (width, height) in enumerate(SIZES[fixture]):
        image = random_image(width, height, seed=i)
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
        ]
        text = hf_proc.apply_chat_template(messages, add_generation_prompt=True)
        inputs = hf_proc(images=image, text=text, return_tensors="pt")

        encoded = pipe.encode([image], QUESTION)
        assert encoded.input_ids == inputs["input_ids"][0].tolist(), (width, height)
        ours_pixels = torch.cat(encoded.pixel_values)
        theirs_pixels = inputs["pixel_values"].reshape(ours_pixels.shape)
        assert torch.allclose(ours_pixels, theirs_pixels, atol=1e-5)

        batch = pipe.processor.collate([encoded])
        with torch.no_grad():
            theirs = hf_model(**inputs).logits
            ours = pipe.model(
                batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_sizes
            ).logits
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= 1e-5

        generated = hf_model.generate(**inputs, max_new_tokens=12, do_sample=False)
        expected = hf_proc.decode(
            generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        assert pipe.chat([image], QUESTION, max_new_tokens=12) == expected
        assert len(expected) > 0


def test_text_only_prompt_matches_transformers(llava15_dir):
    pipe = llavakit.load(llava15_dir, dtype="float32")
    hf_model, hf_proc = _hf(llava15_dir, "llava")
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    text = hf_proc.apply_chat_template(messages, add_generation_prompt=True)
    inputs = hf_proc(text=text, return_tensors="pt")
    generated = hf_model.generate(**inputs, max_new_tokens=10, do_sample=False)
    expected = hf_proc.decode(
        generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert pipe.chat(prompt="Hello there", max_new_tokens=10) == expected
