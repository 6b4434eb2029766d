"""Reading weight files safely and writing output directories atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from llavakit.errors import CheckpointError, OutputExists


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: safetensors (single or sharded), else torch files
    loaded with ``weights_only=True``."""
    root = Path(path)
    files = sorted(root.glob("*.safetensors"))
    index = root / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [root / n for n in names]
    state: dict[str, torch.Tensor] = {}
    if files:
        for f in files:
            state.update(load_file(str(f)))
        return state
    pickles = sorted(root.glob("pytorch_model*.bin")) + sorted(root.glob("*.pt"))
    for f in pickles:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    if not state:
        raise CheckpointError(f"{root}: no *.safetensors or pytorch_model*.bin weights found")
    return state


@contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; rename it to ``out`` only on success.

    An existing ``out`` is refused unless ``overwrite``; then it is replaced only after the new
    one is complete, so a crash never leaves a half-written checkpoint in its place.
    """
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise OutputExists(f"{out} already exists; choose a new output path (nothing was written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
