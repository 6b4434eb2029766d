"""Benchmark: llavakit's anyres preprocessing against transformers' LlavaNextImageProcessorPil.

Both run on the same ~40 random RGB images (200x150 up to 1600x1200, mixed aspect ratios) with
the LLaVA-1.6 settings (crop 336, shortest edge 336, the five standard pinpoints). The outputs
are checked to be equal first, because a fast preprocessor that drifts from the reference is
useless; then each side is timed (best of several single-threaded passes, one image per call)
and the throughput ratio is printed. Run it from the repository root:

    .venv/bin/python bench/preprocess.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)

from llavakit.config import LLAVA_NEXT_PINPOINTS
from llavakit.processing.image import ImagePreprocessor

CROP = 336


def make_images(count: int, seed: int) -> list[Image.Image]:
    """Random-noise RGB images; noise is the worst case for nothing (resizes cost the same)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        width, height = int(rng.integers(200, 1601)), int(rng.integers(150, 1201))
        if rng.random() < 0.5:  # portrait half the time
            width, height = height, width
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        images.append(Image.fromarray(pixels))
    return images


def best_time(run: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` runs: the least noisy estimate on a shared machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # both sides single-threaded; neither uses torch kernels anyway

    images = make_images(args.images, args.seed)
    pinpoints = [list(p) for p in LLAVA_NEXT_PINPOINTS]
    ours = ImagePreprocessor(
        size=CROP,
        crop_size=CROP,
        aspect="anyres",
        pinpoints=tuple(tuple(p) for p in pinpoints),
    )
    reference = LlavaNextImageProcessorPil(
        size={"shortest_edge": CROP},
        crop_size={"height": CROP, "width": CROP},
        image_grid_pinpoints=pinpoints,
    )

    def run_ours() -> list:
        return [ours(image) for image in images]

    def run_reference() -> list:
        return [reference(image, return_tensors="np")["pixel_values"][0] for image in images]

    worst = 0.0
    for image, a, b in zip(images, run_ours(), run_reference(), strict=True):
        assert tuple(a.shape) == b.shape, (image.size, tuple(a.shape), b.shape)
        worst = max(worst, float(np.abs(a.numpy() - b).max()))
    assert worst <= 1e-5, f"outputs differ: max abs diff {worst}"
    tiles = sum(ours(image).shape[0] for image in images)

    ours_s = best_time(run_ours, args.repeats)
    reference_s = best_time(run_reference, args.repeats)
    n = len(images)
    print(f"{n} images, {tiles} tiles of {CROP}x{CROP}; outputs equal (max abs diff {worst:g})")
    print(f"llavakit:     {n / ours_s:8.1f} images/s  ({ours_s * 1000 / n:6.2f} ms/image)")
    print(f"transformers: {n / reference_s:8.1f} images/s  ({reference_s * 1000 / n:6.2f} ms/image)")
    print(f"ratio llavakit/transformers: {reference_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
