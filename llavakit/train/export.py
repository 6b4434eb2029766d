"""Rebuild a trained model from a run directory (LoRA adapter + non-LoRA trainables) and merge."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from llavakit.errors import CheckpointError
from llavakit.train.args import DataArguments, ModelArguments
from llavakit.train.run import RUN_FILE


def is_lora_run(path: str | os.PathLike) -> bool:
    record = Path(path) / RUN_FILE
    return record.is_file() and json.loads(record.read_text()).get("stage") == "lora"


def _local(value: str | None, root: Path) -> str | None:
    """Paths in the run record may be relative to the run directory (a bundled model)."""
    if value and not os.path.isabs(value) and (root / value).exists():
        return str(root / value)
    return value


def load_lora_run(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model, processor) with the LoRA adapter merged into the language model."""
    from peft import PeftModel

    from llavakit.train.build import build_base

    root = Path(path)
    record = json.loads((root / RUN_FILE).read_text())
    model_args = ModelArguments(**record["model_args"])
    data_args = DataArguments(**record["data_args"])
    model_args.model_name_or_path = _local(model_args.model_name_or_path, root)
    model_args.vision_tower = _local(model_args.vision_tower, root)
    model_args.pretrain_mm_mlp_adapter = None  # the trained projector is in the trainables
    model, processor = build_base(model_args, data_args, SimpleNamespace(bits=16))
    model.language_model = PeftModel.from_pretrained(
        model.language_model, str(root / "adapter")
    ).merge_and_unload()
    trainables = load_file(str(root / "non_lora_trainables.safetensors"))
    params = dict(model.named_parameters())
    unknown = sorted(set(trainables) - set(params))
    if unknown:
        raise CheckpointError(
            f"{root}: trained weights {unknown[:3]} do not exist in the rebuilt model"
        )
    with torch.no_grad():
        for name, value in trainables.items():
            if params[name].shape != value.shape:
                raise CheckpointError(
                    f"{root}: {name} has shape {tuple(value.shape)}, model {tuple(params[name].shape)}"
                )
            params[name].copy_(value)
    return model.to(dtype).eval(), processor
