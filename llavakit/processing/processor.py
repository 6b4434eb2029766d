"""Messages + images -> token ids with image placeholders expanded, pixel tensors, image sizes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from PIL import Image

from llavakit.config import IMAGE_SENTINEL, LlavaConfig
from llavakit.errors import ImageCountMismatch, PromptTooLong
from llavakit.model.llava import image_token_count
from llavakit.processing.image import (
    DEFAULT_LIMITS,
    ImageLimits,
    ImagePreprocessor,
    ImageSource,
    load_image,
)
from llavakit.processing.templates import Template, Turn, get_template

IMAGE = "<image>"


@dataclass
class Encoded:
    """One prompt, ready for the model."""

    input_ids: list[int]
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # one [tiles, 3, H, W] per image
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width)


@dataclass
class Batch:
    """Left-padded batch of ``Encoded`` prompts."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: list[torch.Tensor]
    image_sizes: list[tuple[int, int]]


def image_preprocessor_for(config: LlavaConfig) -> ImagePreprocessor:
    pins = tuple(tuple(int(v) for v in p) for p in config.image_grid_pinpoints)
    return ImagePreprocessor(
        size=config.image_size,
        crop_size=config.image_size,
        mean=tuple(config.image_mean),
        std=tuple(config.image_std),
        aspect=config.image_aspect_ratio,
        pinpoints=pins,
    )


class LlavaProcessor:
    """Renders the conversation with the checkpoint's template and tokenizes it its way."""

    def __init__(
        self,
        tokenizer,
        config: LlavaConfig,
        template: Template | str | None = None,
        limits: ImageLimits = DEFAULT_LIMITS,
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.template = (
            get_template(template or config.template)
            if not isinstance(template, Template)
            else template
        )
        self.image_processor = image_preprocessor_for(config)
        self.limits = limits

    # -- text ---------------------------------------------------------------------------------
    def build_turns(
        self, prompt: str | None, messages: list[dict] | None, n_images: int
    ) -> list[Turn]:
        """Turns from a prompt or OpenAI-style messages; images go first when not placed."""
        if messages is None:
            messages = [{"role": "user", "content": prompt or ""}]
        turns: list[Turn] = []
        for message in messages:
            role, content = message["role"], message["content"]
            if role not in ("user", "assistant"):
                raise ValueError(f"message role must be user or assistant, got {role!r}")
            turns.append((role, content))
        placed = sum(text.count(IMAGE) for _, text in turns)
        if placed == 0 and n_images:
            first = next(i for i, (role, _) in enumerate(turns) if role == "user")
            turns[first] = (
                ("user", IMAGE + "\n" + turns[first][1])
                if n_images == 1
                else (
                    "user",
                    (IMAGE + "\n") * n_images + turns[first][1],
                )
            )
        elif placed != n_images:
            raise ImageCountMismatch(placed, n_images)
        return turns

    def render(
        self, turns: list[Turn], system: str | None = None, add_generation_prompt: bool = True
    ) -> str:
        if self.template.style != "tokenizer":
            return self.template.render(turns, system, add_generation_prompt)
        chat_template = getattr(self.tokenizer, "chat_template", None) or ""
        structured = (
            "'type'" in chat_template or '"type"' in chat_template or ".type" in chat_template
        )
        msgs = [{"role": "system", "content": system}] if system else []
        for role, text in turns:
            if structured:
                parts = [{"type": "image"}] * text.count(IMAGE)
                rest = re.sub(r"<image>\n?", "", text)
                msgs.append({"role": role, "content": parts + [{"type": "text", "text": rest}]})
            else:
                msgs.append({"role": role, "content": text})
        return self.tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def tokenize(self, text: str) -> list[int]:
        """Token ids with exactly one ``image_token_id`` per ``<image>`` (not yet expanded)."""
        tok = self.tokenizer
        add_special = not (self.template.renders_bos or self.text_has_bos(text))
        image_id = self.config.image_token_id
        if self.config.image_token_style == "sentinel":
            ids: list[int] = []
            for i, chunk in enumerate(text.split(IMAGE)):
                if i:
                    ids.append(image_id)
                chunk_ids = tok(chunk, add_special_tokens=add_special and i == 0)["input_ids"]
                if (
                    i
                    and chunk_ids
                    and tok.bos_token_id is not None
                    and chunk_ids[0] == tok.bos_token_id
                ):
                    chunk_ids = chunk_ids[1:]
                ids.extend(chunk_ids)
            return ids
        return tok(text, add_special_tokens=add_special)["input_ids"]

    def text_has_bos(self, text: str) -> bool:
        """True when ``text`` already starts with the BOS token (so tokenizing adds none)."""
        bos = getattr(self.tokenizer, "bos_token", None)
        return bool(bos) and text.startswith(bos)

    # -- images + text --------------------------------------------------------------------------
    def load_images(self, images: list[ImageSource] | None) -> list[Image.Image]:
        return [load_image(img, self.limits) for img in images or []]

    def encode(
        self,
        images: list[ImageSource] | None = None,
        prompt: str | None = None,
        messages: list[dict] | None = None,
        system: str | None = None,
        max_new_tokens: int = 0,
    ) -> Encoded:
        """Load and preprocess images, render and tokenize the prompt, expand placeholders."""
        pil_images = self.load_images(images)
        turns = self.build_turns(prompt, messages, len(pil_images))
        return self._encode_text(self.render(turns, system), pil_images)

    def encode_rendered(self, text: str, images: list[ImageSource] | None = None) -> Encoded:
        """A prompt already rendered with the template, one ``<image>`` per image (the
        original LLaVA worker API sends these)."""
        pil_images = self.load_images(images)
        if text.count(IMAGE) != len(pil_images):
            raise ImageCountMismatch(text.count(IMAGE), len(pil_images))
        return self._encode_text(text, pil_images)

    def _encode_text(self, text: str, pil_images: list[Image.Image]) -> Encoded:
        ids = self.tokenize(text)
        sizes = [(img.height, img.width) for img in pil_images]
        counts = [image_token_count(self.config, s) for s in sizes]
        ids = expand_image_tokens(ids, self.config.image_token_id, counts)
        limit = self.config.max_context
        if len(ids) >= limit:
            raise PromptTooLong(len(ids), limit)
        pixels = [self.image_processor(img) for img in pil_images]
        return Encoded(ids, pixels, sizes)

    def collate(self, items: list[Encoded]) -> Batch:
        """Left-pad ids (pad id from the tokenizer, else 0) and gather images in order."""
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        longest = max(len(e.input_ids) for e in items)
        ids = torch.full((len(items), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, e in enumerate(items):
            n = len(e.input_ids)
            ids[row, longest - n :] = torch.tensor(e.input_ids, dtype=torch.long)
            mask[row, longest - n :] = 1
        pixels = [p for e in items for p in e.pixel_values]
        sizes = [s for e in items for s in e.image_sizes]
        return Batch(ids, mask, pixels, sizes)


def expand_image_tokens(ids: list[int], image_id: int, counts: list[int]) -> list[int]:
    """Repeat the i-th image placeholder ``counts[i]`` times.

    >>> expand_image_tokens([1, -200, 5], -200, [3])
    [1, -200, -200, -200, 5]
    """
    placed = ids.count(image_id)
    if placed != len(counts):
        raise ImageCountMismatch(placed, len(counts), where="tokenized prompt")
    out: list[int] = []
    images = iter(counts)
    for token in ids:
        out.extend([token] * next(images) if token == image_id else [token])
    return out


__all__ = ["Batch", "Encoded", "IMAGE", "IMAGE_SENTINEL", "LlavaProcessor", "expand_image_tokens"]
