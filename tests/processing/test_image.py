"""Image intake refuses bad input up front; preprocessing equals transformers' PIL processors.

The reference processors are transformers' ``LlavaNextImageProcessorPil`` (anyres) and
``LlavaImageProcessorPil`` (pad / square), run on random images, so any drift in resizing,
letterboxing, tiling or normalisation shows up as a pixel difference.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from llavakit.config import LLAVA_NEXT_PINPOINTS, OPENAI_CLIP_MEAN
from llavakit.errors import (
    ImageDecodeError,
    ImageNotFound,
    ImageTooLarge,
    ImageTooSmall,
    ImageURLNotAllowed,
)
from llavakit.model import anyres
from llavakit.model.llava import image_token_count
from llavakit.processing.image import (
    ImageLimits,
    ImagePreprocessor,
    expand_to_square,
    load_image,
    pad_background,
)
from llavakit.processing.processor import image_preprocessor_for
from llavakit.testing import tiny_config, tiny_tokenizer
from tests.conftest import png_claiming

CROP = 336
CLIP_PAD = (122, 116, 104)

# (width, height): tiny, odd, extreme aspect ratios, squares, and sizes either side of the
# pinpoint boundaries (multiples of 336 and the 2:1 / 3:1 aspect ratios where the choice flips).
ANYRES_SIZES = [
    (2, 3),
    (3, 2),
    (5, 200),
    (200, 5),
    (1000, 20),
    (20, 1000),
    (97, 53),
    (335, 335),
    (336, 336),
    (337, 337),
    (672, 672),
    (673, 671),
    (672, 336),
    (336, 672),
    (671, 337),
    (673, 335),
    (1008, 336),
    (336, 1008),
    (1009, 335),
    (1007, 337),
    (640, 480),
    (480, 640),
    (799, 601),
    (1280, 720),
    (333, 999),
    (1001, 999),
    (700, 351),
    (351, 700),
]


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random RGB noise: every pixel differs, so any misplaced or misweighted pixel shows."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def assert_same(ours: torch.Tensor, reference: np.ndarray) -> None:
    """Same tile count and shape, pixel values within 1e-5."""
    assert tuple(ours.shape) == reference.shape
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, torch.from_numpy(reference), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def next_config():
    """A llava_next config with LLaVA-1.6's 336px crop, patch 14 and pinpoints."""
    config = tiny_config(family="llava_next", image_size=336, patch_size=14)
    assert config.image_grid_pinpoints == LLAVA_NEXT_PINPOINTS
    return config


@pytest.fixture(scope="module")
def hf_next() -> LlavaNextImageProcessorPil:
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": CROP},
        crop_size={"height": CROP, "width": CROP},
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
    )


def hf_llava(do_pad: bool, size: int = CROP, crop: int = CROP) -> LlavaImageProcessorPil:
    return LlavaImageProcessorPil(
        do_pad=do_pad,
        size={"shortest_edge": size},
        crop_size={"height": crop, "width": crop},
    )


def hf_pixels(processor, image: Image.Image) -> np.ndarray:
    """[tiles, 3, H, W] like ours: llava gives one [3, H, W] per image, llava_next the tiles."""
    pixels = processor(image, return_tensors="np")["pixel_values"]
    return pixels[0] if isinstance(processor, LlavaNextImageProcessorPil) else pixels


# -- anyres (LLaVA-1.6) --------------------------------------------------------------------------


@pytest.mark.parametrize("size", ANYRES_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_anyres_equals_transformers(size, next_config, hf_next):
    image = noise(*size, seed=size[0] * 7919 + size[1])
    ours = image_preprocessor_for(next_config)(image)
    assert_same(ours, hf_pixels(hf_next, image))
    # and the tile count is the grid the model will unpack
    rows, cols = anyres.grid_shape(
        (image.height, image.width), next_config.image_grid_pinpoints, CROP
    )
    assert ours.shape[0] == 1 + rows * cols


def test_anyres_tiles_match_call(next_config):
    """The public ``anyres_tiles`` gives the PIL tiles that ``__call__`` normalises."""
    processor = image_preprocessor_for(next_config)
    image = noise(500, 260, seed=3)
    tiles = processor.anyres_tiles(image)
    pixels = processor(image)
    assert len(tiles) == pixels.shape[0]
    for tile, expected in zip(tiles, pixels, strict=True):
        assert tile.size == (CROP, CROP)
        assert torch.equal(processor.normalize(np.asarray(tile)), expected)


@pytest.mark.parametrize("size", [(2, 3), (700, 300), (333, 999)], ids=str)
def test_anyres_unusual_sizes_equal_transformers(size):
    """Shortest edge != crop and pinpoints that are not crop multiples take the slow path."""
    pins = [[280, 560], [560, 280], [560, 560], [280, 500]]
    ours = ImagePreprocessor(
        size=300, crop_size=280, aspect="anyres", pinpoints=tuple(map(tuple, pins))
    )
    reference = LlavaNextImageProcessorPil(
        size={"shortest_edge": 300},
        crop_size={"height": 280, "width": 280},
        image_grid_pinpoints=pins,
    )
    image = noise(*size, seed=11)
    assert_same(ours(image), hf_pixels(reference, image))


@pytest.fixture(scope="module")
def hf_next_processor(hf_next) -> LlavaNextProcessor:
    """transformers' processor as llava-hf/llava-v1.6 ships it (CLIP: one extra CLS token)."""
    return LlavaNextProcessor(
        image_processor=hf_next,
        tokenizer=tiny_tokenizer(),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


@pytest.mark.parametrize("size", ANYRES_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_image_token_count_equals_transformers(size, next_config, hf_next_processor):
    width, height = size
    expected = hf_next_processor._get_num_multimodal_tokens(image_sizes=[(height, width)])
    assert image_token_count(next_config, (height, width)) == expected.num_image_tokens[0]


@pytest.mark.parametrize("size", [(640, 480), (20, 1000), (1009, 335)], ids=str)
def test_image_token_count_equals_expanded_prompt(size, next_config, hf_next_processor):
    """Counted on the token ids transformers' processor actually produces."""
    width, height = size
    encoded = hf_next_processor(
        text="a <image> b", images=noise(width, height), return_tensors="pt"
    )
    produced = int((encoded["input_ids"] == hf_next_processor.image_token_id).sum())
    assert image_token_count(next_config, (height, width)) == produced


# -- pad (LLaVA-1.5) and square ------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [(2, 3), (5, 200), (1000, 20), (336, 336), (337, 200), (640, 480), (481, 640)], ids=str
)
def test_pad_equals_transformers(size):
    processor = image_preprocessor_for(tiny_config(image_size=CROP))
    assert processor.aspect == "pad"
    image = noise(*size, seed=size[0] + size[1])
    assert_same(processor(image), hf_pixels(hf_llava(do_pad=True), image))


def test_pad_background_is_clip_mean_colour():
    assert pad_background(OPENAI_CLIP_MEAN) == CLIP_PAD
    wide = noise(31, 10, seed=1)  # 21 rows of padding: 10 above, 11 below
    square = np.asarray(expand_to_square(wide, CLIP_PAD))
    assert square.shape == (31, 31, 3)
    assert (square[:10] == CLIP_PAD).all() and (square[20:] == CLIP_PAD).all()
    assert np.array_equal(square[10:20], np.asarray(wide))
    tall = noise(4, 9, seed=2)  # 5 columns of padding: 2 left, 3 right
    square = np.asarray(expand_to_square(tall, CLIP_PAD))
    assert (square[:, :2] == CLIP_PAD).all() and (square[:, 6:] == CLIP_PAD).all()
    assert np.array_equal(square[:, 2:6], np.asarray(tall))
    already = noise(7, 7)
    assert expand_to_square(already, CLIP_PAD) is already


@pytest.mark.parametrize("size", [(2, 3), (200, 5), (336, 336), (500, 337), (640, 480)], ids=str)
def test_square_equals_clip_processing(size):
    image = noise(*size, seed=size[0] * 3 + size[1])
    ours = ImagePreprocessor(aspect="square")(image)
    assert ours.shape == (1, 3, CROP, CROP)
    assert_same(ours, hf_pixels(hf_llava(do_pad=False), image))


def test_square_crop_larger_than_resize_pads_with_zeros_like_transformers():
    image = noise(300, 170, seed=5)
    ours = ImagePreprocessor(size=200, crop_size=224, aspect="square")(image)
    assert_same(ours, hf_pixels(hf_llava(do_pad=False, size=200, crop=224), image))


def test_non_rgb_input_is_converted():
    grey = Image.fromarray(np.full((40, 60), 200, dtype=np.uint8), "L")
    ours = ImagePreprocessor(aspect="pad")(grey)
    assert_same(ours, hf_pixels(hf_llava(do_pad=True), grey.convert("RGB")))


def test_unknown_aspect_is_refused():
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        ImagePreprocessor(aspect="stretch")(noise(8, 8))


# -- intake --------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(ImageNotFound, match="no such image"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError):  # also catchable as the builtin
        load_image(str(tmp_path / "nope.png"))


def test_non_image_bytes(tmp_path):
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        load_image(write(tmp_path / "x.png", b"this is plain text, not a picture\n" * 10))
    with pytest.raises(ImageDecodeError):
        load_image(b"GIF89a but then nothing sensible")


def test_truncated_jpeg(tmp_path):
    data = encode(noise(96, 64), "JPEG", quality=90)
    assert load_image(write(tmp_path / "whole.jpg", data)).size == (96, 64)
    with pytest.raises(ImageDecodeError, match="damaged"):
        load_image(write(tmp_path / "half.jpg", data[: len(data) // 2]))


def test_empty_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="empty"):
        load_image(write(tmp_path / "empty.jpg", b""))
    with pytest.raises(ImageDecodeError, match="empty"):
        load_image(b"")


def test_one_pixel_image_is_too_small(tmp_path):
    with pytest.raises(ImageTooSmall):
        load_image(write(tmp_path / "dot.png", encode(Image.new("RGB", (1, 1)), "PNG")))
    with pytest.raises(ImageTooSmall):
        load_image(Image.new("RGB", (1, 40)))
    assert load_image(Image.new("RGB", (2, 2))).size == (2, 2)


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    path = write(tmp_path / "bomb.png", png_claiming(30000, 30000))
    assert path.stat().st_size < 200
    start = time.perf_counter()
    with pytest.raises(ImageTooLarge):
        load_image(path)
    assert time.perf_counter() - start < 1.0


def test_pixel_limit_checked_before_decoding(tmp_path, monkeypatch):
    """Under PIL's own bomb limit but over ours: refused without ever loading pixel data."""
    from PIL import ImageFile

    def no_decoding(self):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    path = write(tmp_path / "big.png", png_claiming(3000, 2000))
    with pytest.raises(ImageTooLarge, match="before decoding"):
        load_image(path, ImageLimits(max_pixels=5_000_000))


def test_file_over_max_bytes(tmp_path):
    data = encode(noise(64, 64), "PNG")
    limits = ImageLimits(max_bytes=len(data) - 1)
    with pytest.raises(ImageTooLarge, match="byte limit"):
        load_image(write(tmp_path / "big.png", data), limits)
    with pytest.raises(ImageTooLarge):
        load_image(data, limits)
    assert load_image(data, ImageLimits(max_bytes=len(data))).size == (64, 64)


def test_url_needs_opt_in():
    with pytest.raises(ImageURLNotAllowed, match="disabled"):
        load_image("https://example.com/cat.png")
    with pytest.raises(ImageURLNotAllowed):
        load_image("http://127.0.0.1:9/cat.png")


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cyan = Image.new("CMYK", (16, 8), (255, 0, 0, 0))
    image = load_image(write(tmp_path / "cmyk.jpg", encode(cyan, "JPEG", quality=95)))
    assert image.mode == "RGB" and image.size == (16, 8)
    pixels = np.asarray(image).astype(int)
    assert np.abs(pixels - [0, 255, 255]).max() <= 3


def test_la_png_alpha_goes_over_white(tmp_path):
    grey = np.full((6, 8), 40, dtype=np.uint8)
    alpha = np.zeros((6, 8), dtype=np.uint8)
    alpha[:, 4:] = 255  # left half transparent, right half opaque
    la = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)])
    image = load_image(write(tmp_path / "la.png", encode(la, "PNG")))
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert (pixels[:, :4] == 255).all()
    assert (pixels[:, 4:] == 40).all()


def test_palette_png_with_transparency(tmp_path):
    indices = np.zeros((6, 8), dtype=np.uint8)
    indices[:, 4:] = 1
    palette_image = Image.fromarray(indices, "P")
    palette_image.putpalette([0, 0, 0, 200, 30, 10] + [0] * 762)
    data = encode(palette_image, "PNG", transparency=0)  # index 0 is fully transparent
    image = load_image(write(tmp_path / "p.png", data))
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert (pixels[:, :4] == 255).all()  # transparent -> white, not palette black
    assert (pixels[:, 4:] == (200, 30, 10)).all()


def test_sixteen_bit_grey_png_scales_to_eight_bits(tmp_path):
    values = np.array([[0, 32768, 65535, 257]], dtype=np.uint16).repeat(3, axis=0)
    source = Image.fromarray(values)
    assert source.mode == "I;16"
    image = load_image(write(tmp_path / "deep.png", encode(source, "PNG")))
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert (pixels[..., 0] == pixels[..., 2]).all()
    assert pixels[0, :, 0].tolist() == [0, 128, 255, 1]
    assert load_image(source).getpixel((2, 0)) == (255, 255, 255)


def test_rgba_alpha_goes_over_white(tmp_path):
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red everywhere
    rgba[:, 2:4, 3] = 128  # half transparent
    rgba[:, 4:, 3] = 255  # opaque
    image = load_image(write(tmp_path / "rgba.png", encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert image.mode == "RGB"
    pixels = np.asarray(image).astype(int)
    assert (pixels[:, :2] == 255).all()
    assert np.abs(pixels[:, 2:4] - [255, 127, 127]).max() <= 1
    assert (pixels[:, 4:] == [255, 0, 0]).all()


def test_animated_gif_takes_first_frame(tmp_path):
    red, blue = Image.new("RGB", (10, 8), (255, 0, 0)), Image.new("RGB", (10, 8), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    image = load_image(write(tmp_path / "anim.gif", data))
    assert image.mode == "RGB" and image.size == (10, 8)
    assert (np.asarray(image) == (255, 0, 0)).all()


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 20:] = 255  # left half black, right half white
    source = Image.fromarray(pixels)
    exif = source.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(source, "JPEG", quality=95, exif=exif.tobytes())
    image = load_image(write(tmp_path / "rotated.jpg", data))
    assert image.size == (20, 40)  # width and height swapped
    grey = np.asarray(image).mean(axis=2)
    assert grey[:15].mean() < 20  # the left (black) half is now on top
    assert grey[25:].mean() > 235


def test_sources_agree(tmp_path):
    """Path, str, bytes and a PIL image all give the same RGB pixels."""
    source = noise(12, 9, seed=4)
    data = encode(source, "PNG")
    path = write(tmp_path / "n.png", data)
    expected = np.asarray(source)
    for item in (path, str(path), data, bytearray(data), source):
        image = load_image(item)
        assert image.mode == "RGB"
        assert np.array_equal(np.asarray(image), expected)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/x.png",
        "http://localhost/x.png",
        "https://10.1.2.3/a.jpg",
        "http://[::1]/a",
    ],
)
def test_url_to_private_or_loopback_address_is_refused(url):
    limits = ImageLimits(allow_urls=True)
    with pytest.raises(ImageURLNotAllowed, match="non-public address"):
        load_image(url, limits)
