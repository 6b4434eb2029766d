"""Label masks from token spans: only assistant replies and their end-of-turn marker are trained.

The original LLaVA derives masks from per-round length arithmetic and, when that does not line
up, silently masks the whole sample ("tokenization mismatch"). Here the rendered text is searched
for each reply, the supervised character spans are kept, and every token is labelled by whether
its character range overlaps a span. A sample left with nothing to learn is an error.
"""

from __future__ import annotations

from llavakit.errors import LlavakitError
from llavakit.model.llava import IGNORE_INDEX
from llavakit.processing.processor import IMAGE, LlavaProcessor
from llavakit.processing.templates import Turn

Span = tuple[int, int]  # [start, end) character offsets into the rendered text

# End-of-turn markers of common chat templates, used for tokenizer ("tokenizer" style) templates
# whose stop string is not declared.
KNOWN_END_OF_TURN = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
)


class LabelError(LlavakitError, ValueError):
    """The supervised part of a sample could not be located or tokenized consistently."""


class EmptySupervision(LabelError):
    """Every label of the sample is ignored: training on it would teach nothing."""


def _end_markers(processor: LlavaProcessor) -> tuple[str, ...]:
    template = processor.template
    markers = list(template.stop_strings)
    if template.style == "plain":
        markers.append(template.sep)  # "\n" closes the caption
    if template.style == "tokenizer":
        eos = getattr(processor.tokenizer, "eos_token", None)
        markers.extend([eos] if eos else [])
        markers.extend(KNOWN_END_OF_TURN)
    return tuple(sorted({m for m in markers if m}, key=len, reverse=True))


def _reply_span(text: str, start: int, reply: str, markers: tuple[str, ...], turn: int) -> Span:
    """Span from ``start`` over ``reply`` (as the template rendered it) and a following marker."""
    stripped = reply.strip()  # templates such as Llama-3's trim every message
    found = text.find(stripped, start)
    if found < 0 or text[start:found].strip():
        raise LabelError(
            f"turn {turn}: the assistant reply was not found where the template's generation "
            "prompt ends; the template renders replies in a way llavakit cannot locate"
        )
    # The span starts where the generation prompt ends: whitespace between "ASSISTANT:" and the
    # reply is text the model has to generate too (a token of its own in some vocabularies).
    end = found + len(stripped)
    for marker in markers:
        if text.startswith(marker, end):
            return start, end + len(marker)
    gap = len(text[end:]) - len(text[end:].lstrip())
    for marker in markers:  # e.g. llama_2 renders " </s>" after the reply
        if gap and text.startswith(marker, end + gap):
            return start, end + gap + len(marker)
    return start, end


def supervised_text(
    processor: LlavaProcessor, turns: list[Turn], system: str | None = None
) -> tuple[str, list[Span]]:
    """The rendered conversation and the character spans of its supervised parts.

    Each assistant reply is supervised together with the end-of-turn marker right after it
    ("</s>", "<|im_end|>", "<|eot_id|>"; "\\n" for the plain template) but not its role
    prefix nor what follows the marker. Works for every template style, including tokenizer
    chat templates: a reply's span starts where the rendering of the conversation up to it,
    with the generation prompt, ends (so the space in "ASSISTANT: A1" is part of the reply).
    """
    text = processor.render(turns, system, add_generation_prompt=False)
    markers = _end_markers(processor)
    spans: list[Span] = []
    for i, (role, reply) in enumerate(turns):
        if role != "assistant":
            continue
        prefix = processor.render(turns[:i], system, add_generation_prompt=True)
        if not text.startswith(prefix):
            raise LabelError(
                f"turn {i}: the rendering of the conversation does not start with the rendering "
                "of its first turns plus the generation prompt, so the reply cannot be located; "
                "the chat template changes earlier turns depending on later ones"
            )
        start = max(len(prefix), spans[-1][1] if spans else 0)
        spans.append(_reply_span(text, start, reply, markers, i))
    return text, spans


def _overlaps(start: int, end: int, spans: list[Span]) -> bool:
    return end > start and any(start < s_end and end > s_start for s_start, s_end in spans)


def _tokens_with_offsets(processor: LlavaProcessor, text: str) -> tuple[list[int], list[Span]]:
    """Ids and character offsets, tokenized exactly like ``processor.tokenize``."""
    tok = processor.tokenizer
    if not getattr(tok, "is_fast", False):
        raise LabelError("label masks need a fast tokenizer (character offsets)")
    add_special = not (processor.template.renders_bos or processor.text_has_bos(text))
    image_id = processor.config.image_token_id
    if processor.config.image_token_style != "sentinel":
        enc = tok(text, add_special_tokens=add_special, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    ids: list[int] = []
    offsets: list[Span] = []
    base = 0
    for i, chunk in enumerate(text.split(IMAGE)):
        if i:
            ids.append(image_id)
            offsets.append((base - len(IMAGE), base))
        enc = tok(chunk, add_special_tokens=add_special and i == 0, return_offsets_mapping=True)
        chunk_ids, chunk_offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        if i and chunk_ids and tok.bos_token_id is not None and chunk_ids[0] == tok.bos_token_id:
            chunk_ids, chunk_offsets = chunk_ids[1:], chunk_offsets[1:]
        ids.extend(chunk_ids)
        offsets.extend((base + s, base + e) if e > s else (base, base) for s, e in chunk_offsets)
        base += len(chunk) + len(IMAGE)
    return ids, offsets


def tokenize_with_labels(
    processor: LlavaProcessor, text: str, spans: list[Span]
) -> tuple[list[int], list[int]]:
    """Token ids as ``processor.tokenize(text)`` gives them, and labels for them.

    A token is labelled with its id when its character range overlaps a supervised span, else
    with -100; image placeholders and zero-width tokens (BOS) are always -100. Raises
    ``EmptySupervision`` when nothing is supervised.
    """
    ids, offsets = _tokens_with_offsets(processor, text)
    expected = processor.tokenize(text)
    if ids != expected:
        raise LabelError(
            "tokenizing with character offsets gave different ids than processor.tokenize "
            f"({len(ids)} vs {len(expected)} tokens); label masks would be misaligned"
        )
    image_id = processor.config.image_token_id
    labels = [
        token if token != image_id and _overlaps(s, e, spans) else IGNORE_INDEX
        for token, (s, e) in zip(ids, offsets, strict=True)
    ]
    check_supervised(labels)
    return ids, labels


def check_supervised(labels: list[int], what: str = "sample") -> None:
    """Raise ``EmptySupervision`` when every label is ignored."""
    if all(label == IGNORE_INDEX for label in labels):
        raise EmptySupervision(
            f"the {what} has no supervised token (every label is {IGNORE_INDEX}); it needs a "
            "non-empty assistant reply that survives truncation"
        )


__all__ = [
    "EmptySupervision",
    "KNOWN_END_OF_TURN",
    "LabelError",
    "check_supervised",
    "supervised_text",
    "tokenize_with_labels",
]
