"""``llavakit train``: parse the original flags (or a YAML recipe), validate data, train, save."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from llavakit.errors import LlavakitError
from llavakit.train.args import DataArguments, LlavaTrainingArguments, ModelArguments

RUN_FILE = "llavakit_train.json"


def recipe_to_argv(recipe: dict) -> list[str]:
    """YAML recipe keys are the flag names: {"lora_enable": true} -> ["--lora_enable", "True"]."""
    argv = []
    for key, value in recipe.items():
        if value is None:
            continue
        if isinstance(value, list | dict):
            value = (
                json.dumps(value) if key == "image_grid_pinpoints" else ",".join(map(str, value))
            )
        argv += [f"--{key}", str(value)]
    return argv


def parse_args(argv: Sequence[str]) -> tuple[ModelArguments, DataArguments, LlavaTrainingArguments]:
    """Flags, or ``RECIPE.yaml [flags that override it]``."""
    from transformers import HfArgumentParser

    argv = list(argv)
    if argv and argv[0].endswith((".yaml", ".yml")):
        import yaml

        with open(argv[0]) as f:
            recipe = yaml.safe_load(f) or {}
        if not isinstance(recipe, dict):
            raise LlavakitError(f"{argv[0]}: a recipe is a mapping of flag names to values")
        argv = recipe_to_argv(recipe) + argv[1:]
    parser = HfArgumentParser((ModelArguments, DataArguments, LlavaTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    training_args.remove_unused_columns = False
    return model_args, data_args, training_args


def train(argv: Sequence[str]) -> Path:
    """Run one training stage; returns the output directory."""
    from transformers import set_seed

    from llavakit.data.dataset import LlavaDataset, collate
    from llavakit.data.validate import format_report, validate_dataset
    from llavakit.train.build import build_model
    from llavakit.train.trainer import LlavaTrainer, MetricsCallback

    model_args, data_args, training_args = parse_args(argv)
    if not data_args.data_path:
        raise LlavakitError("--data_path is required")
    set_seed(training_args.seed)
    model, processor = build_model(model_args, data_args, training_args)
    report = validate_dataset(
        data_args.data_path, data_args.image_folder, processor, training_args.model_max_length
    )
    invalid = [i for i, row in enumerate(report.rows) if not row.ok]
    if invalid and not data_args.skip_invalid:
        raise LlavakitError(
            "the training data has invalid samples (use --skip_invalid to drop them):\n"
            + format_report(report, only_invalid=True)
        )
    dataset = LlavaDataset(
        data_args.data_path, data_args.image_folder, processor, training_args.model_max_length
    )
    if invalid:
        dataset.skip = set(invalid)
        print(
            f"llavakit: skipping {len(invalid)} invalid sample(s) of {len(report.rows)}",
            file=sys.stderr,
        )
    out = Path(training_args.output_dir)
    trainer = LlavaTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=partial(collate, pad_token_id=processor.tokenizer.pad_token_id),
        callbacks=[MetricsCallback(str(out))],
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if training_args.should_save:
        save_run(model, processor, out, model_args, data_args, training_args)
    return out


def save_run(model, processor, out: Path, model_args, data_args, training_args) -> None:
    """Stage 1: the projector alone. LoRA: adapter + non-LoRA trainables. Else: a full checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "model_args": dataclasses.asdict(model_args),
        "data_args": dataclasses.asdict(data_args),
        "lora": training_args.lora_enable,
        "stage": "pretrain"
        if model_args.tune_mm_mlp_adapter
        else ("lora" if training_args.lora_enable else "finetune"),
    }
    if model_args.tune_mm_mlp_adapter:
        save_projector(model, out / "mm_projector.safetensors")
    elif training_args.lora_enable:
        model.language_model.save_pretrained(str(out / "adapter"))
        trainables = {
            n: p.detach().contiguous().cpu()
            for n, p in model.named_parameters()
            if p.requires_grad and not n.startswith("language_model.")
        }
        _atomic_save(trainables, out / "non_lora_trainables.safetensors")
    else:
        from llavakit.checkpoint.hf import save_hf

        save_hf(model, processor, out / "model", overwrite=True)
    tmp = out / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out / RUN_FILE)


def save_projector(model, path: Path) -> None:
    """The projector's weights alone (llavakit names: linear_1.weight, ...), as safetensors."""
    state = {
        k: v.detach().contiguous().cpu()
        for k, v in model.multi_modal_projector.state_dict().items()
    }
    if getattr(model, "image_newline", None) is not None:
        state["image_newline"] = model.image_newline.detach().contiguous().cpu()
    _atomic_save(state, path)


def _atomic_save(state: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
