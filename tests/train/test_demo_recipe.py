"""The demo recipe's per-token targets: which cell each tower token sees, and its words."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from llavakit.data import synthetic

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes" / "demo"))
from align_projector import scene_words  # noqa: E402
from pretrain_vision import scene_targets, token_cells  # noqa: E402


def test_token_cells_tile_the_3x3_scene_grid():
    assert token_cells(3).tolist() == list(range(9))
    six = token_cells(6).reshape(6, 6)
    assert six[0, 0] == six[1, 1] == 0 and six[0, 2] == 1 and six[5, 5] == 8
    assert np.bincount(six.ravel()).tolist() == [4] * 9


def test_scene_words_name_each_cells_object_position_and_count():
    scene = synthetic.Scene(
        (
            synthetic.SceneObject("circle", "red", "large", "left"),
            synthetic.SceneObject("square", "blue", "small", "top"),
        )
    )
    words = scene_words(scene, token_cells(3))
    assert words[3] == ["large", "red", "circle", "left", "two"]  # row 1, col 0
    assert words[1] == ["small", "blue", "square", "top", "two"]
    assert words[4] == ["nothing", "center", "two"]  # empty cell of the plus layout
    assert words[0] == words[2] == words[6] == words[8] == ["nothing", "two"]  # corners
    kinds = scene_targets(scene, token_cells(3))[:, 0]
    assert [bool(k) for k in kinds] == [w[0] != "nothing" for w in words]
