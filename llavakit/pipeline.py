"""Pipeline: the Python API around a model and its processor (chat, stream, generate_batch)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

from llavakit.engine.generate import GenerationConfig, generate_stream
from llavakit.processing.image import ImageSource
from llavakit.processing.processor import Encoded, LlavaProcessor


def default_dtype() -> torch.dtype:
    """bfloat16 where the CPU has native bf16 matmuls (AVX512-BF16 / AMX), else float32."""
    if torch.cuda.is_available():
        return torch.bfloat16
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype()
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return names[dtype]


class Pipeline:
    """Chat with a LLaVA model about images.

    >>> pipe = llavakit.load("path/to/checkpoint")          # doctest: +SKIP
    >>> pipe.chat(images=["cat.jpg"], prompt="What is this?")  # doctest: +SKIP
    """

    def __init__(self, model, processor: LlavaProcessor) -> None:
        self.model = model
        self.processor = processor

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def generation_config(self, **kwargs: Any) -> GenerationConfig:
        """Sampling settings with the template's stop strings added to ``stop``."""
        stop = kwargs.pop("stop", None) or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        stop = tuple(dict.fromkeys(stop + self.processor.template.stop_strings))
        return GenerationConfig(stop=stop, **kwargs)

    def eos_token_ids(self) -> set[int]:
        """Token ids that end an answer: the tokenizer's / generation config's EOS and the
        template's stop tokens."""
        ids = set()
        tok = self.tokenizer
        if tok.eos_token_id is not None:
            ids.add(tok.eos_token_id)
        gen_cfg = getattr(self.model.language_model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else (eos or []))
        for s in self.processor.template.stop_strings:
            tid = tok.convert_tokens_to_ids(s)
            if isinstance(tid, int) and tid != tok.unk_token_id:
                ids.add(tid)
        return ids

    def encode(
        self, images: list[ImageSource] | None = None, prompt: str | None = None, **kwargs: Any
    ) -> Encoded:
        return self.processor.encode(images=images, prompt=prompt, **kwargs)

    def stream(
        self,
        images: list[ImageSource] | None = None,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        system: str | None = None,
        **gen: Any,
    ) -> Iterator[str]:
        """Yield the answer piece by piece as it is generated."""
        encoded = self.encode(images, prompt, messages=messages, system=system)
        batch = self.processor.collate([encoded])
        for deltas in generate_stream(
            self.model, self.tokenizer, batch, self.generation_config(**gen), self.eos_token_ids()
        ):
            if deltas[0]:
                yield deltas[0]

    def chat(
        self,
        images: list[ImageSource] | None = None,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        system: str | None = None,
        **gen: Any,
    ) -> str:
        """The whole answer to ``prompt`` about ``images`` (greedy unless temperature > 0)."""
        return "".join(self.stream(images, prompt, messages=messages, system=system, **gen))

    def generate_batch(self, requests: list[dict], **gen: Any) -> list[str]:
        """Answers for several ``{"images": [...], "prompt": ...}`` requests in one batch."""
        encoded = [
            self.encode(
                r.get("images"), r.get("prompt"), messages=r.get("messages"), system=r.get("system")
            )
            for r in requests
        ]
        batch = self.processor.collate(encoded)
        texts = [""] * len(requests)
        for deltas in generate_stream(
            self.model, self.tokenizer, batch, self.generation_config(**gen), self.eos_token_ids()
        ):
            texts = [t + d for t, d in zip(texts, deltas, strict=True)]
        return texts


def load(
    path: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    template: str | None = None,
    vision_tower: str | None = None,
) -> Pipeline:
    """Load a checkpoint (transformers layout, original layout, or hub id) as a Pipeline.

    With no ``path``, loads the bundled demo model.
    """
    from llavakit.checkpoint import load_checkpoint
    from llavakit.demo import resolve_model

    model, processor = load_checkpoint(
        resolve_model(path), dtype=parse_dtype(dtype), template=template, vision_tower=vision_tower
    )
    return Pipeline(model.to(device), processor)
