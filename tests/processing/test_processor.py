"""Processor: template choice, tokenizer chat templates, both image-token styles, collation."""

from __future__ import annotations

import pytest

from llavakit.config import IMAGE_SENTINEL
from llavakit.errors import ImageCountMismatch
from llavakit.model.llava import image_token_count
from llavakit.processing.processor import LlavaProcessor, expand_image_tokens
from llavakit.testing import tiny_config, tiny_tokenizer
from tests.conftest import random_image

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_tokenizer_chat_template_with_string_content(tokenizer):
    tokenizer.chat_template = CHATML
    proc = LlavaProcessor(tokenizer, tiny_config(template="tokenizer"))
    text = proc.render(proc.build_turns("What is it?", None, 1))
    assert text == "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_chat_template_with_structured_content(tokenizer):
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'].upper() }}: "
        "{% for c in m['content'] if c['type'] == 'image' %}<image>\n{% endfor %}"
        "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %} {% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    proc = LlavaProcessor(tokenizer, tiny_config(template="tokenizer"))
    assert proc.render(proc.build_turns("Hi", None, 1)) == "USER: <image>\nHi ASSISTANT:"


def test_sentinel_style_tokenizes_chunks_apart(tokenizer):
    """Original LLaVA: text after <image> starts a fresh segment; BOS only at the start."""
    sentinel = LlavaProcessor(tokenizer, tiny_config(image_token_style="sentinel"))
    text = "USER: <image>\nWhat is it?"
    ids = sentinel.tokenize(text)
    before = tokenizer("USER: ")["input_ids"]
    after = tokenizer("\nWhat is it?", add_special_tokens=False)["input_ids"]
    assert ids == before + [IMAGE_SENTINEL] + after
    assert ids.count(tokenizer.bos_token_id) == 1


def test_token_style_uses_the_added_image_token(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    proc = LlavaProcessor(tokenizer, tiny_config(image_token_id=image_id))
    ids = proc.tokenize("USER: <image>\nWhat is it?")
    assert ids == tokenizer("USER: <image>\nWhat is it?")["input_ids"]
    assert ids.count(image_id) == 1


def test_encode_expands_each_image_to_its_token_count(tokenizer):
    config = tiny_config(family="llava_next", image_token_style="sentinel")
    proc = LlavaProcessor(tokenizer, config)
    images = [random_image(90, 20, 1), random_image(20, 90, 2)]
    encoded = proc.encode(images, "<image> vs <image>")
    counts = [image_token_count(config, (im.height, im.width)) for im in images]
    assert encoded.input_ids.count(IMAGE_SENTINEL) == sum(counts)
    assert encoded.image_sizes == [(20, 90), (90, 20)]
    assert [p.shape[0] for p in encoded.pixel_values] == [3, 3]  # base + 1x2 / 2x1 grid


def test_expand_image_tokens_checks_counts():
    assert expand_image_tokens([5, -200, 6, -200], -200, [2, 1]) == [5, -200, -200, 6, -200]
    with pytest.raises(ImageCountMismatch):
        expand_image_tokens([5, -200], -200, [2, 2])


def test_collate_left_pads(tokenizer):
    proc = LlavaProcessor(tokenizer, tiny_config())
    short, long = proc.encode(None, "hi"), proc.encode(None, "a much longer question here")
    batch = proc.collate([short, long])
    n = len(short.input_ids)
    assert batch.input_ids.shape[1] == len(long.input_ids)
    assert batch.attention_mask[0].tolist() == [0] * (len(long.input_ids) - n) + [1] * n
    assert batch.input_ids[0, -n:].tolist() == short.input_ids
    assert batch.input_ids[0, 0].item() == tokenizer.pad_token_id
