"""Benchmark: llavakit's anyres preprocessing against transformers' LlavaNextImageProcessorPil.

Both run on the same ~40 random RGB images (200x150 up to 1600x1200, mixed aspect ratios) with
the LLaVA-1.6 settings (crop 336, shortest edge 336, the five standard pinpoints). The outputs
are checked to be equal first, because a fast preprocessor that drifts from the reference is
useless; then each side is timed and the throughput ratio is printed. Both sides run
one image per call and return torch tensors (transformers with
``return_tensors="pt"``); passes alternate between the two and the best pass of each counts,
which is the least noisy estimate on a shared machine. Most of either side's time is the two
bicubic PIL resizes per image, which must stay bit-identical, so one thread cannot go much
above 2x (the script prints that ceiling: transformers time / time of the resizes alone).
llavakit by default runs the base-tile resize on a helper thread beside the letterbox resize
(PIL releases the GIL), so it uses both cores for one image; the 1-thread ratio is printed too.
Run it from the repository root:

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
from llavakit.model.anyres import fit_size, select_best_resolution
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


def best_times(runs: list[Callable[[], object]], repeats: int) -> list[float]:
    """Best wall time of each run over ``repeats`` alternating passes (so drift hits both)."""
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # neither side uses torch kernels; keep them off the other core

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

    single = ImagePreprocessor(
        size=CROP,
        crop_size=CROP,
        aspect="anyres",
        pinpoints=tuple(tuple(p) for p in pinpoints),
        threads=False,
    )

    def run_ours() -> list:
        return [ours(image) for image in images]

    def run_single() -> list:
        return [single(image) for image in images]

    def run_reference() -> list:
        return [reference(image, return_tensors="pt")["pixel_values"][0] for image in images]

    resizes = []  # the two bicubic resizes each image needs; both sides must do exactly these
    for image in images:
        size = (image.height, image.width)
        new_h, new_w = fit_size(size, select_best_resolution(size, pinpoints))
        resizes.append((image, (new_w, new_h)))

    def run_resizes_only() -> list:
        bicubic = Image.Resampling.BICUBIC
        return [(im.resize(wh, bicubic), im.resize((CROP, CROP), bicubic)) for im, wh in resizes]

    worst = 0.0
    for image, a, b in zip(images, run_ours(), run_reference(), strict=True):
        assert a.shape == b.shape, (image.size, tuple(a.shape), tuple(b.shape))
        worst = max(worst, float((a - b).abs().max()))
    assert worst <= 1e-5, f"outputs differ: max abs diff {worst}"
    tiles = sum(ours(image).shape[0] for image in images)

    for a, b in zip(run_single(), run_ours(), strict=True):
        assert torch.equal(a, b)
    ours_s, single_s, reference_s, floor_s = best_times(
        [run_ours, run_single, run_reference, run_resizes_only], args.repeats
    )
    n = len(images)
    print(f"{n} images, {tiles} tiles of {CROP}x{CROP}; outputs equal (max abs diff {worst:g})")
    print(f"llavakit:     {n / ours_s:8.1f} images/s  ({ours_s * 1000 / n:6.2f} ms/image)")
    print(
        f"llavakit, 1 thread: {n / single_s:8.1f} images/s  ({single_s * 1000 / n:6.2f} ms/image)"
    )
    print(
        f"transformers: {n / reference_s:8.1f} images/s  ({reference_s * 1000 / n:6.2f} ms/image)"
    )
    print(
        f"PIL resizes alone: {n / floor_s:8.1f} images/s  (ceiling for the ratio: "
        f"{reference_s / floor_s:.2f}x)"
    )
    print(
        f"ratio llavakit/transformers: {reference_s / ours_s:.2f}x (default: the base-tile resize"
    )
    print(
        f"  runs on a helper thread beside the letterbox resize; 1 thread: {reference_s / single_s:.2f}x)"
    )


if __name__ == "__main__":
    main()
