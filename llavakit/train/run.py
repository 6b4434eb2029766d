"""``llavakit train``: parse the original flags (or a YAML recipe), validate data, train, save."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from functools import cached_property, partial
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
    parser = HfArgumentParser((ModelArguments, DataArguments, _TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    training_args.remove_unused_columns = False
    return model_args, data_args, training_args


class _TrainingArguments(LlavaTrainingArguments):
    """LlavaTrainingArguments that can also run DeepSpeed on CPU (multi-process tests)."""

    @cached_property
    def _setup_devices(self):
        if self.deepspeed and not self.use_cpu and _deepspeed_on_cpu():
            _init_cpu_deepspeed_state(self)
        return LlavaTrainingArguments._setup_devices.func(self)


def _deepspeed_on_cpu() -> bool:
    if int(os.environ.get("LOCAL_RANK", -1)) == -1:
        return False
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def _init_cpu_deepspeed_state(args: LlavaTrainingArguments) -> None:
    """accelerate gives DeepSpeed without a GPU no process-group backend, so every rank counts
    itself as process 0 of 1 and DeepSpeed's batch-size check fails. Set accelerate's state up
    with gloo (ranks from torchrun) first and have TrainingArguments use it."""
    from datetime import timedelta

    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(
            backend=args.ddp_backend or "gloo", timeout=timedelta(seconds=args.ddp_timeout)
        )
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    args.accelerator_config.use_configured_state = True


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
    with _materialised(training_args):
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
    if training_args.fsdp and not getattr(trainer, "is_fsdp_enabled", False):
        # accelerate only builds FSDP on accelerators; never fall back to DDP in silence
        raise ValueError(
            f"--fsdp {_describe(training_args.fsdp)!r} was requested but "
            "accelerate did not enable FSDP on this machine (it needs GPUs); on CPU use "
            "--deepspeed recipes/deepspeed/zero3.json (sharded, tested) or plain DDP"
        )
    trainer.train(resume_from_checkpoint=_resume_arg(training_args.resume_from_checkpoint))
    save_run(model, processor, out, model_args, data_args, training_args)
    return out


def _describe(option) -> str:
    if isinstance(option, list | tuple):
        return " ".join(str(getattr(x, "value", x)) for x in option)
    return str(option)


@contextmanager
def _materialised(training_args):
    """Under ZeRO-3, build the model with every weight whole on each rank (no zero.Init), so
    llavakit's own loaders (vision tower, projector, image token) fill plain tensors; DeepSpeed
    partitions the model when the trainer initialises it."""
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    if not (training_args.deepspeed and is_deepspeed_zero3_enabled()):
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(training_args.hf_deepspeed_config)


def _resume_arg(value: str | None) -> str | bool | None:
    """--resume_from_checkpoint PATH, or True (the last checkpoint-N in --output_dir), or False.

    The flag is a string; Trainer only looks up the last checkpoint for a real ``True``.
    """
    if value is None or value.strip().lower() in ("false", ""):
        return None
    if value.strip().lower() == "true":
        return True
    return value


def save_run(model, processor, out: Path, model_args, data_args, training_args) -> None:
    """Stage 1: the projector alone. LoRA: adapter + non-LoRA trainables. Else: a full checkpoint.

    Called on every rank: ZeRO-3-partitioned weights are gathered (a collective), then only the
    main process writes."""
    from llavakit.train.trainer import full_state, gathered

    write = training_args.should_save
    if write:
        out.mkdir(parents=True, exist_ok=True)
    model_record = dataclasses.asdict(model_args)
    for key in ("model_name_or_path", "vision_tower", "pretrain_mm_mlp_adapter"):
        if model_record[key] and os.path.exists(model_record[key]):  # rebuildable from anywhere
            model_record[key] = os.path.abspath(model_record[key])
    record = {
        "model_args": model_record,
        "data_args": dataclasses.asdict(data_args),
        "lora": training_args.lora_enable,
        "stage": "pretrain"
        if model_args.tune_mm_mlp_adapter
        else ("lora" if training_args.lora_enable else "finetune"),
    }
    if model_args.tune_mm_mlp_adapter:
        state = projector_state(model)
        if write:
            _atomic_save(state, out / "mm_projector.safetensors")
    elif training_args.lora_enable:
        trainables = full_state(
            (n, p)
            for n, p in model.named_parameters()
            if p.requires_grad and not n.startswith("language_model.")
        )
        lora = [p for p in model.language_model.parameters() if p.requires_grad]
        with gathered(lora):
            if write:
                # The LM is frozen under LoRA: resized embedding rows are rebuilt deterministically, so
                # only the adapter is saved (peft would otherwise add whole embedding matrices).
                model.language_model.save_pretrained(
                    str(out / "adapter"), save_embedding_layers=False
                )
        if write:
            _atomic_save(trainables, out / "non_lora_trainables.safetensors")
    else:
        from llavakit.checkpoint.hf import save_hf

        with gathered(model.parameters()):
            if write:
                if model.config.image_token_id < 0:  # sentinel-trained: give <image> an id
                    from llavakit.checkpoint.original import add_image_token

                    add_image_token(model, processor)
                save_hf(model, processor, out / "model", overwrite=True)
    if not write:
        return
    tmp = out / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out / RUN_FILE)


def projector_state(model) -> dict[str, torch.Tensor]:
    """The projector's weights alone (llavakit names: linear_1.weight, ...), gathered under ZeRO-3."""
    from llavakit.train.trainer import full_state

    named = list(model.multi_modal_projector.named_parameters())
    if getattr(model, "image_newline", None) is not None:
        named.append(("image_newline", model.image_newline))
    state = full_state(named)
    buffers = model.multi_modal_projector.state_dict()
    state.update({k: v.detach().cpu().contiguous() for k, v in buffers.items() if k not in state})
    return state


def save_projector(model, path: Path) -> None:
    """The projector's weights alone, as safetensors (single process; save_run handles ranks)."""
    _atomic_save(projector_state(model), path)


def _atomic_save(state: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
