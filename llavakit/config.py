"""Typed LLaVA configuration, convertible to and from transformers' Llava / LlavaNext configs.

The transformers config holds the backbone configs and the fields transformers knows; the fields
only llavakit knows (template, image-token style, projector type, ...) travel in the same
config.json under the key ``"llavakit"``, so a checkpoint always chats the way it was trained.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from llavakit.errors import CheckpointError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# LLaVA-1.6 pinpoints, stored (height, width) like transformers.
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
IMAGE_SENTINEL = -200  # the original's image position marker, never a vocabulary id


@dataclass
class LlavaConfig:
    """Everything that decides how a LLaVA model turns images and text into logits."""

    vision_config: PretrainedConfig
    text_config: PretrainedConfig
    projector_type: str = "mlp2x_gelu"  # linear | mlp{N}x_gelu | identity, optional "ln_" prefix
    projector_bias: bool = True
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"  # default (drop CLS) | full
    image_aspect_ratio: str = "pad"  # square | pad | anyres | anyres_max_N
    image_grid_pinpoints: list[list[int]] = field(default_factory=list)  # (height, width)
    patch_merge_type: str = "spatial_unpad"  # flat | spatial | spatial_unpad (anyres only)
    unpad_round_digits: int | None = 7  # transformers rounds; the original truncates (None)
    image_token_id: int = IMAGE_SENTINEL
    image_token: str = "<image>"
    # "token": whole prompt tokenized, <image> is an added token (transformers);
    # "sentinel": prompt split on <image>, chunks tokenized apart (original LLaVA training).
    image_token_style: str = "token"
    template: str = "tokenizer"
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @property
    def family(self) -> str:
        return "llava_next" if self.image_aspect_ratio.startswith("anyres") else "llava"

    @property
    def image_size(self) -> int:
        return int(self.vision_config.image_size)

    @property
    def patch_size(self) -> int:
        return int(self.vision_config.patch_size)

    @property
    def num_feature_layers(self) -> int:
        layer = self.vision_feature_layer
        return 1 if isinstance(layer, int) else len(layer)

    @property
    def anyres_max_tiles(self) -> int | None:
        match = re.fullmatch(r"anyres_max_(\d+)", self.image_aspect_ratio)
        return int(match.group(1)) if match else None

    @property
    def max_context(self) -> int:
        return int(getattr(self.text_config, "max_position_embeddings", 2048))

    def llavakit_fields(self) -> dict[str, Any]:
        skip = {"vision_config", "text_config"}
        out = {}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_hf(self) -> PretrainedConfig:
        """The transformers LlavaConfig / LlavaNextConfig for this model (llavakit fields included)."""
        from transformers import LlavaConfig as HFLlavaConfig
        from transformers import LlavaNextConfig

        common = dict(
            vision_config=self.vision_config,
            text_config=self.text_config,
            image_token_id=self.image_token_id if self.image_token_id >= 0 else None,
            projector_hidden_act="gelu",
            vision_feature_select_strategy=self.vision_feature_select_strategy,
            vision_feature_layer=self.vision_feature_layer,
            multimodal_projector_bias=self.projector_bias,
            tie_word_embeddings=getattr(self.text_config, "tie_word_embeddings", False),
        )
        if self.family == "llava_next":
            hf = LlavaNextConfig(image_grid_pinpoints=self.image_grid_pinpoints, **common)
            hf.architectures = ["LlavaNextForConditionalGeneration"]
        else:
            from llavakit.model.llava import tokens_per_tile

            hf = HFLlavaConfig(image_seq_length=tokens_per_tile(self), **common)
            hf.architectures = ["LlavaForConditionalGeneration"]
        hf.llavakit = self.llavakit_fields()
        return hf

    @classmethod
    def from_hf(cls, hf: PretrainedConfig) -> LlavaConfig:
        """Read a transformers llava / llava_next config (with or without a llavakit section)."""
        if hf.model_type not in ("llava", "llava_next"):
            raise CheckpointError(
                f"unsupported model_type {hf.model_type!r}; expected llava or llava_next"
            )
        extra = dict(getattr(hf, "llavakit", None) or {})
        known = {f.name for f in dataclasses.fields(cls)}
        extra = {k: v for k, v in extra.items() if k in known}
        defaults: dict[str, Any] = dict(
            vision_feature_layer=hf.vision_feature_layer,
            vision_feature_select_strategy=hf.vision_feature_select_strategy,
            projector_bias=getattr(hf, "multimodal_projector_bias", True),
            image_token_id=hf.image_token_id,
        )
        if hf.model_type == "llava_next":
            defaults.update(
                image_aspect_ratio="anyres", image_grid_pinpoints=hf.image_grid_pinpoints
            )
        else:
            defaults.update(image_aspect_ratio="square")
        defaults.update(extra)
        for key in ("image_mean", "image_std"):
            if key in defaults:
                defaults[key] = tuple(defaults[key])
        return cls(vision_config=hf.vision_config, text_config=hf.text_config, **defaults)

    @classmethod
    def from_pretrained(cls, path: str) -> LlavaConfig:
        return cls.from_hf(AutoConfig.from_pretrained(path, trust_remote_code=False))
