"""Conversation templates as data, rendering byte-exactly like the original LLaVA code.

A template turns ``[(role, text), ...]`` (roles "user" / "assistant", alternating, user first)
into the prompt string. The image placeholder ``<image>`` stays in the text; the processor
replaces it with image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llavakit.errors import UnknownTemplate

Turn = tuple[str, str]  # (role, text); role in {"user", "assistant"}

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAVA_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)
LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe.  Your answers should not include any harmful, unethical, racist, sexist, "
    "toxic, dangerous, or illegal content. Please ensure that your responses are socially "
    "unbiased and positive in nature.\n\nIf a question does not make any sense, or is not "
    "factually coherent, explain why instead of answering something not correct. If you don't "
    "know the answer to a question, please don't share false information."
)


@dataclass(frozen=True)
class Template:
    """One conversation format. ``style`` picks the renderer; the rest is its data."""

    name: str
    style: str  # two | plain | llama_2 | chatml | mpt | llama_3 | tokenizer
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"
    stop: tuple[str, ...] = ()
    renders_bos: bool = False  # the text already holds BOS: tokenize without special tokens
    extra: dict[str, Any] = field(default_factory=dict)

    def render(
        self, turns: list[Turn], system: str | None = None, add_generation_prompt: bool = True
    ) -> str:
        """The prompt for ``turns``; ends with the open assistant turn when asked."""
        system = self.system if system is None else system
        renderer = _RENDERERS[self.style]
        return renderer(self, turns, system, add_generation_prompt)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self.stop


def _role(template: Template, role: str) -> str:
    return template.roles[0] if role == "user" else template.roles[1]


def _render_two(t: Template, turns: list[Turn], system: str, gen: bool) -> str:
    out = system + t.sep
    for role, text in turns:
        out += f"{_role(t, role)}: {text}" + (t.sep if role == "user" else t.sep2)
    return out + (f"{t.roles[1]}:" if gen else "")


def _render_plain(t: Template, turns: list[Turn], system: str, gen: bool) -> str:
    # Stage-1 pretraining: "<image>" + caption + "\n"; the user text is reduced to the image.
    out = system
    for role, text in turns:
        out += text + t.sep if role == "assistant" else _only_images(text)
    return out


def _only_images(text: str) -> str:
    return "<image>" * text.count("<image>")


def _render_llama_2(t: Template, turns: list[Turn], system: str, gen: bool) -> str:
    out = ""
    for i, (role, text) in enumerate(turns):
        if i == 0 and system:
            text = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + text
        if role == "user":
            out += t.sep + f"[INST] {text} [/INST]"
        else:
            out += f" {text} " + t.sep2
    return out.removeprefix(t.sep) if t.sep else out


def _render_chatml(t: Template, turns: list[Turn], system: str, gen: bool) -> str:
    out = "" if not system else f"<|im_start|>system\n{system}{t.sep}\n"
    for role, text in turns:
        out += f"{_role(t, role)}\n{text}{t.sep}\n"
    return out + (f"{t.roles[1]}\n" if gen else "")


def _render_mpt(t: Template, turns: list[Turn], system: str, gen: bool) -> str:
    out = f"<|im_start|>system\n{system}{t.sep}"
    for role, text in turns:
        out += f"{_role(t, role)}{text}{t.sep}"
    return out + (t.roles[1] if gen else "")


def _render_llama_3(t: Template, turns: list[Turn], system: str, gen: bool) -> str:
    def block(role: str, text: str) -> str:
        # Llama-3's own chat template trims every message.
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n{text.strip()}<|eot_id|>"

    out = "<|begin_of_text|>" + (block("system", system) if system else "")
    for role, text in turns:
        out += block(role, text)
    return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if gen else "")


def _render_tokenizer(t: Template, turns: list[Turn], system: str, gen: bool) -> str:
    raise RuntimeError("the 'tokenizer' template is rendered by the processor with the tokenizer")


_RENDERERS = {
    "two": _render_two,
    "plain": _render_plain,
    "llama_2": _render_llama_2,
    "chatml": _render_chatml,
    "mpt": _render_mpt,
    "llama_3": _render_llama_3,
    "tokenizer": _render_tokenizer,
}

TEMPLATES: dict[str, Template] = {}


def register_template(template: Template) -> Template:
    TEMPLATES[template.name] = template
    return template


for _t in (
    Template("vicuna_v1", "two", VICUNA_SYSTEM, stop=("</s>",)),
    Template("llava_v1", "two", LLAVA_V1_SYSTEM, stop=("</s>",)),
    Template("plain", "plain", "", roles=("", ""), sep="\n", sep2=""),
    Template("llama_2", "llama_2", LLAMA_2_SYSTEM, sep="<s>", sep2="</s>", stop=("</s>",)),
    Template("llava_llama_2", "llama_2", LLAVA_SYSTEM, sep="<s>", sep2="</s>", stop=("</s>",)),
    Template("mistral_instruct", "llama_2", "", sep="", sep2="</s>", stop=("</s>",)),
    Template(
        "qwen_1_5",
        "chatml",
        "You are a helpful assistant.",
        roles=("<|im_start|>user", "<|im_start|>assistant"),
        sep="<|im_end|>",
        stop=("<|im_end|>",),
    ),
    Template(
        "chatml_nosystem",  # ChatML without a system turn (short prompts; the demo model)
        "chatml",
        "",
        roles=("<|im_start|>user", "<|im_start|>assistant"),
        sep="<|im_end|>",
        stop=("<|im_end|>",),
    ),
    Template(
        "chatml_direct",
        "mpt",
        "Answer the questions.",
        roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
        sep="<|im_end|>",
        stop=("<|im_end|>",),
    ),
    Template(
        "llava_llama_3",
        "llama_3",
        LLAVA_SYSTEM,
        roles=("user", "assistant"),
        stop=("<|eot_id|>",),
        renders_bos=True,
    ),
    Template("tokenizer", "tokenizer"),
):
    register_template(_t)
TEMPLATES["qwen_2"] = TEMPLATES["chatml"] = TEMPLATES["qwen_1_5"]
TEMPLATES["v1"] = TEMPLATES["vicuna_v1"]
TEMPLATES["llava_mistral_instruct"] = TEMPLATES["mistral_instruct"]


def get_template(name: str) -> Template:
    """Look up a template by name (see ``TEMPLATES``)."""
    try:
        return TEMPLATES[name]
    except KeyError:
        known = ", ".join(sorted(TEMPLATES))
        raise UnknownTemplate(f"unknown conversation template {name!r}; known: {known}") from None
