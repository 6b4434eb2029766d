"""Label masks, token by token, against hand-written expectations for each template family."""

from __future__ import annotations

import pytest

from llavakit.config import IMAGE_SENTINEL
from llavakit.data.labels import (
    EmptySupervision,
    LabelError,
    supervised_text,
    tokenize_with_labels,
)
from llavakit.errors import LlavakitError
from llavakit.processing.processor import LlavaProcessor
from llavakit.processing.templates import LLAVA_SYSTEM, VICUNA_SYSTEM
from llavakit.testing import tiny_config, tiny_tokenizer

M = -100
CHAT_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|begin_of_text|>",
]
CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(CHAT_TOKENS, special_tokens=True)
    return tokenizer


@pytest.fixture(scope="module")
def image_id(tok):
    return tok.convert_tokens_to_ids("<image>")


def ids_of(tok, text: str, bos: bool = False) -> list[int]:
    return tok(text, add_special_tokens=bos)["input_ids"]


def labelled(proc: LlavaProcessor, turns, system=None) -> tuple[str, list[int], list[int]]:
    text, spans = supervised_text(proc, turns, system)
    ids, labels = tokenize_with_labels(proc, text, spans)
    return text, ids, labels


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("vicuna_v1", [" A1</s>", " A2</s>"]),  # the space after "ASSISTANT:" is generated too
        ("qwen_2", ["A1<|im_end|>", "A2<|im_end|>"]),
        ("llava_llama_3", ["A1<|eot_id|>", "A2<|eot_id|>"]),
        ("llama_2", [" A1 </s>", " A2 </s>"]),
    ],
)
def test_supervised_spans(tok, template, expected):
    proc = LlavaProcessor(tok, tiny_config(template=template))
    turns = [("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")]
    text, spans = supervised_text(proc, turns)
    assert [text[a:b] for a, b in spans] == expected


# -- plain (stage 1) --------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["sentinel", "token"])
def test_plain_supervises_caption_and_newline(tok, image_id, style):
    image = IMAGE_SENTINEL if style == "sentinel" else image_id
    config = tiny_config(template="plain", image_token_id=image, image_token_style=style)
    proc = LlavaProcessor(tok, config)
    turns = [("user", "<image>\nDescribe the picture."), ("assistant", "A red circle.")]
    text, ids, labels = labelled(proc, turns)
    assert text == "<image>A red circle.\n"
    caption = ids_of(tok, "A red circle.\n")
    assert ids == [tok.bos_token_id, image] + caption
    assert labels == [M, M] + caption  # only BOS and the image are masked


def test_plain_text_only_caption(tok):
    proc = LlavaProcessor(tok, tiny_config(template="plain"))
    text, ids, labels = labelled(proc, [("user", "hi"), ("assistant", "two birds")])
    assert text == "two birds\n"
    assert labels == [M] + ids_of(tok, "two birds\n")


# -- vicuna_v1 (LLaVA-1.5, original tokenization) ----------------------------------------------
def test_vicuna_single_turn_with_image(tok):
    proc = LlavaProcessor(tok, tiny_config(template="vicuna_v1", image_token_style="sentinel"))
    turns = [("user", "<image>\nWhat is it?"), ("assistant", "A cat.")]
    text, ids, labels = labelled(proc, turns)
    assert text == VICUNA_SYSTEM + " USER: <image>\nWhat is it? ASSISTANT: A cat.</s>"
    prompt = (
        ids_of(tok, VICUNA_SYSTEM + " USER: ", bos=True)
        + [IMAGE_SENTINEL]
        + ids_of(tok, "\nWhat is it? ASSISTANT:")
    )
    reply = ids_of(tok, " A cat.</s>")  # not "ASSISTANT:", but the reply and its </s>
    assert ids == prompt + reply
    assert labels == [M] * len(prompt) + reply


def test_vicuna_multi_turn_text_only(tok):
    proc = LlavaProcessor(tok, tiny_config(template="vicuna_v1"))
    turns = [("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")]
    text, ids, labels = labelled(proc, turns)
    assert text == VICUNA_SYSTEM + " USER: Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>"
    p1 = ids_of(tok, VICUNA_SYSTEM + " USER: Q1 ASSISTANT:", bos=True)
    r1 = ids_of(tok, " A1</s>")
    p2 = ids_of(tok, "USER: Q2 ASSISTANT:")
    r2 = ids_of(tok, " A2</s>")
    assert ids == p1 + r1 + p2 + r2
    assert labels == [M] * len(p1) + r1 + [M] * len(p2) + r2


def test_vicuna_custom_system_and_token_style(tok, image_id):
    proc = LlavaProcessor(tok, tiny_config(template="vicuna_v1", image_token_id=image_id))
    turns = [("user", "<image>\nQ1"), ("assistant", "yes")]
    text, ids, labels = labelled(proc, turns, system="Be brief.")
    assert text == "Be brief. USER: <image>\nQ1 ASSISTANT: yes</s>"
    prompt = ids_of(tok, "Be brief. USER: <image>\nQ1 ASSISTANT:", bos=True)
    assert prompt.count(image_id) == 1
    reply = ids_of(tok, " yes</s>")  # the tiny vocabulary has " " as a token of its own
    assert ids == prompt + reply
    assert labels == [M] * len(prompt) + reply


# -- chatml (qwen_2) ----------------------------------------------------------------------------
def test_chatml_multi_turn_with_image(tok, image_id):
    proc = LlavaProcessor(tok, tiny_config(template="qwen_2", image_token_id=image_id))
    turns = [("user", "<image>\nQ1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")]
    text, ids, labels = labelled(proc, turns)
    head = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    p1 = ids_of(
        tok, head + "<|im_start|>user\n<image>\nQ1<|im_end|>\n<|im_start|>assistant\n", True
    )
    r1 = ids_of(tok, "A1<|im_end|>")
    p2 = ids_of(tok, "\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n")
    r2 = ids_of(tok, "A2<|im_end|>")
    tail = ids_of(tok, "\n")  # the newline after <|im_end|> is not supervised
    assert ids == p1 + r1 + p2 + r2 + tail
    assert labels == [M] * len(p1) + r1 + [M] * len(p2) + r2 + [M] * len(tail)
    assert tok.convert_tokens_to_ids("<|im_end|>") in labels


def test_tokenizer_chat_template_matches_builtin_chatml(tok, image_id):
    """The generic path (tokenizer chat template) finds the same spans as the built-in one."""
    builtin = LlavaProcessor(tok, tiny_config(template="qwen_2", image_token_id=image_id))
    jinja_tok = tiny_tokenizer()
    jinja_tok.add_tokens(CHAT_TOKENS, special_tokens=True)
    jinja_tok.chat_template = CHATML_JINJA
    generic = LlavaProcessor(jinja_tok, tiny_config(template="tokenizer", image_token_id=image_id))
    turns = [("user", "<image>\nQ1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")]
    system = "You are a helpful assistant."
    assert labelled(generic, turns, system) == labelled(builtin, turns, system)


def test_tokenizer_template_that_rewrites_history_is_refused(tok):
    jinja_tok = tiny_tokenizer()
    jinja_tok.chat_template = (  # replies render as "bot", the generation prompt as "assistant"
        "{% for m in messages %}{{ 'bot' if m['role'] == 'assistant' else m['role'] }}: "
        "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    proc = LlavaProcessor(jinja_tok, tiny_config(template="tokenizer"))
    with pytest.raises(LabelError, match="does not start with"):
        supervised_text(proc, [("user", "hi"), ("assistant", "yes")])


# -- llama_3 (llava_llama_3) --------------------------------------------------------------------
def test_llama_3_single_turn_with_image(tok, image_id):
    proc = LlavaProcessor(tok, tiny_config(template="llava_llama_3", image_token_id=image_id))
    turns = [("user", "<image>\nWhat is it?"), ("assistant", " A cat. ")]
    text, ids, labels = labelled(proc, turns)

    def header(role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    prompt_text = (
        "<|begin_of_text|>"
        + header("system")
        + LLAVA_SYSTEM
        + "<|eot_id|>"
        + header("user")
        + "<image>\nWhat is it?<|eot_id|>"
        + header("assistant")
    )
    assert text == prompt_text + "A cat.<|eot_id|>"
    prompt = ids_of(tok, prompt_text)  # BOS is in the text: no extra <s>
    reply = ids_of(tok, "A cat.<|eot_id|>")
    assert tok.bos_token_id not in ids
    assert ids == prompt + reply
    assert labels == [M] * len(prompt) + reply


def test_llama_3_multi_turn_text_only(tok):
    proc = LlavaProcessor(tok, tiny_config(template="llava_llama_3"))
    turns = [("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")]
    _, ids, labels = labelled(proc, turns, system="")
    h = "<|start_header_id|>{}<|end_header_id|>\n\n"
    p1 = ids_of(
        tok, "<|begin_of_text|>" + h.format("user") + "Q1<|eot_id|>" + h.format("assistant")
    )
    r1 = ids_of(tok, "A1<|eot_id|>")
    p2 = ids_of(tok, h.format("user") + "Q2<|eot_id|>" + h.format("assistant"))
    r2 = ids_of(tok, "A2<|eot_id|>")
    assert ids == p1 + r1 + p2 + r2
    assert labels == [M] * len(p1) + r1 + [M] * len(p2) + r2


# -- errors ------------------------------------------------------------------------------------
def test_nothing_supervised_is_an_error(tok):
    proc = LlavaProcessor(tok, tiny_config(template="vicuna_v1"))
    text, spans = supervised_text(proc, [("user", "only a question")])
    assert spans == []
    with pytest.raises(EmptySupervision) as info:
        tokenize_with_labels(proc, text, spans)
    assert isinstance(info.value, LlavakitError)


def test_image_placeholder_is_never_supervised(tok, image_id):
    proc = LlavaProcessor(tok, tiny_config(template="vicuna_v1", image_token_id=image_id))
    text = "<image>"
    ids, labels = tokenize_with_labels(proc, text + "x", [(0, len(text) + 1)])
    assert ids == [tok.bos_token_id, image_id] + ids_of(tok, "x")
    assert labels == [M, M] + ids_of(tok, "x")
