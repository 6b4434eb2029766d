"""Vision tower: any transformers vision model, feature layer(s) and CLS strategy."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig


def build_vision_tower(vision_config: PretrainedConfig) -> nn.Module:
    """Instantiate the transformers vision model for this config (CLIP, SigLIP, ViT, ...)."""
    return AutoModel.from_config(vision_config)


def select_features(
    tower: nn.Module, pixel_values: torch.Tensor, layer: int | list[int], strategy: str
) -> torch.Tensor:
    """Hidden states of ``layer`` (or several, concatenated on channels), CLS dropped for "default".

    Towers without a CLS token (SigLIP) should be used with strategy "full".
    """
    out = tower(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
    layers = [layer] if isinstance(layer, int) else list(layer)
    states = [out.hidden_states[i] for i in layers]
    if strategy in ("default", "patch"):
        states = [s[:, 1:] for s in states]
    elif strategy not in ("full", "cls_patch"):
        raise ValueError(
            f"unknown vision_feature_select_strategy {strategy!r}; use default or full"
        )
    return torch.cat(states, dim=-1) if len(states) > 1 else states[0]
