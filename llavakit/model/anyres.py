"""LLaVA-NeXT "anyres" arithmetic: best resolution, tile grid, unpadding, feature packing.

Sizes are (height, width) throughout, like transformers; the original code used (width,
height) for images, which the callers convert at the edge.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def select_best_resolution(
    image_size: tuple[int, int], pinpoints: list[list[int]]
) -> tuple[int, int]:
    """Pick the pinpoint that keeps most of the image's pixels, then wastes least.

    >>> select_best_resolution((300, 800), [[336, 672], [672, 336], [672, 672]])
    (336, 672)
    """
    height, width = image_size
    best, best_effective, best_waste = None, -1, math.inf
    for cand_h, cand_w in pinpoints:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (int(cand_h), int(cand_w)), effective, waste
    assert best is not None, "pinpoints must not be empty"
    return best


def fit_size(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Size of the image scaled to fit inside ``target`` keeping its aspect (ceil, capped)."""
    height, width = image_size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def grid_shape(
    image_size: tuple[int, int], pinpoints: list[list[int]], tile: int
) -> tuple[int, int]:
    """(rows, cols) of crop-size tiles for an image."""
    best_h, best_w = select_best_resolution(image_size, pinpoints)
    return best_h // tile, best_w // tile


def unpadded_shape(
    image_size: tuple[int, int], grid_hw: tuple[int, int], round_digits: int | None = 7
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Rows/columns of the feature map to keep after removing the letterbox.

    ``grid_hw`` is the feature map size (rows*side, cols*side). Returns ((top, bottom),
    (left, right)) slice bounds. ``round_digits=None`` truncates like the original code.
    """
    height, width = image_size
    cur_h, cur_w = grid_hw

    def to_int(x: float) -> int:
        return int(round(x, round_digits)) if round_digits is not None else int(x)

    if width / height > cur_w / cur_h:
        new_h = to_int(height * (cur_w / width))
        pad = (cur_h - new_h) // 2
        return (pad, cur_h - pad), (0, cur_w)
    new_w = to_int(width * (cur_h / height))
    pad = (cur_w - new_w) // 2
    return (0, cur_h), (pad, cur_w - pad)


def downsized_shape(h: int, w: int, side: int, max_tiles: int | None) -> tuple[int, int]:
    """anyres_max_N: shrink the unpadded map when it is over 1.1x the budget of N tiles."""
    if max_tiles is None:
        return h, w
    times = math.sqrt(h * w / (max_tiles * side * side))
    if times > 1.1:
        return int(h // times), int(w // times)
    return h, w


def pack_tiles(
    tiles: torch.Tensor,
    image_size: tuple[int, int],
    grid: tuple[int, int],
    merge_type: str,
    newline: torch.Tensor | None,
    round_digits: int | None = 7,
    max_tiles: int | None = None,
) -> torch.Tensor:
    """Turn per-tile features [1 + rows*cols, side*side, D] into the token sequence [N, D].

    Base tile first (no newline), then the tiles' features arranged as one map, unpadded, with
    ``newline`` appended after each row (spatial_unpad) — or simply flattened (flat).
    """
    base, rest = tiles[0], tiles[1:]
    if merge_type == "flat":
        return torch.cat([base, rest.flatten(0, 1)], dim=0)
    rows, cols = grid
    side = math.isqrt(rest.shape[1])
    dim = rest.shape[-1]
    fmap = (
        rest.view(rows, cols, side, side, dim)
        .permute(4, 0, 2, 1, 3)
        .reshape(dim, rows * side, cols * side)
    )
    if "unpad" in merge_type:
        (top, bottom), (left, right) = unpadded_shape(image_size, fmap.shape[1:], round_digits)
        fmap = fmap[:, top:bottom, left:right]
        new_h, new_w = downsized_shape(fmap.shape[1], fmap.shape[2], side, max_tiles)
        if (new_h, new_w) != tuple(fmap.shape[1:]):
            fmap = F.interpolate(fmap[None], size=(new_h, new_w), mode="bilinear")[0]
        if newline is not None:
            column = newline.to(fmap.dtype)[:, None, None].expand(dim, fmap.shape[1], 1)
            fmap = torch.cat([fmap, column], dim=2)
    return torch.cat([base, fmap.flatten(1, 2).transpose(0, 1)], dim=0)


def num_packed_tokens(
    image_size: tuple[int, int],
    grid: tuple[int, int],
    side: int,
    merge_type: str,
    has_newline: bool,
    round_digits: int | None = 7,
    max_tiles: int | None = None,
    tokens_per_tile: int | None = None,
) -> int:
    """Length of ``pack_tiles``' output, computed without running the model."""
    per_tile = side * side if tokens_per_tile is None else tokens_per_tile
    rows, cols = grid
    if merge_type == "flat":
        return per_tile * (1 + rows * cols)
    h, w = rows * side, cols * side
    if "unpad" in merge_type:
        (top, bottom), (left, right) = unpadded_shape(image_size, (h, w), round_digits)
        h, w = downsized_shape(bottom - top, right - left, side, max_tiles)
        if has_newline:
            return per_tile + h * (w + 1)
    return per_tile + h * w
