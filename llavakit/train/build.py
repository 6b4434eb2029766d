"""Assemble the model to train: a new LLaVA from an LLM + vision tower, or a LLaVA checkpoint;
then apply the stage's freezing policy and LoRA / QLoRA."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from llavakit.config import LlavaConfig
from llavakit.errors import CheckpointError, LlavakitError
from llavakit.model.llava import LlavaForCausalLM
from llavakit.model.vision import build_vision_tower
from llavakit.processing.processor import LlavaProcessor
from llavakit.processing.templates import get_template
from llavakit.train.args import (
    DataArguments,
    LlavaTrainingArguments,
    ModelArguments,
    parse_layers,
    tunable_parts,
)

PART_PREFIXES = {
    "mm_mlp_adapter": ("multi_modal_projector.", "image_newline"),
    "mm_language_model": ("language_model.",),
    "mm_vision_tower": ("vision_tower.",),
}


def _is_llava_checkpoint(path: str) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text())
    return data.get("model_type") in ("llava", "llava_next") or "mm_vision_tower" in data


def _pinpoints(value: str | None) -> list[list[int]]:
    """--image_grid_pinpoints takes the original (width, height) pairs; stored as (height, width)."""
    if not value:
        return []
    return [[int(h), int(w)] for w, h in json.loads(value)]


def load_vision_tower(path: str) -> tuple[nn.Module, dict]:
    """A pretrained vision tower and its image settings (crop size, mean, std) from a directory."""
    from llavakit.checkpoint.io import fit_tower_keys
    from llavakit.checkpoint.original import load_tower

    vision_config, state, image = load_tower(Path(path))
    tower = build_vision_tower(vision_config)
    holder = nn.Module()
    holder.vision_tower = tower
    state = fit_tower_keys({"vision_tower." + k: v for k, v in state.items()}, holder)
    missing, unexpected = holder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: vision tower weights do not match (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return tower, image


def _quantization(training_args: LlavaTrainingArguments):
    if training_args.bits not in (4, 8):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LlavakitError(
            f"--bits {training_args.bits} (QLoRA) needs bitsandbytes: pip install bitsandbytes"
        ) from None
    from transformers import BitsAndBytesConfig

    if training_args.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_use_double_quant=training_args.double_quant,
        bnb_4bit_quant_type=training_args.quant_type,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def new_llava(
    model_args: ModelArguments, data_args: DataArguments, training_args
) -> tuple[LlavaForCausalLM, LlavaProcessor]:
    """A new LLaVA from an LLM directory and a vision tower directory (projector freshly initialised)."""
    if not model_args.vision_tower:
        raise LlavakitError("--vision_tower is required when --model_name_or_path is an LLM")
    from llavakit.demo import resolve_lm

    quant = _quantization(training_args)
    lm_path = resolve_lm(model_args.model_name_or_path)
    lm = AutoModelForCausalLM.from_pretrained(
        lm_path,
        dtype=torch.float32,
        quantization_config=quant,
        trust_remote_code=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(lm_path, trust_remote_code=False)
    tower, image = load_vision_tower(model_args.vision_tower)
    config = LlavaConfig(
        vision_config=tower.config,
        text_config=lm.config,
        projector_type=model_args.mm_projector_type,
        vision_feature_layer=parse_layers(model_args.mm_vision_select_layer),
        vision_feature_select_strategy="full"
        if model_args.mm_vision_select_feature == "cls_patch"
        else "default",
        image_aspect_ratio=data_args.image_aspect_ratio,
        image_grid_pinpoints=_pinpoints(data_args.image_grid_pinpoints),
        patch_merge_type=model_args.mm_patch_merge_type,
        image_token_style=model_args.image_token_style,
        template=model_args.version or "vicuna_v1",
    )
    if "image_mean" in image:
        config.image_mean, config.image_std = tuple(image["image_mean"]), tuple(image["image_std"])
    model = LlavaForCausalLM(config, vision_tower=tower, language_model=lm)
    processor = LlavaProcessor(tokenizer, config)
    if model_args.image_token_style == "token":
        from llavakit.checkpoint.original import add_image_token

        add_image_token(model, processor)
    if model_args.pretrain_mm_mlp_adapter:
        from llavakit.checkpoint.original import load_projector

        load_projector(model, model_args.pretrain_mm_mlp_adapter)
    return model, processor


def build_model(
    model_args: ModelArguments, data_args: DataArguments, training_args: LlavaTrainingArguments
) -> tuple[nn.Module, LlavaProcessor]:
    """Model + processor for this run, frozen / LoRA-wrapped as the stage asks."""
    if model_args.mm_use_im_start_end or model_args.mm_use_im_patch_token:
        raise LlavakitError(
            "--mm_use_im_start_end / --mm_use_im_patch_token are not supported (LLaVA-1.5 uses neither)"
        )
    model, processor = build_base(model_args, data_args, training_args)
    tok = processor.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    parts = tunable_parts(model_args, training_args.lora_enable)
    apply_freezing(model, parts, lora=training_args.lora_enable)
    if training_args.lora_enable:
        model.language_model = wrap_lora(model.language_model, training_args)
    return model, processor


def build_base(
    model_args: ModelArguments, data_args: DataArguments, training_args
) -> tuple[nn.Module, LlavaProcessor]:
    """The model before freezing / LoRA: a LLaVA checkpoint, or a new one from an LLM + tower."""
    if _is_llava_checkpoint(model_args.model_name_or_path):
        from llavakit.checkpoint import load_checkpoint

        model, processor = load_checkpoint(model_args.model_name_or_path, dtype=torch.float32)
        if model_args.version:
            processor.template = get_template(model_args.version)
            model.config.template = processor.template.name
        if model_args.pretrain_mm_mlp_adapter:
            from llavakit.checkpoint.original import load_projector

            load_projector(model, model_args.pretrain_mm_mlp_adapter)
    else:
        model, processor = new_llava(model_args, data_args, training_args)
    return model, processor


def apply_freezing(model: nn.Module, parts: set[str], lora: bool = False) -> None:
    """requires_grad by part; with LoRA the LM base stays frozen (peft adds the trainables)."""
    trainable = tuple(
        p
        for part in parts
        for p in PART_PREFIXES[part]
        if not (lora and part == "mm_language_model")
    )
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(trainable))


def wrap_lora(lm: nn.Module, training_args: LlavaTrainingArguments) -> nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if training_args.bits in (4, 8):
        lm = prepare_model_for_kbit_training(
            lm, use_gradient_checkpointing=training_args.gradient_checkpointing
        )
    target = training_args.lora_target
    config = LoraConfig(
        r=training_args.lora_r,
        lora_alpha=training_args.lora_alpha,
        lora_dropout=training_args.lora_dropout,
        bias=training_args.lora_bias,
        target_modules=target if target == "all-linear" else [t.strip() for t in target.split(",")],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(lm, config)
