"""Safe image intake and LLaVA preprocessing (square / pad / anyres).

Intake refuses oversized files and decompression bombs before decoding, applies EXIF
orientation, takes the first frame of animations and converts every PIL mode to RGB.
Preprocessing reproduces transformers' PIL image processors exactly (same PIL resizes, same
float32 arithmetic) but normalises through a 256-entry lookup table, which is much faster.
"""

from __future__ import annotations

import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from llavakit.config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from llavakit.errors import (
    ImageDecodeError,
    ImageError,
    ImageNotFound,
    ImageTooLarge,
    ImageTooSmall,
    ImageURLNotAllowed,
)
from llavakit.model.anyres import fit_size, select_best_resolution

ImageSource = str | os.PathLike | bytes | Image.Image


@dataclass(frozen=True)
class ImageLimits:
    """What an image may be. Pixel limits are checked from the header, before decoding."""

    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 64_000_000
    min_side: int = 2
    allow_urls: bool = False
    url_timeout: float = 10.0


DEFAULT_LIMITS = ImageLimits()


def load_image(source: ImageSource, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Open an image from a path, bytes, PIL image or (if allowed) URL; return it as RGB.

    >>> load_image(Image.new("L", (4, 3))).mode
    'RGB'
    """
    if isinstance(source, Image.Image):
        return _finish(source, limits, "image")
    if isinstance(source, bytes | bytearray):
        return _decode(bytes(source), limits, "image bytes")
    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        if not limits.allow_urls:
            raise ImageURLNotAllowed(f"{text}: fetching image URLs is disabled; download it first")
        return _decode(_fetch(text, limits), limits, text)
    path = Path(text)
    if not path.is_file():
        raise ImageNotFound(f"{text}: no such image file")
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise ImageTooLarge(f"{text}: file is {size} bytes, over the {limits.max_bytes}-byte limit")
    return _decode(path.read_bytes(), limits, text)


def check_public_url(url: str) -> None:
    """Refuse URLs whose host resolves to a private, loopback, link-local or reserved address,
    so enabling URL fetching cannot be used to reach the machine's own network."""
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname
    if not host:
        raise ImageURLNotAllowed(f"{url}: no host in the URL")
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        raise ImageDecodeError(f"{url}: cannot resolve host {host!r}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise ImageURLNotAllowed(f"{url}: {host} resolves to non-public address {address}")


def _fetch(url: str, limits: ImageLimits) -> bytes:
    """Download an image URL: public hosts only, no redirects, at most ``max_bytes``."""
    import urllib.error
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
            raise ImageURLNotAllowed(f"{url}: redirects are not followed (to {newurl})")

    check_public_url(url)
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(url, timeout=limits.url_timeout) as response:
            data = response.read(limits.max_bytes + 1)
    except ImageError:
        raise
    except (urllib.error.URLError, OSError) as exc:
        raise ImageDecodeError(f"{url}: download failed ({exc})") from None
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"{url}: more than {limits.max_bytes} bytes")
    return data


def _decode(data: bytes, limits: ImageLimits, name: str) -> Image.Image:
    if not data:
        raise ImageDecodeError(f"{name}: empty file, not an image")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"{name}: {len(data)} bytes, over the {limits.max_bytes}-byte limit")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's own guard, far above our limit
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = found.group(1) if found else "too many"
        raise ImageTooLarge(
            f"{name}: header claims {pixels} pixels, over the {limits.max_pixels}-pixel limit "
            "(refused before decoding)"
        ) from None
    except Exception:
        raise ImageDecodeError(f"{name}: not a recognised image format") from None
    return _finish(image, limits, name)


def _finish(image: Image.Image, limits: ImageLimits, name: str) -> Image.Image:
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"{name}: {width}x{height} is {width * height} pixels, over the "
            f"{limits.max_pixels}-pixel limit (refused before decoding)"
        )
    if min(width, height) < limits.min_side:
        raise ImageTooSmall(
            f"{name}: {width}x{height} is too small; at least {limits.min_side}px a side"
        )
    try:
        image.load()  # animations open on their first frame; only that one is decoded
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except ImageError:
        raise
    except Exception as exc:  # truncated / corrupt data surfaces here
        raise ImageDecodeError(f"{name}: damaged image data ({exc})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: alpha over white (as transformers), 16-bit and float scaled to 8 bits."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        if mode == "F":
            top = max(float(arr.max()), 1e-12) if arr.max() > 1 else 1.0
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad to a square with ``background``, the original centred (LLaVA-1.5 "pad")."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def pad_background(mean: tuple[float, float, float]) -> tuple[int, int, int]:
    """(122, 116, 104) for CLIP's mean: mean * 255, truncated to integers as the original."""
    return tuple(int(m * 255) for m in mean)  # type: ignore[return-value]


@dataclass(frozen=True)
class ImagePreprocessor:
    """CLIP-style resize (shortest edge) + centre crop + normalise, and the LLaVA modes around it.

    Only the PIL resizes are done with PIL (they define the exact pixel values); padding,
    tiling and normalisation work on one uint8 array and write straight into the output.
    """

    size: int = 336  # shortest edge
    crop_size: int = 336
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    aspect: str = "pad"  # square | pad | anyres | anyres_max_N
    pinpoints: tuple[tuple[int, int], ...] = ()  # (height, width)
    resample: int = Image.Resampling.BICUBIC
    threads: bool = True  # resize base tile and letterbox concurrently (anyres, big images)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> float32 tensor [tiles, 3, crop, crop] (tiles = 1 unless anyres)."""
        image = to_rgb(image)
        if self.aspect.startswith("anyres"):
            return torch.from_numpy(self._anyres(image))
        if self.aspect == "pad":
            image = expand_to_square(image, pad_background(self.mean))
        elif self.aspect == "resize":
            image = image.resize((self.crop_size, self.crop_size), self.resample)
        elif self.aspect not in ("square", "crop"):
            raise ValueError(f"unknown image_aspect_ratio {self.aspect!r}")
        out = np.empty((1, 3, self.crop_size, self.crop_size), dtype=np.float32)
        self._normalize_into(out[0], self.resize_crop(image))
        return torch.from_numpy(out)

    def _fit(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """The image resized into its best pinpoint: (uint8 HWC pixels, (top, left), (h, w))."""
        width, height = image.size
        target_h, target_w = select_best_resolution(
            (height, width), [list(p) for p in self.pinpoints]
        )
        new_h, new_w = fit_size((height, width), (target_h, target_w))
        if (new_w, new_h) != (width, height):  # PIL returns an identical copy otherwise
            image = image.resize((new_w, new_h), self.resample)
        offset = ((target_h - new_h) // 2, (target_w - new_w) // 2)
        return np.asarray(image), offset, (target_h, target_w)

    def _letterbox(self, image: Image.Image) -> np.ndarray:
        """The image fitted into its best pinpoint and centred on black, as uint8 HWC."""
        pixels, (top, left), target = self._fit(image)
        canvas = np.zeros((*target, 3), dtype=np.uint8)
        canvas[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
        return canvas

    def _base(self, image: Image.Image) -> Image.Image:
        """The whole image squashed to size x size (the first anyres tile)."""
        if image.size == (self.size, self.size):
            return image
        return image.resize((self.size, self.size), self.resample)

    def _tile_boxes(self, height: int, width: int) -> list[tuple[int, int]]:
        side = self.crop_size
        return [(y, x) for y in range(0, height, side) for x in range(0, width, side)]

    def anyres_tiles(self, image: Image.Image) -> list[Image.Image]:
        """[whole image at size x size] + row-major crop-size tiles of the letterboxed image.

        Tiles at the right/bottom edge are cut short when a pinpoint is not a multiple of the
        crop size, like transformers' ``divide_to_patches``.
        """
        canvas = self._letterbox(image)
        side = self.crop_size
        tiles = [
            Image.fromarray(np.ascontiguousarray(canvas[y : y + side, x : x + side]))
            for y, x in self._tile_boxes(*canvas.shape[:2])
        ]
        return [self._base(image), *tiles]

    def _anyres(self, image: Image.Image) -> np.ndarray:
        side = self.crop_size
        # The two bicubic resizes (base tile, letterboxed image) dominate the cost; PIL releases
        # the GIL while resizing, so on big images the base one runs on a helper thread.
        base = None
        if self.threads and image.width * image.height >= PARALLEL_MIN_PIXELS:
            base = _resize_pool().submit(self._base, image)
        pixels, (top, left), (target_h, target_w) = self._fit(image)
        boxes = self._tile_boxes(target_h, target_w)
        out = np.empty((1 + len(boxes), 3, side, side), dtype=np.float32)
        base_image = base.result() if base is not None else self._base(image)
        self._normalize_into(out[0], self.resize_crop(base_image))
        if self.size != side or target_h % side or target_w % side:
            # Unusual settings: tiles are resized and centre-cropped like the base image.
            canvas = np.zeros((target_h, target_w, 3), dtype=np.uint8)
            canvas[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
            for i, (y, x) in enumerate(boxes, start=1):
                tile = Image.fromarray(np.ascontiguousarray(canvas[y : y + side, x : x + side]))
                self._normalize_into(out[i], self.resize_crop(tile))
            return out
        # Tiles are exactly crop-sized: read them straight from the resized image and fill the
        # letterbox bars with the normalised value of black, without building the canvas.
        bottom, right = top + pixels.shape[0], left + pixels.shape[1]
        black = _lookup_table(self.mean, self.std)[:, 0]
        for i, (y, x) in enumerate(boxes, start=1):
            y0, y1 = max(y, top), min(y + side, bottom)
            x0, x1 = max(x, left), min(x + side, right)
            inner = pixels[y0 - top : y1 - top, x0 - left : x1 - left]
            if inner.shape[:2] != (side, side):
                out[i] = black[:, None, None]
            if inner.size:
                self._normalize_into(out[i, :, y0 - y : y1 - y, x0 - x : x1 - x], inner)
        return out

    def resize_crop(self, image: Image.Image) -> np.ndarray:
        """Shortest edge to ``size`` then centre crop (zero-padded if too small), as uint8 HWC."""
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_short, new_long = self.size, int(self.size * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), self.resample)
        arr = np.asarray(image)
        crop = self.crop_size
        if new_h < crop or new_w < crop:  # centre-pad like transformers' center_crop
            padded = np.zeros((max(crop, new_h), max(crop, new_w), 3), dtype=np.uint8)
            top, left = -(-(padded.shape[0] - new_h) // 2), -(-(padded.shape[1] - new_w) // 2)
            padded[top : top + new_h, left : left + new_w] = arr
            arr, new_h, new_w = padded, padded.shape[0], padded.shape[1]
        top, left = (new_h - crop) // 2, (new_w - crop) // 2
        return arr[top : top + crop, left : left + crop]

    def normalize(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 HWC -> normalised float32 CHW through a per-channel lookup table."""
        out = np.empty((3, pixels.shape[0], pixels.shape[1]), dtype=np.float32)
        self._normalize_into(out, pixels)
        return torch.from_numpy(out)

    def _normalize_into(self, out: np.ndarray, pixels: np.ndarray) -> None:
        """Write the normalised CHW values of uint8 HWC ``pixels`` into ``out`` (no temporaries).

        ``mode="clip"`` lets numpy skip its buffered bounds check; uint8 indices of a 256-entry
        table are always in range, so clipping never changes a value.
        """
        table = _lookup_table(self.mean, self.std)
        for c in range(3):
            np.take(table[c], pixels[:, :, c], out=out[c], mode="clip")


PARALLEL_MIN_PIXELS = 250_000
_POOL: ThreadPoolExecutor | None = None


def _resize_pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llavakit-resize")
    return _POOL


_TABLES: dict[tuple, np.ndarray] = {}


def _lookup_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """[3, 256] table with the exact float32 values of transformers' rescale + normalize."""
    key = (tuple(mean), tuple(std))
    if key not in _TABLES:
        levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
        m = np.asarray(mean, dtype=np.float32)[:, None]
        s = np.asarray(std, dtype=np.float32)[:, None]
        _TABLES[key] = np.ascontiguousarray((levels[None, :] - m) / s)
    return _TABLES[key]
