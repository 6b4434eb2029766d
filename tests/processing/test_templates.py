"""Templates render byte-exactly like the original LLaVA conversation code (FIDELITY.md)."""

from __future__ import annotations

import pytest

from llavakit.errors import UnknownTemplate
from llavakit.processing.templates import LLAVA_SYSTEM, VICUNA_SYSTEM, get_template

TURNS = [("user", "<image>\nQ1"), ("assistant", "A1"), ("user", "Q2")]


def test_vicuna_v1_multi_turn_matches_fidelity_example():
    text = get_template("vicuna_v1").render(TURNS)
    assert text == VICUNA_SYSTEM + " USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    assert text.startswith(
        "A chat between a curious user and an artificial intelligence assistant."
    )
    assert "</s>USER" in text  # no space after </s>


def test_llava_v1_differs_only_in_system_text():
    text = get_template("llava_v1").render(TURNS)
    assert text.startswith(
        "A chat between a curious human and an artificial intelligence assistant."
    )
    assert text.endswith(
        "the human's questions. USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    )


def test_plain_is_image_caption_newline():
    plain = get_template("plain")
    assert (
        plain.render([("user", "<image>\nDescribe it."), ("assistant", "a cat")])
        == "<image>a cat\n"
    )
    assert plain.render([("user", "<image>")]) == "<image>"


def test_llama_2_and_mistral_instruct():
    llama2 = get_template("llava_llama_2").render(TURNS)
    assert llama2 == (
        f"[INST] <<SYS>>\n{LLAVA_SYSTEM}\n<</SYS>>\n\n<image>\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST]"
    )
    mistral = get_template("mistral_instruct").render(TURNS)
    assert mistral == "[INST] <image>\nQ1 [/INST] A1 </s>[INST] Q2 [/INST]"


def test_qwen_chatml():
    text = get_template("qwen_2").render(TURNS)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert get_template("qwen_1_5") is get_template("qwen_2")


def test_chatml_direct_has_no_newline_after_separator():
    text = get_template("chatml_direct").render(TURNS)
    assert text == (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        "<|im_start|>user\n<image>\nQ1<|im_end|>"
        "<|im_start|>assistant\nA1<|im_end|>"
        "<|im_start|>user\nQ2<|im_end|>"
        "<|im_start|>assistant\n"
    )


def test_llava_llama_3():
    text = get_template("llava_llama_3").render(TURNS)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        f"{LLAVA_SYSTEM}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nQ1<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert get_template("llava_llama_3").renders_bos


def test_system_override_and_no_generation_prompt():
    text = get_template("vicuna_v1").render(
        [("user", "hi"), ("assistant", "yo")], system="SYS", add_generation_prompt=False
    )
    assert text == "SYS USER: hi ASSISTANT: yo</s>"


def test_stop_strings_are_end_of_turn_separators():
    assert get_template("vicuna_v1").stop_strings == ("</s>",)
    assert get_template("qwen_2").stop_strings == ("<|im_end|>",)
    assert get_template("llava_llama_3").stop_strings == ("<|eot_id|>",)


def test_unknown_template_names_the_known_ones():
    with pytest.raises(UnknownTemplate, match="vicuna_v1"):
        get_template("nope")


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_v1", "qwen_2", "chatml_nosystem"])
def test_saved_jinja_template_renders_like_llavakit(name):
    """Checkpoints carry a Jinja chat template so transformers builds the same prompt."""
    from llavakit.checkpoint.hf import jinja_for
    from llavakit.testing import tiny_tokenizer

    template = get_template(name)
    tok = tiny_tokenizer()
    tok.chat_template = jinja_for(template)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q1"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
        {"role": "user", "content": "Q2"},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == template.render(TURNS)
    with_system = tok.apply_chat_template(
        [{"role": "system", "content": "SYS"}, *messages[:1]],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert with_system == template.render(TURNS[:1], system="SYS")
