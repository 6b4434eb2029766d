"""The demo model used by ``llavakit.load()`` / ``--model demo``.

Until the trained demo model is bundled, this builds a tiny *untrained* model on the fly (and
caches it), and says so: its answers are random tokens, but every stage of the pipeline runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

BUNDLED = Path(__file__).parent / "demo_model"


def cache_dir() -> Path:
    root = os.environ.get("LLAVAKIT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "llavakit"
    )
    return Path(root)


def demo_checkpoint() -> Path:
    """Path of the demo checkpoint, building the untrained stand-in if needed."""
    if (BUNDLED / "config.json").is_file():
        return BUNDLED
    from llavakit.testing import build_tiny_checkpoint

    path = cache_dir() / "untrained-demo"
    print(
        "llavakit: note: the trained demo model is not bundled yet; using a tiny UNTRAINED model "
        "(its answers are random tokens)",
        file=sys.stderr,
    )
    if not (path / "config.json").is_file():
        build_tiny_checkpoint(path, overwrite=True, max_positions=2048)
    return path
