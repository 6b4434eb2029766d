"""Logit check between a source model and a converted checkpoint on a sample input."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image


def sample_image(seed: int = 0) -> Image.Image:
    """A deterministic non-square test image with structure (gradients and blocks)."""
    rng = np.random.default_rng(seed)
    h, w = 300, 420
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 255 // w), (y * 255 // h), ((x + y) * 127 // (h + w))], -1).astype(
        np.uint8
    )
    arr[60:160, 100:220] = rng.integers(0, 255, 3, dtype=np.uint8)
    return Image.fromarray(arr)


@torch.inference_mode()
def compare_logits(
    model, processor, converted: str | os.PathLike, prompt: str = "Describe the image."
) -> tuple[float, bool]:
    """Max |logit diff| over the source vocabulary, and whether 8-token greedy text is equal."""
    from llavakit.checkpoint import load_checkpoint
    from llavakit.pipeline import Pipeline

    out_model, out_processor = load_checkpoint(converted, dtype=torch.float32)
    image = sample_image()
    logits = []
    texts = []
    for m, p in ((model.float(), processor), (out_model, out_processor)):
        batch = p.collate([p.encode([image], prompt)])
        logits.append(
            m(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_sizes).logits
        )
        texts.append(Pipeline(m, p).chat([image], prompt, max_new_tokens=8))
    vocab = min(logits[0].shape[-1], logits[1].shape[-1])
    if logits[0].shape[1] != logits[1].shape[1]:
        raise RuntimeError(f"sequence lengths differ: {logits[0].shape[1]} vs {logits[1].shape[1]}")
    diff = (logits[0][..., :vocab] - logits[1][..., :vocab]).abs().max().item()
    return diff, texts[0] == texts[1]
