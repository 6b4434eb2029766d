"""Batched decoding with a KV cache: greedy or sampled, stop strings, streaming text deltas.

Prompts are left-padded so every row's next token sits in the last column; rows finish
independently (EOS, stop string, token budget, context end).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from llavakit.processing.processor import Batch


@dataclass
class GenerationConfig:
    """Sampling settings. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError("top_k must be >= 0 and repetition_penalty > 0")
        self.stop = tuple(s for s in self.stop if s)


def process_logits(
    logits: torch.Tensor, seen: list[torch.Tensor], cfg: GenerationConfig
) -> torch.Tensor:
    """Repetition penalty, temperature, top-k, top-p (in transformers' order) on [B, V] logits."""
    if cfg.repetition_penalty != 1.0:
        for row, tokens in enumerate(seen):
            tokens = tokens[(tokens >= 0) & (tokens < logits.shape[-1])]
            picked = logits[row, tokens]
            logits[row, tokens] = torch.where(
                picked > 0, picked / cfg.repetition_penalty, picked * cfg.repetition_penalty
            )
    if cfg.temperature == 0:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= cfg.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def pick_tokens(
    logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None
) -> torch.Tensor:
    if cfg.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class Detokenizer:
    """Incremental decoding of one sequence: emits text deltas, never part of a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token; return (new text, hit a stop string)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            self.text = text[: min(hits)]
            delta = self.text[self.emitted :]
            self.emitted = len(self.text)
            return delta, True
        self.text = text
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return "", False
        safe = len(text) - _held_back(text, self.stop)
        delta = text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return delta, False

    def flush(self) -> str:
        """The text held back so far (the sequence ended without a stop string)."""
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta


def accept_token(
    token: int, detok: Detokenizer, cfg: GenerationConfig, eos_token_ids: set[int]
) -> tuple[str, str | None]:
    """One sampled token of one sequence -> (new text, why it ends: None, "eos" or "stop").

    End of sequence (unless ``ignore_eos``) releases the text held back for stop strings and is
    not itself text; a stop string ends the text just before it. Shared by ``generate_stream``
    and the engine so both stream exactly the same text.
    """
    if token in eos_token_ids and not cfg.ignore_eos:
        return detok.flush(), "eos"
    delta, stopped = detok.add(token)
    return delta, "stop" if stopped else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if stop.startswith(text[-n:]):
                best = max(best, n)
                break
    return best


@torch.inference_mode()
def generate_stream(
    model,
    tokenizer,
    batch: Batch,
    cfg: GenerationConfig,
    eos_token_ids: set[int],
) -> Iterator[list[str]]:
    """Yield, at each decode step, the new text of every row ("" when it has none or is done)."""
    device = model.device
    ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    rows = ids.shape[0]
    generator = (
        torch.Generator(device="cpu").manual_seed(cfg.seed) if cfg.seed is not None else None
    )
    budget = min(cfg.max_new_tokens, model.config.max_context - ids.shape[1])
    if budget <= 0:
        return
    out = model(
        ids,
        attention_mask=mask,
        pixel_values=batch.pixel_values,
        image_sizes=batch.image_sizes,
        use_cache=True,
        logits_to_keep=1,
    )
    past, logits = out.past_key_values, out.logits[:, -1].float()
    positions = mask.sum(-1, keepdim=True)
    seen = [ids[r][mask[r].bool()] for r in range(rows)]
    detoks = [Detokenizer(tokenizer, cfg.stop) for _ in range(rows)]
    done = [False] * rows
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for step in range(budget):
        tokens = pick_tokens(process_logits(logits, seen, cfg), cfg, generator)
        deltas = [""] * rows
        for r in range(rows):
            if done[r]:
                tokens[r] = pad
                continue
            deltas[r], end = accept_token(int(tokens[r]), detoks[r], cfg, eos_token_ids)
            done[r] = end is not None
            if end != "eos":
                seen[r] = torch.cat([seen[r], tokens[r : r + 1]])
            if step == budget - 1 and not done[r]:
                deltas[r] += detoks[r].flush()
        yield deltas
        if all(done) or step == budget - 1:
            return
        mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
        out = model.language_model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=positions,
            past_key_values=past,
            use_cache=True,
        )
        positions = positions + 1
        past, logits = out.past_key_values, out.logits[:, -1].float()
