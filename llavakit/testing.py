"""Tiny random LLaVA checkpoints built from configs, for tests, examples and benchmarks.

Everything here works offline: the tokenizer is a small byte-level BPE trained on the spot.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llavakit.config import LLAVA_NEXT_PINPOINTS, LlavaConfig

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: ASSISTANT: What is in the image? Describe the picture in detail.",
    "There is a red circle, a blue square and a green triangle on a white background.",
    "The cat sits on the mat. A dog runs in the park. Two birds fly over the sea.",
    "What colour is the shape? How many objects are there? Where is the ball?",
    "left right top bottom center small large one two three four five yes no",
]


def tiny_tokenizer(vocab_size: int = 320, image_token: bool = True):
    """A byte-level BPE tokenizer with <s>, </s>, <unk>, <pad> and (unless ``image_token`` is
    False, like LLaMA's own) an added <image> token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    if image_token:
        fast.add_tokens(["<image>"], special_tokens=True)
    return fast


def tiny_text_config(vocab_size: int = 384, max_positions: int = 1024):
    """A two-layer Llama config matching ``tiny_tokenizer``'s special ids (bos 1, eos 2, pad 3)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )


def tiny_config(
    family: str = "llava",
    tower: str = "clip",
    vocab_size: int = 384,
    image_size: int = 56,
    patch_size: int = 14,
    vision_feature_layer: int | list[int] = -2,
    strategy: str = "default",
    template: str = "vicuna_v1",
    image_token_id: int | None = None,
    image_token_style: str | None = None,
    image_aspect_ratio: str | None = None,
    max_positions: int = 1024,
) -> LlavaConfig:
    """A few-thousand-parameter LLaVA config of the given family and tower type."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    vision_kwargs = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    vision = (
        SiglipVisionConfig(**vision_kwargs)
        if tower == "siglip"
        else CLIPVisionConfig(**vision_kwargs)
    )
    text = tiny_text_config(vocab_size, max_positions)
    scale = image_size / 336
    pins = [[int(h * scale), int(w * scale)] for h, w in LLAVA_NEXT_PINPOINTS]
    aspect = image_aspect_ratio or ("anyres" if family == "llava_next" else "pad")
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=strategy,
        image_aspect_ratio=aspect,
        image_grid_pinpoints=pins if aspect.startswith("anyres") else [],
        image_token_id=image_token_id if image_token_id is not None else -200,
        # without a vocabulary id for <image>, tokenize like the original (sentinel -200)
        image_token_style=image_token_style
        or ("token" if image_token_id is not None else "sentinel"),
        template=template,
    )


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Re-draw every floating parameter from N(0, std) (LayerNorm weights around 1) so that
    random models give peaked, input-dependent logits rather than near-uniform ones."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * std
            is_norm_weight = param.dim() == 1 and name.endswith("weight") and "norm" in name
            param.copy_(1.0 + noise * 0.1 if is_norm_weight else noise)


def build_tiny_checkpoint(
    out: str | os.PathLike, seed: int = 0, overwrite: bool = False, **config_kwargs
) -> Path:
    """Write a random tiny LLaVA checkpoint (transformers layout) and return its path."""
    from llavakit.checkpoint.hf import save_hf
    from llavakit.model.llava import LlavaForCausalLM
    from llavakit.processing.processor import LlavaProcessor

    tokenizer = tiny_tokenizer()
    config_kwargs.setdefault("image_token_id", tokenizer.convert_tokens_to_ids("<image>"))
    config_kwargs.setdefault("vocab_size", -(-len(tokenizer) // 64) * 64)
    config = tiny_config(**config_kwargs)
    torch.manual_seed(seed)
    model = LlavaForCausalLM(config)
    randomize(model, seed)
    return save_hf(model, LlavaProcessor(tokenizer, config), out, overwrite=overwrite)
