"""Specific exceptions: each says what went wrong and what to do about it.

The CLI prints ``str(error)`` on one line and exits non-zero; the server maps them to 4xx.
"""

from __future__ import annotations


class LlavakitError(Exception):
    """Base class of every error llavakit raises on purpose."""


class ImageError(LlavakitError, ValueError):
    """An image could not be used."""


class ImageNotFound(ImageError, FileNotFoundError):
    """The image path does not exist."""


class ImageDecodeError(ImageError):
    """The bytes are empty, not an image, or a damaged image."""


class ImageTooLarge(ImageError):
    """The file or its pixel count is over the configured limit (checked before decoding)."""


class ImageTooSmall(ImageError):
    """The image is too small to carry information (e.g. 1x1)."""


class ImageURLNotAllowed(ImageError):
    """A URL was given but fetching URLs was not enabled by the caller."""


class ImageCountMismatch(LlavakitError, ValueError):
    """The prompt has a different number of ``<image>`` placeholders than images given."""

    def __init__(self, placeholders: int, images: int, where: str = "prompt") -> None:
        self.placeholders = placeholders
        self.images = images
        super().__init__(
            f"the {where} has {placeholders} <image> placeholder(s) but {images} image(s) were "
            "given; use one placeholder per image, or none to put all images before the text"
        )


class FeatureCountMismatch(LlavakitError, ValueError):
    """The number of image placeholder tokens differs from the number of image features."""

    def __init__(self, tokens: int, features: int) -> None:
        self.tokens = tokens
        self.features = features
        super().__init__(
            f"the input has {tokens} image placeholder tokens but the images produce {features} "
            "features; the processor and model configurations disagree"
        )


class PromptTooLong(LlavakitError, ValueError):
    """The prompt (text plus image tokens) does not fit in the model's context."""

    def __init__(self, tokens: int, limit: int) -> None:
        self.tokens = tokens
        self.limit = limit
        super().__init__(
            f"the prompt is {tokens} tokens (text plus image tokens) but the model's context is "
            f"{limit} tokens; shorten the prompt or use fewer/smaller images"
        )


class CheckpointError(LlavakitError):
    """A checkpoint is missing, malformed, or of an unsupported layout."""


class UnknownTemplate(LlavakitError, KeyError):
    """No conversation template of that name."""

    def __str__(self) -> str:  # KeyError would add quotes
        return str(self.args[0])


class OutputExists(LlavakitError, FileExistsError):
    """Refusing to overwrite an existing output."""


class EngineBusy(LlavakitError):
    """The engine's waiting queue is full; try again later (HTTP 429)."""


class EngineStopped(LlavakitError):
    """The engine was shut down (HTTP 503)."""
