"""Message plumbing of the web UIs and the controller client."""

from __future__ import annotations

from llavakit.serve.client import openai_messages
from llavakit.serve.webui import history_to_messages
from tests.conftest import random_image


def test_ui_history_becomes_llavakit_messages_with_the_image_first():
    image = random_image(10, 10, 1)
    history = [
        {"role": "user", "content": "What is it?"},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    ]
    messages, images = history_to_messages(image, history, "And its colour?")
    assert messages == [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "And its colour?"},
    ]
    assert images == [image]
    no_image, none = history_to_messages(None, [], "Hello")
    assert no_image == [{"role": "user", "content": "Hello"}] and none == []


def test_client_sends_images_as_openai_parts_in_order():
    a, b = random_image(8, 8, 1), random_image(9, 9, 2)
    out = openai_messages(
        [
            {"role": "user", "content": "<image>\n<image>\nCompare."},
            {"role": "assistant", "content": "Same."},
        ],
        [a, b],
    )
    parts = out[0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    assert parts[2]["text"] == "Compare."
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[0]["image_url"]["url"] != parts[1]["image_url"]["url"]
    assert out[1] == {"role": "assistant", "content": "Same."}
