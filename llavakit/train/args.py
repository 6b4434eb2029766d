"""Training arguments under the original LLaVA flag names (plus every TrainingArguments flag).

``llavakit train`` accepts the same flags as the original ``llava/train/train.py``, e.g.
``--model_name_or_path --version --data_path --image_folder --vision_tower
--mm_projector_type --tune_mm_mlp_adapter --lora_enable --model_max_length``, and YAML recipes
holding the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "an LLM directory, or a LLaVA checkpoint to fine-tune"}
    )
    version: str | None = field(
        default=None,
        metadata={
            "help": "template (plain for stage 1); default: the checkpoint's, else vicuna_v1"
        },
    )
    vision_tower: str | None = field(default=None, metadata={"help": "vision model directory"})
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: str = field(
        default="-2", metadata={"help": "int or comma-separated list"}
    )
    mm_vision_select_feature: str = field(default="patch", metadata={"help": "patch | cls_patch"})
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    tune_mm_mlp_adapter: bool = field(
        default=False, metadata={"help": "stage 1: train the projector only"}
    )
    pretrain_mm_mlp_adapter: str | None = field(
        default=None, metadata={"help": "stage-1 projector file"}
    )
    mm_tunable_parts: str | None = field(
        default=None,
        metadata={"help": "comma list of mm_mlp_adapter, mm_language_model, mm_vision_tower"},
    )
    mm_patch_merge_type: str = "flat"
    freeze_backbone: bool = False
    image_token_style: str = field(
        default="sentinel", metadata={"help": "sentinel (original) | token"}
    )


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "LLaVA JSON file"})
    image_folder: str | None = None
    image_aspect_ratio: str = "square"
    image_grid_pinpoints: str | None = field(
        default=None, metadata={"help": "JSON list of [w, h] (original order)"}
    )
    lazy_preprocess: bool = True
    is_multimodal: bool = False
    skip_invalid: bool = field(
        default=False, metadata={"help": "drop invalid samples instead of refusing"}
    )


@dataclass
class LlavaTrainingArguments(TrainingArguments):
    model_max_length: int = 2048
    mm_projector_lr: float | None = None
    mm_vision_tower_lr: float | None = None
    group_by_modality_length: bool = False
    group_by_length: bool = field(
        default=False,
        metadata={"help": "with group_by_modality_length: batch samples of similar length"},
    )
    freeze_mm_mlp_adapter: bool = False
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_bias: str = "none"
    lora_target: str = field(default="all-linear", metadata={"help": "LM modules for LoRA"})
    bits: int = field(default=16, metadata={"help": "16 (bf16/fp32), 8 or 4 (QLoRA, bitsandbytes)"})
    double_quant: bool = True
    quant_type: str = "nf4"


def parse_layers(value: str) -> int | list[int]:
    """ "-2" -> -2; "-2,-5" -> [-2, -5]."""
    parts = [int(v) for v in str(value).split(",") if v.strip()]
    return parts[0] if len(parts) == 1 else parts


def tunable_parts(model_args: ModelArguments, lora: bool) -> set[str]:
    """Which parts train: stage 1 = projector; default finetune = projector + LM (LoRA'd or not)."""
    if model_args.tune_mm_mlp_adapter:
        return {"mm_mlp_adapter"}
    if model_args.mm_tunable_parts:
        parts = {p.strip() for p in model_args.mm_tunable_parts.split(",") if p.strip()}
        known = {"mm_mlp_adapter", "mm_language_model", "mm_vision_tower"}
        unknown = parts - known
        if unknown:
            raise ValueError(
                f"unknown --mm_tunable_parts {sorted(unknown)}; known: {sorted(known)}"
            )
        return parts
    parts = {"mm_mlp_adapter"}
    if not model_args.freeze_backbone:
        parts.add("mm_language_model")
    return parts
