"""Import checkpoints in the original (liuhaotian / LLaVA-NeXT) layout and stage-1 projector files.

Original config.json fields: ``mm_vision_tower`` (a path or hub id; the tower is not inside
the checkpoint), ``mm_hidden_size``, ``mm_projector_type``, ``mm_vision_select_layer``,
``mm_vision_select_feature``, ``image_aspect_ratio``, ``mm_patch_merge_type``,
``image_grid_pinpoints`` ((width, height) pairs). Weights: ``model.*`` / ``lm_head`` for the LM,
``model.mm_projector.N`` (Sequential indices), ``model.image_newline``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from llavakit.checkpoint.io import build_with_weights, read_state_dict
from llavakit.config import IMAGE_SENTINEL, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, LlavaConfig
from llavakit.errors import CheckpointError
from llavakit.model.llava import LlavaForCausalLM
from llavakit.processing.processor import LlavaProcessor

_ARCH_TO_LM = {
    "LlavaLlamaForCausalLM": "llama",
    "LlavaMistralForCausalLM": "mistral",
    "LlavaQwenForCausalLM": "qwen2",
    "LlavaMixtralForCausalLM": "mixtral",
    "LlavaGemmaForCausalLM": "gemma",
}
_NOT_TEXT_FIELDS = re.compile(
    r"^(mm_|image_|tune_|freeze_|unfreeze_|use_mm|tokenizer_|architectures$|model_type$|_name_or_path$)"
)


def is_original(config_dict: dict) -> bool:
    return "mm_vision_tower" in config_dict or "mm_projector_type" in config_dict


def _text_config(cfg: dict):
    arch = (cfg.get("architectures") or ["LlavaLlamaForCausalLM"])[0]
    lm_type = _ARCH_TO_LM.get(arch)
    if lm_type is None:
        raise CheckpointError(
            f"unsupported original architecture {arch!r}; known: {sorted(_ARCH_TO_LM)}"
        )
    fields = {k: v for k, v in cfg.items() if not _NOT_TEXT_FIELDS.match(k)}
    return AutoConfig.for_model(lm_type, **fields)


def _pinpoints(value, crop: int) -> list[list[int]]:
    """Original pinpoints are (width, height) pairs, or a "(1x1),...,(3x3)" grid range."""
    if isinstance(value, str):
        found = [tuple(int(x) for x in m) for m in re.findall(r"\((\d+)x(\d+)\)", value)]
        (lo_w, lo_h), (hi_w, hi_h) = found[0], found[-1]
        return [[h * crop, w * crop] for w in range(lo_w, hi_w + 1) for h in range(lo_h, hi_h + 1)]
    return [[int(h), int(w)] for w, h in (value or [])]


def _resolve_tower(cfg: dict, root: Path, override: str | None) -> Path:
    name = override or cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    if not name:
        raise CheckpointError(f"{root}: config has no mm_vision_tower; pass the vision tower path")
    for candidate in (Path(name), root / name):
        if candidate.is_dir():
            return candidate
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name))
    except Exception as exc:
        raise CheckpointError(
            f"vision tower {name!r} is not a local directory and could not be downloaded ({type(exc).__name__}); "
            "pass --vision-tower PATH"
        ) from None


def load_tower(path: Path) -> tuple[object, dict[str, torch.Tensor], dict]:
    """Vision config, its tower weights (``vision_model.`` level kept if present) and image
    settings from a tower directory."""
    tower_cfg = AutoConfig.from_pretrained(path, trust_remote_code=False)
    vision_config = getattr(tower_cfg, "vision_config", tower_cfg)
    state = {k.removeprefix("model."): v for k, v in read_state_dict(path).items()}
    if any(k.startswith("vision_model.") for k in state):  # a CLIPModel / SiglipModel: its tower
        state = {k: v for k, v in state.items() if k.startswith("vision_model.")}
    pre = path / "preprocessor_config.json"
    image = json.loads(pre.read_text()) if pre.is_file() else {}
    return vision_config, state, image


def _projector_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """model.mm_projector.{i}.* -> linear_k (2-D weights in order) / pre_norm (a leading 1-D weight)."""
    indices = sorted({int(k.split(".")[2]) for k in state if k.startswith("model.mm_projector.")})
    out, linear, pre_norm = {}, 0, False
    for i in indices:
        weight = state[f"model.mm_projector.{i}.weight"]
        if weight.dim() == 1:
            name, pre_norm = "pre_norm", True
        else:
            linear += 1
            name = f"linear_{linear}"
        for part in ("weight", "bias"):
            key = f"model.mm_projector.{i}.{part}"
            if key in state:
                out[f"multi_modal_projector.{name}.{part}"] = state[key]
    return out, pre_norm


def map_original_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original LM / newline / (unfrozen) tower keys -> llavakit keys, by explicit prefixes."""
    out = {}
    for key, value in state.items():
        if key.startswith("model.mm_projector."):
            continue
        if key.startswith("model.vision_tower.vision_tower."):
            out["vision_tower." + key[len("model.vision_tower.vision_tower.") :]] = value
        elif key == "model.image_newline":
            out["image_newline"] = value
        elif key.startswith("model."):
            out["language_model.model." + key[len("model.") :]] = value
        elif key.startswith("lm_head."):
            out["language_model." + key] = value
        else:
            raise CheckpointError(f"unexpected weight {key!r} in an original LLaVA checkpoint")
    return out


def load_original(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    template: str | None = None,
    vision_tower: str | None = None,
) -> tuple[LlavaForCausalLM, LlavaProcessor]:
    """Load an original-layout checkpoint as it was trained (sentinel image token, -200)."""
    root = Path(path)
    cfg = json.loads((root / "config.json").read_text())
    tower_path = _resolve_tower(cfg, root, vision_tower)
    vision_config, tower_state, image = load_tower(tower_path)
    crop = image.get("crop_size", vision_config.image_size)
    crop = crop["height"] if isinstance(crop, dict) else int(crop)
    state = read_state_dict(root)
    projector, pre_norm = _projector_keys(state)
    select = cfg.get("mm_vision_select_feature", "patch")
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=_text_config(cfg),
        projector_type=("ln_" if pre_norm else "") + cfg.get("mm_projector_type", "linear"),
        vision_feature_layer=cfg.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="full" if select == "cls_patch" else "default",
        image_aspect_ratio=cfg.get("image_aspect_ratio", "square"),
        image_grid_pinpoints=_pinpoints(cfg.get("image_grid_pinpoints"), crop),
        patch_merge_type=cfg.get("mm_patch_merge_type", "flat"),
        unpad_round_digits=None,
        image_token_id=IMAGE_SENTINEL,
        image_token_style="sentinel",
        template=template or "vicuna_v1",
        image_mean=tuple(image.get("image_mean", OPENAI_CLIP_MEAN)),
        image_std=tuple(image.get("image_std", OPENAI_CLIP_STD)),
    )
    weights = map_original_keys(state) | projector
    tower = {"vision_tower." + k: v for k, v in tower_state.items()}
    weights |= {k: v for k, v in tower.items() if k not in weights}
    model = build_with_weights(lambda: LlavaForCausalLM(config), weights, root)
    model.to(dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    return model, LlavaProcessor(tokenizer, config)


def add_image_token(model: LlavaForCausalLM, processor: LlavaProcessor, multiple: int = 64) -> None:
    """Give a sentinel-style model real ``<image>`` and ``<pad>`` tokens (transformers layout).

    New embedding rows (and LM-head rows) are the mean of the old ones; the vocabulary is
    padded to a multiple of ``multiple``. Tokenization stays chunked ("sentinel" style), so
    the model still sees the token ids it was trained with around each image.
    """
    tok = processor.tokenizer
    tok.add_tokens(["<image>"], special_tokens=True)
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})
    lm = model.language_model
    old = lm.get_input_embeddings().weight.shape[0]
    new = max(len(tok), old)
    new = -(-new // multiple) * multiple
    embed = lm.get_input_embeddings().weight.data
    head = lm.get_output_embeddings().weight.data
    lm.resize_token_embeddings(new, mean_resizing=False)
    with torch.no_grad():
        lm.get_input_embeddings().weight[old:] = embed[:old].mean(0)
        if not getattr(lm.config, "tie_word_embeddings", False):
            lm.get_output_embeddings().weight[old:] = head[:old].mean(0)
    model.config.text_config.vocab_size = new
    model.config.image_token_id = tok.convert_tokens_to_ids("<image>")


def load_projector(model: LlavaForCausalLM, path: str | os.PathLike) -> None:
    """Load a stage-1 ``mm_projector.bin`` / ``.safetensors`` (original or llavakit key names)."""
    file = Path(path)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    if any(k.startswith(("model.mm_projector.", "mm_projector.")) for k in state):
        state = {
            ("model." + k if k.startswith("mm_projector.") else k): v for k, v in state.items()
        }
        mapped, _ = _projector_keys(state)
        state = {k.removeprefix("multi_modal_projector."): v for k, v in mapped.items()}
    state = {k.removeprefix("multi_modal_projector."): v for k, v in state.items()}
    newline = state.pop("image_newline", None)
    if newline is not None and getattr(model, "image_newline", None) is not None:
        with torch.no_grad():
            model.image_newline.copy_(newline)
    expected = model.multi_modal_projector.state_dict()
    for key, value in state.items():
        if key not in expected or expected[key].shape != value.shape:
            shape = tuple(expected[key].shape) if key in expected else None
            raise CheckpointError(
                f"{file}: projector weight {key} has shape {tuple(value.shape)}, model expects {shape}"
            )
    model.multi_modal_projector.load_state_dict(state, strict=True)
