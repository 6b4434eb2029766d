"""LlavaForCausalLM: vision tower -> projector -> image features spliced into the LM's embeddings.

One class for every language model: the LM is whatever ``AutoModelForCausalLM`` builds from the
text config. Module names follow transformers' on-disk llava layout (``vision_tower``,
``multi_modal_projector``, ``language_model``, ``image_newline``), so ``state_dict()`` is a
llava-hf checkpoint as it is.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from llavakit.config import LlavaConfig
from llavakit.errors import FeatureCountMismatch
from llavakit.model import anyres
from llavakit.model.projector import Projector
from llavakit.model.vision import build_vision_tower, select_features

# Vision towers whose sequence has no CLS token (every patch is an image token).
TOWERS_WITHOUT_CLS = {"siglip_vision_model", "siglip2_vision_model"}
IGNORE_INDEX = -100


def tokens_per_tile(config: LlavaConfig) -> int:
    """Feature tokens one crop-size tile produces (CLS kept only with strategy "full")."""
    patches = (config.image_size // config.patch_size) ** 2
    has_cls = config.vision_config.model_type not in TOWERS_WITHOUT_CLS
    keep_cls = config.vision_feature_select_strategy in ("full", "cls_patch")
    return patches + int(has_cls and keep_cls)


def image_token_count(config: LlavaConfig, image_size: tuple[int, int]) -> int:
    """Number of placeholder tokens an image of (height, width) becomes."""
    if config.family != "llava_next":
        return tokens_per_tile(config)
    grid = anyres.grid_shape(image_size, config.image_grid_pinpoints, config.image_size)
    return anyres.num_packed_tokens(
        image_size,
        grid,
        side=config.image_size // config.patch_size,
        merge_type=config.patch_merge_type,
        has_newline=True,
        round_digits=config.unpad_round_digits,
        max_tiles=config.anyres_max_tiles,
        tokens_per_tile=tokens_per_tile(config),
    )


class LlavaForCausalLM(nn.Module):
    """A LLaVA model. ``forward`` takes token ids whose image positions hold ``image_token_id``."""

    def __init__(
        self,
        config: LlavaConfig,
        vision_tower: nn.Module | None = None,
        language_model: nn.Module | None = None,
    ) -> None:
        """Build from ``config``; pass pretrained ``vision_tower`` / ``language_model`` modules
        to assemble a new LLaVA from existing parts (training from an LLM and a vision model)."""
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower or build_vision_tower(config.vision_config)
        vision_dim = config.vision_config.hidden_size * config.num_feature_layers
        text_dim = config.text_config.hidden_size
        self.multi_modal_projector = Projector(
            config.projector_type, vision_dim, text_dim, bias=config.projector_bias
        )
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.text_config)
        if config.family == "llava_next" and "unpad" in config.patch_merge_type:
            self.image_newline = nn.Parameter(torch.zeros(text_dim))
        else:
            self.image_newline = None

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Recompute activations in backward (LM and, if it trains, the vision tower); the
        transformers 5 Trainer calls this for ``--gradient_checkpointing``."""
        kwargs = activation_checkpointing_kwargs or {"use_reentrant": False}
        parts = [self.language_model]
        if any(p.requires_grad for p in self.vision_tower.parameters()):
            parts.append(self.vision_tower)
        for part in parts:
            enable = getattr(part, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(
                    activation_checkpointing_kwargs=kwargs,
                    every_n_layers=every_n_layers,
                    offload=offload,
                )
            else:  # older transformers
                part.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None, **kwargs
    ) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        for part in (self.language_model, self.vision_tower):
            disable = getattr(part, "activation_checkpointing_disable", None)
            (disable or part.gradient_checkpointing_disable)()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.language_model.parameters()).dtype

    def encode_images(
        self, pixel_values: list[torch.Tensor], image_sizes: list[tuple[int, int]]
    ) -> torch.Tensor:
        """Features of all images, concatenated in order: [sum of image_token_count, hidden]."""
        cfg = self.config
        tiles_per_image = [p.shape[0] for p in pixel_values]
        pixels = torch.cat(pixel_values).to(self.device, self.vision_tower.dtype)
        selected = select_features(
            self.vision_tower, pixels, cfg.vision_feature_layer, cfg.vision_feature_select_strategy
        )
        projected = self.multi_modal_projector(selected)
        if cfg.family != "llava_next":
            return projected.flatten(0, 1)
        packed = []
        for tiles, size in zip(projected.split(tiles_per_image), image_sizes, strict=True):
            grid = anyres.grid_shape(size, cfg.image_grid_pinpoints, cfg.image_size)
            packed.append(
                anyres.pack_tiles(
                    tiles,
                    size,
                    grid,
                    cfg.patch_merge_type,
                    self.image_newline,
                    cfg.unpad_round_digits,
                    cfg.anyres_max_tiles,
                )
            )
        return torch.cat(packed)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: list[torch.Tensor] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features written over the image placeholder positions."""
        mask = input_ids == self.config.image_token_id
        safe_ids = input_ids.masked_fill(mask, 0)  # the -200 sentinel is not a vocabulary id
        embeds = self.language_model.get_input_embeddings()(safe_ids)
        n_tokens = int(mask.sum())
        if not pixel_values:
            if n_tokens:
                raise FeatureCountMismatch(n_tokens, 0)
            return embeds
        features = self.encode_images(pixel_values, image_sizes or [])
        if features.shape[0] != n_tokens:
            raise FeatureCountMismatch(n_tokens, features.shape[0])
        return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: list[torch.Tensor] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> CausalLMOutputWithPast:
        embeds = self.embed(input_ids, pixel_values, image_sizes)
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if labels is not None and not use_cache and self._plain_lm_head():
            return self._supervised_loss(embeds, attention_mask, position_ids, labels)
        return self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            labels=labels,
            logits_to_keep=logits_to_keep,
        )

    def _plain_lm_head(self) -> bool:
        """True when logits are just ``lm_head(hidden)`` (no soft-capping or scaling)."""
        cfg = self.language_model.config
        return (
            getattr(cfg, "final_logit_softcapping", None) is None
            and getattr(cfg, "logit_scale", None) in (None, 1.0)
            and isinstance(self.language_model.get_output_embeddings(), nn.Linear)
        )

    def _supervised_loss(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        labels: torch.Tensor,
    ) -> CausalLMOutputWithPast:
        """The causal-LM loss with the vocabulary projection applied to supervised positions only.

        Same value as the LM's own loss (mean token cross-entropy over labels != -100, shifted
        by one) but the 49k-wide output layer runs on a few answer tokens instead of every
        position: about a fifth of a small LM's training compute. ``logits`` is not returned.
        """
        hidden = self.language_model.get_decoder()(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        picked = hidden[:, :-1][keep]
        logits = self.language_model.get_output_embeddings()(picked).float()
        loss = nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
        return CausalLMOutputWithPast(loss=loss / keep.sum().clamp(min=1))
