"""Model glue: projector registry, feature selection, splicing, count checks."""

from __future__ import annotations

import pytest
import torch

import llavakit
from llavakit.errors import FeatureCountMismatch, ImageCountMismatch
from llavakit.model.llava import LlavaForCausalLM, image_token_count, tokens_per_tile
from llavakit.model.projector import Projector
from llavakit.testing import tiny_config
from tests.conftest import random_image


@pytest.mark.parametrize(
    ("spec", "linears", "pre_norm"),
    [
        ("linear", 1, False),
        ("mlp2x_gelu", 2, False),
        ("mlp3x_gelu", 3, False),
        ("ln_mlp2x_gelu", 2, True),
        ("identity", 0, False),
    ],
)
def test_projector_registry(spec, linears, pre_norm):
    dim_in = 8 if spec != "identity" else 6
    proj = Projector(spec, dim_in, 6)
    assert proj.num_linears == linears
    assert (proj.pre_norm is not None) == pre_norm
    x = torch.randn(2, 5, dim_in)
    out = proj(x)
    assert out.shape == (2, 5, 6)
    if spec == "mlp2x_gelu":
        manual = proj.linear_2(torch.nn.functional.gelu(proj.linear_1(x)))
        assert torch.allclose(out, manual)
    if spec == "identity":
        assert torch.equal(out, x)


def test_unknown_projector_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown projector type 'mlp2x_relu'"):
        Projector("mlp2x_relu", 4, 4)


def test_token_counts_follow_tower_and_strategy():
    assert tokens_per_tile(tiny_config(tower="clip")) == 16  # 56/14 = 4x4, CLS dropped
    assert tokens_per_tile(tiny_config(tower="clip", strategy="full")) == 17
    assert tokens_per_tile(tiny_config(tower="siglip", strategy="full")) == 16  # no CLS
    cfg = tiny_config(family="llava_next")
    assert image_token_count(cfg, (56, 56)) > tokens_per_tile(cfg)


def _reference_splice(model, ids, pixel_values, sizes):
    """Per-sample loop: the straightforward (slow) way, to check the vectorised splice."""
    features = model.encode_images(pixel_values, sizes)
    embed = model.language_model.get_input_embeddings()
    rows, used = [], 0
    for row in ids:
        parts = []
        for token in row.tolist():
            if token == model.config.image_token_id:
                parts.append(features[used])
                used += 1
            else:
                parts.append(embed.weight[token])
        rows.append(torch.stack(parts))
    return torch.stack(rows)


def test_vectorised_splice_equals_per_token_loop(llava_next_dir):
    pipe = llavakit.load(llava_next_dir, dtype="float32")
    encoded = [
        pipe.encode([random_image(40, 90, 1), random_image(90, 20, 2)], "Compare the two."),
        pipe.encode(None, "Only text here."),
        pipe.encode([random_image(33, 33, 3)], "One image."),
    ]
    batch = pipe.processor.collate(encoded)
    with torch.no_grad():
        fast = pipe.model.embed(batch.input_ids, batch.pixel_values, batch.image_sizes)
        slow = _reference_splice(pipe.model, batch.input_ids, batch.pixel_values, batch.image_sizes)
    assert torch.equal(fast, slow)


def test_text_only_needs_no_images(llava15_dir):
    pipe = llavakit.load(llava15_dir, dtype="float32")
    ids = pipe.encode(None, "hello").input_ids
    assert pipe.model.config.image_token_id not in ids
    assert isinstance(pipe.chat(prompt="hello", max_new_tokens=4), str)


def test_images_are_put_first_when_prompt_has_no_placeholder(llava15_dir):
    pipe = llavakit.load(llava15_dir, dtype="float32")
    turns = pipe.processor.build_turns("Describe.", None, 2)
    assert turns == [("user", "<image>\n<image>\nDescribe.")]
    text = pipe.processor.render(turns)
    assert text.endswith("USER: <image>\n<image>\nDescribe. ASSISTANT:")


def test_placeholder_count_mismatch_names_both_counts(llava15_dir):
    pipe = llavakit.load(llava15_dir, dtype="float32")
    with pytest.raises(ImageCountMismatch, match="2 <image> placeholder.*1 image"):
        pipe.chat([random_image(30, 30)], "<image> and <image>?")
    with pytest.raises(ImageCountMismatch, match="1 <image> placeholder.*0 image"):
        pipe.chat([], "<image> what?")


def test_feature_count_mismatch_is_specific():
    cfg = tiny_config(image_token_id=5)
    model = LlavaForCausalLM(cfg).eval()
    ids = torch.tensor([[1, 5, 5, 7]])
    pixels = [torch.zeros(1, 3, 56, 56)]
    with pytest.raises(
        FeatureCountMismatch, match="2 image placeholder tokens but the images produce 16"
    ):
        model.embed(ids, pixels, [(56, 56)])
    with pytest.raises(FeatureCountMismatch, match="produce 0"):
        model.embed(ids)


@pytest.mark.parametrize(
    ("aspect", "merge"),
    [
        ("anyres", "spatial_unpad"),
        ("anyres", "flat"),
        ("anyres", "spatial"),
        ("anyres_max_2", "spatial_unpad"),
    ],
)
def test_encoded_length_equals_predicted_count(aspect, merge):
    cfg = tiny_config(family="llava_next", image_aspect_ratio=aspect)
    cfg.patch_merge_type = merge
    model = LlavaForCausalLM(cfg).eval()
    from llavakit.processing.processor import image_preprocessor_for

    prep = image_preprocessor_for(cfg)
    for w, h in [(200, 40), (40, 200), (120, 120), (7, 9)]:
        image = random_image(w, h)
        with torch.no_grad():
            feats = model.encode_images([prep(image)], [(h, w)])
        assert feats.shape[0] == image_token_count(cfg, (h, w))


@pytest.mark.parametrize("lora", [False, True])
def test_training_loss_on_supervised_positions_equals_full_logits_loss(lora):
    """The answer-only vocabulary projection gives the LM's own loss and the same gradients."""
    torch.manual_seed(0)
    cfg = tiny_config(image_token_id=5)
    model = LlavaForCausalLM(cfg).train()
    if lora:
        from peft import LoraConfig, get_peft_model

        lora_cfg = LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False
        )
        model.language_model = get_peft_model(model.language_model, lora_cfg)
    n = tokens_per_tile(cfg)
    ids = torch.tensor([[1, *[5] * n, 9, 10, 11, 12, 13], [1, *[5] * n, 20, 21, 22, 0, 0]])
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    labels = ids.masked_fill(ids == 5, -100)
    labels[:, : n + 3] = -100
    labels[1, -2:] = -100
    pixels = [torch.randn(1, 3, 56, 56), torch.randn(1, 3, 56, 56)]
    sizes = [(56, 56), (56, 56)]

    out = model(ids, mask, pixels, sizes, labels=labels)
    assert out.logits is None
    out.loss.backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    embeds = model.embed(ids, pixels, sizes)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full = model.language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, labels=labels
    )
    full.loss.backward()
    assert torch.allclose(out.loss, full.loss, atol=1e-5)
    assert ours and all(
        torch.allclose(ours[k], p.grad, atol=1e-6) for k, p in model.named_parameters() if k in ours
    )
    assert any("lora_" in k for k in ours) == lora
