"""Native format: the transformers llava / llava_next checkpoint layout (safetensors).

Saved directories load in transformers' LlavaForConditionalGeneration /
LlavaNextForConditionalGeneration as they are; llavakit's own settings (template, image-token
style, pad mode, ...) ride along in config.json under "llavakit".
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer

from llavakit.checkpoint.io import (
    atomic_directory,
    build_with_weights,
    classic_tower_keys,
    read_state_dict,
)
from llavakit.config import LlavaConfig
from llavakit.model.llava import TOWERS_WITHOUT_CLS, LlavaForCausalLM
from llavakit.processing.processor import LlavaProcessor

# transformers >= 4.52 in-memory names -> llavakit (= the classic on-disk llava-hf names).
_KEY_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
    ("lm_head.", "language_model.lm_head."),
)


def to_llavakit_key(key: str) -> str:
    for old, new in _KEY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _settings_from_processor_files(path: Path, config: LlavaConfig) -> None:
    """Checkpoints written by other tools: take pad mode, mean/std and size from their files."""
    pre = path / "preprocessor_config.json"
    proc = path / "processor_config.json"  # transformers 5 nests the image processor here
    data = None
    if pre.is_file():
        data = json.loads(pre.read_text())
    elif proc.is_file():
        data = json.loads(proc.read_text()).get("image_processor")
    if isinstance(data, dict):
        if data.get("do_pad") and config.family == "llava":
            config.image_aspect_ratio = "pad"
        if data.get("image_mean"):
            config.image_mean = tuple(data["image_mean"])
            config.image_std = tuple(data["image_std"])


def _chat_template(path: Path) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    js = path / "chat_template.json"
    if js.is_file():
        return json.loads(js.read_text()).get("chat_template")
    return None


def load_hf(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, template: str | None = None
) -> tuple[LlavaForCausalLM, LlavaProcessor]:
    """Load a transformers-layout llava / llava_next checkpoint directory."""
    root = Path(path)
    hf_config = AutoConfig.from_pretrained(root, trust_remote_code=False)
    config = LlavaConfig.from_hf(hf_config)
    if not getattr(hf_config, "llavakit", None):
        _settings_from_processor_files(root, config)
    state = {to_llavakit_key(k): v for k, v in read_state_dict(root).items()}
    model = build_with_weights(lambda: LlavaForCausalLM(config), state, root)
    model.to(dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    chat = _chat_template(root)
    if chat and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat
    return model, LlavaProcessor(tokenizer, config, template)


def save_hf(
    model: LlavaForCausalLM,
    processor: LlavaProcessor,
    out: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` + ``processor`` as a transformers checkpoint directory, atomically."""
    # to_hf() hands the backbone configs to transformers, which resets their attention
    # implementation; the live model keeps using them, so work on a copy.
    config = copy.deepcopy(model.config)
    config.template = processor.template.name
    with atomic_directory(out, overwrite=overwrite) as tmp:
        config.to_hf().save_pretrained(tmp)
        state = classic_tower_keys(model.state_dict(), config.vision_config.model_type)
        if getattr(config.text_config, "tie_word_embeddings", False):
            state.pop("language_model.lm_head.weight", None)
        state = {k: v.detach().contiguous() for k, v in state.items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _hf_processor(config, processor).save_pretrained(tmp)
    return Path(out)


def _hf_processor(config: LlavaConfig, processor: LlavaProcessor):
    """The transformers processor that reproduces this model's preprocessing."""
    from transformers import LlavaNextProcessor
    from transformers import LlavaProcessor as HFProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    size = config.image_size
    common = dict(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )
    tokenizer = processor.tokenizer
    chat_template = jinja_for(processor.template) or getattr(tokenizer, "chat_template", None)
    extra = int(config.vision_config.model_type not in TOWERS_WITHOUT_CLS)
    kwargs = dict(
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=chat_template,
        image_token=config.image_token,
        num_additional_image_tokens=extra,
    )
    if config.family == "llava_next":
        image_processor = LlavaNextImageProcessorPil(
            image_grid_pinpoints=config.image_grid_pinpoints, **common
        )
        return LlavaNextProcessor(image_processor=image_processor, **kwargs)
    image_processor = LlavaImageProcessorPil(do_pad=config.image_aspect_ratio == "pad", **common)
    return HFProcessor(image_processor=image_processor, **kwargs)


def jinja_for(template) -> str | None:
    """A Jinja chat template that renders like a llavakit template ("two" and "chatml" styles), so
    transformers users of a saved checkpoint get the prompt the model was trained with.

    Literal text is emitted through ``{{ "..." }}`` expressions: transformers renders chat
    templates with trim_blocks, which would eat newlines written after block tags.
    """
    if template.style not in ("two", "chatml"):
        return None

    def lit(text: str) -> str:
        return "{{ " + json.dumps(text) + " }}"

    user, assistant = template.roles
    out = (
        "{% set ns = namespace(system=" + json.dumps(template.system) + ") %}"
        "{% for m in messages if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% endfor %}"
        "{% macro text(m) %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] if c['type'] == 'image' %}" + lit("<image>\n") + "{% endfor %}"
        "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}"
        "{% endif %}{% endmacro %}"
    )
    if template.style == "two":
        return out + (
            "{{ ns.system + " + json.dumps(template.sep) + " }}"
            "{% for m in messages if m['role'] != 'system' %}{% if m['role'] == 'user' %}"
            + lit(user + ": ")
            + "{{ text(m) }}"
            + lit(template.sep)
            + "{% else %}"
            + lit(assistant + ": ")
            + "{{ text(m) }}"
            + lit(template.sep2)
            + "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}" + lit(assistant + ":") + "{% endif %}"
        )
    return out + (
        "{% if ns.system %}"
        + lit("<|im_start|>system\n")
        + "{{ ns.system }}"
        + lit(template.sep + "\n")
        + "{% endif %}{% for m in messages if m['role'] != 'system' %}{% if m['role'] == 'user' %}"
        + lit(user + "\n")
        + "{% else %}"
        + lit(assistant + "\n")
        + "{% endif %}"
        "{{ text(m) }}" + lit(template.sep + "\n") + "{% endfor %}"
        "{% if add_generation_prompt %}" + lit(assistant + "\n") + "{% endif %}"
    )
