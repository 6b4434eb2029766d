"""Checkpoints: detect the layout of a directory and load it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from llavakit.errors import CheckpointError


def detect_format(path: str | os.PathLike) -> str:
    """ "hf" (transformers llava / llava_next), "original" (liuhaotian mm_* config) or "lora"
    (a llavakit LoRA training run: adapter + non-LoRA trainables)."""
    from llavakit.checkpoint.original import is_original

    if (Path(path) / "llavakit_train.json").is_file() and (Path(path) / "adapter").is_dir():
        return "lora"
    config = Path(path) / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json)")
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config}: invalid JSON ({exc})") from None
    if is_original(data):
        return "original"
    if data.get("model_type") in ("llava", "llava_next"):
        return "hf"
    raise CheckpointError(
        f"{path}: model_type {data.get('model_type')!r} is not a LLaVA checkpoint (llava, llava_next, or original mm_* config)"
    )


def resolve(path: str | os.PathLike) -> Path:
    """A local directory for ``path``: as given, or downloaded from the hub when online."""
    local = Path(path)
    if local.is_dir():
        return local
    if local.exists() or os.fspath(path).startswith((".", "/")) or os.fspath(path).count("/") != 1:
        raise CheckpointError(f"{path}: no such checkpoint directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(os.fspath(path)))
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a local directory and not downloadable ({type(exc).__name__})"
        ) from None


def load_checkpoint(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    template: str | None = None,
    vision_tower: str | None = None,
    fmt: str | None = None,
):
    """(model, processor) from a checkpoint directory of either layout."""
    root = resolve(path)
    fmt = fmt or detect_format(root)
    if fmt == "original":
        from llavakit.checkpoint.original import load_original

        return load_original(root, dtype=dtype, template=template, vision_tower=vision_tower)
    if fmt == "hf":
        from llavakit.checkpoint.hf import load_hf

        return load_hf(root, dtype=dtype, template=template)
    if fmt == "lora":
        from llavakit.train.export import load_lora_run

        model, processor = load_lora_run(root, dtype=dtype)
        if template:
            from llavakit.processing.templates import get_template

            processor.template = get_template(template)
        return model, processor
    raise CheckpointError(f"unknown checkpoint format {fmt!r}; use hf, original or lora")
