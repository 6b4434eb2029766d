"""llavakit: a faithful, tested, CPU-friendly LLaVA.

>>> import llavakit                                              # doctest: +SKIP
>>> pipe = llavakit.load("path/to/checkpoint")                   # doctest: +SKIP
>>> pipe.chat(images=["cat.jpg"], prompt="What is in the image?")  # doctest: +SKIP

Nothing heavy is imported until it is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ChatMessage", "GenerationConfig", "Pipeline", "load"]

if TYPE_CHECKING:
    from llavakit.engine.generate import GenerationConfig
    from llavakit.pipeline import Pipeline, load

from typing import TypedDict


class ChatMessage(TypedDict):
    """One conversation turn: role "user" or "assistant"; ``<image>`` marks image positions."""

    role: str
    content: str


def __getattr__(name: str) -> Any:
    if name in ("Pipeline", "load"):
        from llavakit import pipeline

        return getattr(pipeline, name)
    if name == "GenerationConfig":
        from llavakit.engine.generate import GenerationConfig

        return GenerationConfig
    raise AttributeError(f"module 'llavakit' has no attribute {name!r}")
