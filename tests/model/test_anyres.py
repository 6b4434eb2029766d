"""Pure anyres arithmetic on small exact cases, and packing == its predicted length."""

from __future__ import annotations

import torch

from llavakit.config import LLAVA_NEXT_PINPOINTS
from llavakit.model import anyres


def test_select_best_resolution_exact_cases():
    pins = LLAVA_NEXT_PINPOINTS
    # 300x800 fits 336x1008 at scale 1.12: every original pixel kept, which beats 336x672
    assert anyres.select_best_resolution((300, 800), pins) == (336, 1008)
    assert anyres.select_best_resolution((800, 300), pins) == (1008, 336)
    assert anyres.select_best_resolution((330, 600), pins) == (336, 672)
    assert anyres.select_best_resolution((1000, 1000), pins) == (672, 672)
    assert anyres.select_best_resolution((100, 1000), pins) == (336, 1008)
    # tiny image: every candidate keeps all pixels, the least waste wins, first listed on ties
    assert anyres.select_best_resolution((10, 10), pins) == (336, 672)


def test_fit_size_ceil_and_cap():
    assert anyres.fit_size((300, 800), (336, 672)) == (252, 672)
    assert anyres.fit_size((301, 800), (336, 672)) == (253, 672)  # 301*0.84 = 252.84 -> ceil
    assert anyres.fit_size((800, 300), (672, 336)) == (672, 252)


def test_unpadded_shape_rounding_modes():
    # 3x7 image on a 2x2 map of 4x4: width-bound, rows kept = 3*8/7 = 3.43 -> 3, pad (8-3)//2 = 2
    assert anyres.unpadded_shape((3, 7), (8, 8)) == ((2, 6), (0, 8))
    # a case where round(x, 7) and truncation differ: 0.1+0.2 style float error
    h, w = 49, 100
    cur = (8, 16)  # width scale 0.16: 49 * 0.16 = 7.84 either way
    assert anyres.unpadded_shape((h, w), cur) == anyres.unpadded_shape((h, w), cur, None)
    assert anyres.unpadded_shape((3, 10), (24, 24), 7) == ((8, 16), (0, 24))  # 7.2 rows kept
    # 47 * (24 / 376) = 2.9999999999999996: transformers rounds to 3, the original truncates to 2
    assert anyres.unpadded_shape((47, 376), (48, 24)) == ((22, 26), (0, 24))
    assert anyres.unpadded_shape((47, 376), (48, 24), None) == ((23, 25), (0, 24))
    float_case = (
        anyres.unpadded_shape((7, 10), (10, 10), 7),
        anyres.unpadded_shape((7, 10), (10, 10), None),
    )
    assert float_case[0] == ((1, 9), (0, 10))  # 7 * (10/10) = 7.0
    assert float_case[0] == float_case[1]


def test_downsized_shape_only_over_budget():
    assert anyres.downsized_shape(48, 48, 24, 4) == (48, 48)
    assert anyres.downsized_shape(96, 96, 24, 4) == (48, 48)
    assert anyres.downsized_shape(96, 96, 24, None) == (96, 96)


def test_pack_tiles_layout_and_length():
    side, dim = 2, 3
    grid = (1, 2)
    tiles = torch.arange((1 + 2) * side * side * dim, dtype=torch.float32).view(3, side * side, dim)
    newline = torch.full((dim,), -1.0)
    packed = anyres.pack_tiles(tiles, (10, 20), grid, "spatial_unpad", newline)
    # base tile first, untouched
    assert torch.equal(packed[:4], tiles[0])
    # map is 2 rows x 4 cols (+ newline) -> row 0 = tile1 row0, tile2 row0, newline
    row0 = packed[4:9]
    assert torch.equal(row0[0], tiles[1, 0]) and torch.equal(row0[2], tiles[2, 0])
    assert torch.equal(row0[4], newline)
    n = anyres.num_packed_tokens((10, 20), grid, side, "spatial_unpad", True)
    assert packed.shape[0] == n == 4 + 2 * 5


def test_pack_and_count_agree_on_many_sizes():
    side, dim = 4, 2
    pins = [[16, 32], [32, 16], [32, 32], [48, 16], [16, 48]]
    for h, w in [(3, 5), (17, 90), (90, 17), (40, 40), (16, 33), (7, 300), (33, 16)]:
        grid = anyres.grid_shape((h, w), pins, 16)
        tiles = torch.randn(1 + grid[0] * grid[1], side * side, dim)
        for merge in ("flat", "spatial", "spatial_unpad"):
            packed = anyres.pack_tiles(tiles, (h, w), grid, merge, torch.zeros(dim), max_tiles=2)
            assert packed.shape[0] == anyres.num_packed_tokens(
                (h, w), grid, side, merge, True, max_tiles=2
            )
