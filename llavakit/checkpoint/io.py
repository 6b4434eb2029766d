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


def refuse_existing(out: str | os.PathLike) -> None:
    """Raise ``OutputExists`` if ``out`` is a file or a non-empty directory."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExists(f"{out} already exists; choose a new output path (nothing was written)")


@contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; rename it to ``out`` only on success.

    An existing ``out`` is refused unless ``overwrite``; then it is replaced only after the new
    one is complete, so a crash never leaves a half-written checkpoint in its place.
    """
    out = Path(out)
    if not overwrite:
        refuse_existing(out)
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


CLASSIC_TOWERS = {"clip_vision_model", "siglip_vision_model"}


def fit_tower_keys(
    state: dict[str, torch.Tensor], model: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """``vision_tower.vision_model.X`` <-> ``vision_tower.X``, whichever the model's tower uses.

    Classic llava-hf files (and CLIP / SigLIP towers saved by transformers 4.x) keep the
    ``vision_model.`` level; transformers 5 vision models drop it.
    """
    expected = set(model.state_dict())
    out = {}
    for key, value in state.items():
        if key.startswith("vision_tower.") and key not in expected:
            rest = key[len("vision_tower.") :]
            if rest.startswith("vision_model."):
                alt = "vision_tower." + rest[len("vision_model.") :]
            else:
                alt = "vision_tower.vision_model." + rest
            key = alt if alt in expected else key
        out[key] = value
    return out


def classic_tower_keys(state: dict[str, torch.Tensor], tower_type: str) -> dict[str, torch.Tensor]:
    """Write CLIP / SigLIP tower weights under ``vision_tower.vision_model.*`` (llava-hf's names,
    which transformers 4.x needs and transformers 5 maps on load)."""
    if tower_type not in CLASSIC_TOWERS:
        return state
    out = {}
    for key, value in state.items():
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            key = "vision_tower.vision_model." + key[len("vision_tower.") :]
        out[key] = value
    return out


def build_with_weights(factory, state: dict[str, torch.Tensor], source: str | os.PathLike):
    """Build a model with ``factory()`` without initialising parameters, then load ``state``.

    Parameters start on the meta device (no random init: fast, no double memory); buffers
    are built normally. Tied LM heads are re-tied; any other missing or unexpected weight is
    a ``CheckpointError`` naming a few of them.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = factory()
    state = fit_tower_keys(state, model)
    lm = model.language_model
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if tied:
        lm.get_output_embeddings().weight = lm.get_input_embeddings().weight
    still_empty = [n for n, p in model.named_parameters() if p.is_meta]
    if still_empty:
        raise CheckpointError(f"{source}: no weights for {still_empty[:5]}")
    return model
