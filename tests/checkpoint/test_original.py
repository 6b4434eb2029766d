"""Original (liuhaotian) layout: import, convert to the transformers layout, and parity with an
independent re-implementation of the original forward pass written here."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

import llavakit
from llavakit.checkpoint.original import load_projector
from llavakit.cli import main
from llavakit.errors import CheckpointError
from llavakit.testing import randomize, tiny_tokenizer

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_TOKEN_INDEX = -200
TOWER_DIM, TEXT_DIM, CROP = 32, 48, 56
VOCAB = 320  # the original vocabulary (no <image> token)
N_PATCHES = (CROP // 14) ** 2


def tokenizer_without_image_token():
    """Like LLaMA's tokenizer: no ``<image>`` token (the original marks images with -200)."""
    return tiny_tokenizer(VOCAB, image_token=False)


def text_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=TEXT_DIM,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )


def build_original_checkpoint(root: Path) -> tuple[Path, Path]:
    """A random liuhaotian-layout checkpoint (``root/in``) and its CLIP tower (``root/tower``)."""
    tower_dir, ckpt = root / "tower", root / "in"
    vision = CLIPVisionConfig(
        hidden_size=TOWER_DIM,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=CROP,
        patch_size=14,
    )
    tower = CLIPVisionModel(vision)
    randomize(tower, seed=11)
    tower.save_pretrained(tower_dir)
    preprocessor = {
        "crop_size": CROP,
        "size": CROP,
        "do_resize": True,
        "do_center_crop": True,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
        "image_processor_type": "CLIPImageProcessor",
    }
    (tower_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor))

    tokenizer = tokenizer_without_image_token()
    assert "<image>" not in tokenizer.get_vocab()
    assert len(tokenizer) == VOCAB
    config = text_config(len(tokenizer))
    lm = LlamaForCausalLM(config)
    randomize(lm, seed=12)
    gen = torch.Generator().manual_seed(13)
    projector = {
        "model.mm_projector.0.weight": torch.randn(TEXT_DIM, TOWER_DIM, generator=gen) * 0.3,
        "model.mm_projector.0.bias": torch.randn(TEXT_DIM, generator=gen) * 0.3,
        "model.mm_projector.2.weight": torch.randn(TEXT_DIM, TEXT_DIM, generator=gen) * 0.3,
        "model.mm_projector.2.bias": torch.randn(TEXT_DIM, generator=gen) * 0.3,
    }
    ckpt.mkdir()
    cfg = config.to_dict() | {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "mm_vision_tower": str(tower_dir),
        "mm_hidden_size": TOWER_DIM,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "mm_patch_merge_type": "flat",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
    }
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
    weights = {k: v.contiguous() for k, v in lm.state_dict().items()} | projector
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(weights)
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(ckpt)
    return ckpt, tower_dir


def snapshot(*dirs: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under ``dirs``."""
    out = {}
    for d in dirs:
        for f in sorted(p for p in d.rglob("*") if p.is_file()):
            out[str(f)] = (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
    return out


def noise_image(width: int = 90, height: int = 50, seed: int = 5) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Run ``llavakit convert IN OUT --from original --check`` once for the module."""
    root = tmp_path_factory.mktemp("original")
    ckpt, tower = build_original_checkpoint(root)
    before = snapshot(ckpt, tower)
    out = root / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["convert", str(ckpt), str(out), "--from", "original", "--check"])
    return dict(ckpt=ckpt, tower=tower, out=out, code=code, stdout=stdout.getvalue(), before=before)


# -- an independent implementation of the original LLaVA (llava/mm_utils.py, llava_arch.py) ----


def vicuna_v1_prompt(turns: list[tuple[str, str | None]]) -> str:
    """conv_vicuna_v1.get_prompt(): SeparatorStyle.TWO, seps (" ", "</s>")."""
    seps = [" ", "</s>"]
    ret = VICUNA_SYSTEM + seps[0]
    for i, (role, message) in enumerate(turns):
        ret += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
    return ret


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """llava.mm_utils.tokenizer_image_token."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    offset = 0
    input_ids = []
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    separated = [x for chunk in chunks for x in (chunk, [IMAGE_TOKEN_INDEX] * (offset + 1))][:-1]
    for x in separated:
        input_ids.extend(x[offset:])
    return input_ids


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    if width > height:
        result = Image.new(image.mode, (width, width), background)
        result.paste(image, (0, (width - height) // 2))
        return result
    result = Image.new(image.mode, (height, height), background)
    result.paste(image, ((height - width) // 2, 0))
    return result


class OriginalLlava:
    """LlavaLlamaForCausalLM's forward from the raw original files."""

    def __init__(self, ckpt: Path, tower: Path) -> None:
        cfg = json.loads((ckpt / "config.json").read_text())
        state = load_file(str(ckpt / "model.safetensors"))
        self.lm = LlamaForCausalLM(text_config(cfg["vocab_size"])).eval()
        lm_state = {k: v for k, v in state.items() if not k.startswith("model.mm_projector.")}
        self.lm.load_state_dict(lm_state, strict=True)
        self.projector = {k: v for k, v in state.items() if k.startswith("model.mm_projector.")}
        self.tower = CLIPVisionModel.from_pretrained(tower).eval()
        self.image_processor = CLIPImageProcessorPil.from_pretrained(tower)
        self.tokenizer = AutoTokenizer.from_pretrained(ckpt)
        self.select_layer = cfg["mm_vision_select_layer"]

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        background = tuple(int(x * 255) for x in self.image_processor.image_mean)
        square = expand2square(image, background)
        return self.image_processor.preprocess(square, return_tensors="pt")["pixel_values"]

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixels, output_hidden_states=True)
        features = out.hidden_states[self.select_layer][:, 1:]  # "patch"
        p = self.projector
        x = F.linear(features, p["model.mm_projector.0.weight"], p["model.mm_projector.0.bias"])
        x = F.gelu(x)
        return F.linear(x, p["model.mm_projector.2.weight"], p["model.mm_projector.2.bias"])

    @torch.no_grad()
    def logits(self, input_ids: list[int], images: list[Image.Image]) -> torch.Tensor:
        """prepare_inputs_labels_for_multimodal for one sample, then the LM on inputs_embeds."""
        features = self.image_features(torch.cat([self.pixel_values(im) for im in images]))
        ids = torch.tensor(input_ids)
        positions = [-1, *torch.where(ids == IMAGE_TOKEN_INDEX)[0].tolist(), len(ids)]
        texts = [ids[positions[i] + 1 : positions[i + 1]] for i in range(len(positions) - 1)]
        embed = self.lm.get_input_embeddings()
        text_embeds = embed(torch.cat(texts)).split([len(t) for t in texts])
        pieces = []
        for i, chunk in enumerate(text_embeds):
            pieces.append(chunk)
            if i < len(features):
                pieces.append(features[i])
        embeds = torch.cat(pieces)[None]
        return self.lm(inputs_embeds=embeds).logits[0]


@pytest.fixture(scope="module")
def reference(converted):
    return OriginalLlava(converted["ckpt"], converted["tower"])


# -- tests ----------------------------------------------------------------------------------------


def test_convert_succeeds_and_checks(converted):
    assert converted["code"] == 0
    lines = [line for line in converted["stdout"].splitlines() if "max |logit difference|" in line]
    assert len(lines) == 1, converted["stdout"]
    diff = float(lines[0].split("=")[1].split(";")[0])
    assert diff <= 1e-5
    assert "greedy text identical: True" in lines[0]


def test_convert_leaves_input_untouched(converted):
    assert snapshot(converted["ckpt"], converted["tower"]) == converted["before"]
    assert sorted(p.name for p in converted["ckpt"].iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_output_records_training_settings(converted):
    cfg = json.loads((converted["out"] / "config.json").read_text())
    assert cfg["model_type"] == "llava"
    settings = cfg["llavakit"]
    assert settings["template"] == "vicuna_v1"
    assert settings["image_token_style"] == "sentinel"
    assert settings["image_aspect_ratio"] == "pad"
    tokenizer = AutoTokenizer.from_pretrained(converted["out"])
    assert settings["image_token_id"] == tokenizer.convert_tokens_to_ids("<image>") == VOCAB
    assert cfg["image_token_index"] == VOCAB
    assert cfg["text_config"]["vocab_size"] % 64 == 0 and cfg["text_config"]["vocab_size"] > VOCAB


def test_output_loads_in_transformers(converted, reference):
    pipe = llavakit.load(converted["out"], dtype="float32")
    batch = pipe.processor.collate([pipe.processor.encode(images=[noise_image()], prompt="Hi?")])
    hf = LlavaForConditionalGeneration.from_pretrained(converted["out"], dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=torch.cat(batch.pixel_values),
        ).logits
        ours = pipe.model(
            batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_sizes
        ).logits
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() <= 1e-5
    # transformers' embeddings: the original rows, then the added ones plus padding rows.
    emb = hf.get_input_embeddings().weight
    assert torch.equal(emb[:VOCAB], reference.lm.get_input_embeddings().weight)


@pytest.mark.parametrize(
    "prompt", ["Describe the image.", "What colour is the shape? How many objects are there?"]
)
def test_logits_match_original_forward(converted, reference, prompt):
    image = noise_image()
    ids = tokenizer_image_token(
        vicuna_v1_prompt([("USER", "<image>\n" + prompt), ("ASSISTANT", None)]), reference.tokenizer
    )
    expected = reference.logits(ids, [image])
    assert expected.shape == (len(ids) - 1 + N_PATCHES, VOCAB)
    assert expected.std().item() > 0.5  # random but peaked, not near-uniform

    pipe = llavakit.load(converted["out"], dtype="float32")
    batch = pipe.processor.collate([pipe.processor.encode(images=[image], prompt=prompt)])
    with torch.no_grad():
        logits = pipe.model(
            batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_sizes
        ).logits[0]
    assert logits.shape[0] == expected.shape[0]
    diff = (logits[:, :VOCAB] - expected).abs().max().item()
    assert diff <= 1e-4, diff
    assert diff <= 1e-5  # float32 with identical arithmetic: rounding noise only


def test_logits_differ_with_the_image(converted, reference):
    """The comparison above is only meaningful if the image actually reaches the logits."""
    ids = tokenizer_image_token(
        vicuna_v1_prompt([("USER", "<image>\nHi"), ("ASSISTANT", None)]), reference.tokenizer
    )
    a = reference.logits(ids, [noise_image(seed=1)])
    b = reference.logits(ids, [noise_image(seed=2)])
    assert (a[-1] - b[-1]).abs().max().item() > 1e-2


def test_greedy_text_equal_for_input_and_output(converted, reference):
    image = noise_image()
    question = "What is in the image?"
    source = llavakit.load(converted["ckpt"], dtype="float32")
    target = llavakit.load(converted["out"], dtype="float32")
    assert source.processor.config.image_token_id == IMAGE_TOKEN_INDEX
    texts = [p.chat([image], question, max_new_tokens=8) for p in (source, target)]
    assert texts[0] == texts[1]

    # ... and equal to greedy decoding with the original forward.
    prompt = vicuna_v1_prompt([("USER", "<image>\n" + question), ("ASSISTANT", None)])
    ids = tokenizer_image_token(prompt, reference.tokenizer)
    generated: list[int] = []
    while len(generated) < 8:
        token = int(reference.logits(ids + generated, [image])[-1].argmax())
        if token == reference.tokenizer.eos_token_id:
            break
        generated.append(token)
    assert generated  # something was generated, so the comparison means something
    assert texts[0] == reference.tokenizer.decode(generated)


@pytest.mark.parametrize(
    "messages, n_images",
    [
        ([{"role": "user", "content": "What is in the image?"}], 1),
        ([{"role": "user", "content": "Left <image>\nright <image>\nSame?"}], 2),
        (
            [
                {"role": "user", "content": "<image>\nDescribe the picture."},
                {"role": "assistant", "content": "There is a red circle."},
                {"role": "user", "content": "Where is the ball?"},
            ],
            1,
        ),
    ],
)
def test_output_tokenizes_like_original_training(converted, reference, messages, n_images):
    images = [noise_image(seed=i) for i in range(n_images)]
    turns = []
    for m in messages:
        text = m["content"]
        if m is messages[0] and "<image>" not in text:
            text = "<image>\n" + text
        turns.append(("USER" if m["role"] == "user" else "ASSISTANT", text))
    expected = tokenizer_image_token(
        vicuna_v1_prompt([*turns, ("ASSISTANT", None)]), reference.tokenizer
    )
    assert expected.count(IMAGE_TOKEN_INDEX) == n_images

    pipe = llavakit.load(converted["out"], dtype="float32")
    image_id = pipe.processor.config.image_token_id
    ids = pipe.processor.encode(images=images, messages=messages).input_ids
    collapsed = []
    for token in ids:  # one placeholder per image instead of one per feature
        if not (token == image_id and collapsed and collapsed[-1] == IMAGE_TOKEN_INDEX):
            collapsed.append(IMAGE_TOKEN_INDEX if token == image_id else token)
    assert collapsed == expected
    assert ids.count(image_id) == n_images * N_PATCHES


# -- stage-1 projector files ---------------------------------------------------------------------


def test_load_projector_bin(converted, tmp_path):
    pipe = llavakit.load(converted["out"], dtype="float32")
    gen = torch.Generator().manual_seed(21)
    weights = {
        "model.mm_projector.0.weight": torch.randn(TEXT_DIM, TOWER_DIM, generator=gen),
        "model.mm_projector.0.bias": torch.randn(TEXT_DIM, generator=gen),
        "model.mm_projector.2.weight": torch.randn(TEXT_DIM, TEXT_DIM, generator=gen),
        "model.mm_projector.2.bias": torch.randn(TEXT_DIM, generator=gen),
    }
    path = tmp_path / "mm_projector.bin"
    torch.save(weights, path)
    lm_before = {k: v.clone() for k, v in pipe.model.language_model.state_dict().items()}
    load_projector(pipe.model, path)
    proj = pipe.model.multi_modal_projector
    assert torch.equal(proj.linear_1.weight, weights["model.mm_projector.0.weight"])
    assert torch.equal(proj.linear_1.bias, weights["model.mm_projector.0.bias"])
    assert torch.equal(proj.linear_2.weight, weights["model.mm_projector.2.weight"])
    assert torch.equal(proj.linear_2.bias, weights["model.mm_projector.2.bias"])
    after = pipe.model.language_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in lm_before.items())


def test_load_projector_wrong_shape(converted, tmp_path):
    pipe = llavakit.load(converted["out"], dtype="float32")
    before = {k: v.clone() for k, v in pipe.model.multi_modal_projector.state_dict().items()}
    weights = {
        "model.mm_projector.0.weight": torch.zeros(TEXT_DIM, TOWER_DIM + 3),
        "model.mm_projector.0.bias": torch.zeros(TEXT_DIM),
        "model.mm_projector.2.weight": torch.zeros(TEXT_DIM, TEXT_DIM),
        "model.mm_projector.2.bias": torch.zeros(TEXT_DIM),
    }
    path = tmp_path / "mm_projector.bin"
    torch.save(weights, path)
    with pytest.raises(CheckpointError, match=r"\(48, 35\)"):
        load_projector(pipe.model, path)
    after = pipe.model.multi_modal_projector.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
