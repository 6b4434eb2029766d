"""Shared fixtures: tiny random checkpoints built from configs (offline, a few seconds each)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from llavakit.testing import build_tiny_checkpoint


@pytest.fixture
def block_import(monkeypatch):
    """``block_import("pkg")``: importing pkg (or a submodule) raises ImportError in this test,
    as on a machine without it."""
    import builtins

    real_import = builtins.__import__
    blocked: set[str] = set()

    def guarded(name, *args, **kwargs):
        if name.split(".")[0] in blocked:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded)
    return blocked.add


@pytest.fixture(scope="session")
def llava15_dir(tmp_path_factory):
    """CLIP tower, mlp2x_gelu, pad, vicuna_v1, transformers <image> token."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "llava15", seed=1)


@pytest.fixture(scope="session")
def llava_next_dir(tmp_path_factory):
    """LLaVA-NeXT: anyres tiling, spatial_unpad, image_newline."""
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("ck") / "llava_next", seed=2, family="llava_next"
    )


@pytest.fixture(scope="session")
def siglip_dir(tmp_path_factory):
    """SigLIP tower (no CLS), strategy "full", two feature layers concatenated."""
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("ck") / "siglip",
        seed=3,
        tower="siglip",
        strategy="full",
        vision_feature_layer=[-1, -3],
    )


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_claiming(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR claims width x height RGB (a decompression-bomb header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def make_image():
    return random_image
