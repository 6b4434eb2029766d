"""LLaVA JSON samples -> TrainExample; lazy dataset; collation; a forward pass with labels."""

from __future__ import annotations

import json

import pytest
import torch

from llavakit.data.dataset import (
    DatasetFormatError,
    InvalidSample,
    LlavaDataset,
    TrainExample,
    collate,
    encode_sample,
)
from llavakit.model.llava import IGNORE_INDEX, LlavaForCausalLM, image_token_count
from llavakit.processing.processor import LlavaProcessor
from llavakit.processing.templates import VICUNA_SYSTEM
from llavakit.testing import randomize, tiny_config, tiny_tokenizer
from tests.conftest import random_image

TOKENS_PER_IMAGE = 16  # 56px / patch 14 -> 4x4 patches, CLS dropped


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def proc(tok):
    config = tiny_config(image_token_id=tok.convert_tokens_to_ids("<image>"))
    return LlavaProcessor(tok, config)


@pytest.fixture
def folder(tmp_path):
    for i, (w, h) in enumerate([(40, 30), (20, 50)]):
        random_image(w, h, i).save(tmp_path / f"img{i}.png")
    return tmp_path


def sample(sid, *turns, image=None, **extra):
    roles = ["human", "gpt"]
    convs = [{"from": roles[i % 2], "value": v} for i, v in enumerate(turns)]
    out = {"id": sid, "conversations": convs, **extra}
    if image is not None:
        out["image"] = image
    return out


def test_image_sample(proc, folder):
    ex = encode_sample(proc, sample("a", "What is it?", "A cat.", image="img0.png"), folder, 512)
    image_id = proc.config.image_token_id
    assert ex.sample_id == "a"
    assert ex.input_ids.count(image_id) == TOKENS_PER_IMAGE == ex.image_tokens
    assert all(
        lab == IGNORE_INDEX for t, lab in zip(ex.input_ids, ex.labels, strict=True) if t == image_id
    )
    assert ex.image_sizes == [(30, 40)]
    assert [tuple(p.shape) for p in ex.pixel_values] == [(1, 3, 56, 56)]
    supervised = [lab for lab in ex.labels if lab != IGNORE_INDEX]
    assert proc.tokenizer.decode(supervised) == " A cat.</s>"


def test_placeholder_moves_to_the_front_like_the_original(proc, folder, tok):
    ex = encode_sample(
        proc, sample("a", "What is it? <image>", "A cat.", image="img0.png"), folder, 512
    )
    first = ex.input_ids.index(proc.config.image_token_id)
    after = ex.input_ids[first + TOKENS_PER_IMAGE :]
    assert tok.decode(after).startswith("\nWhat is it? ASSISTANT:")


def test_text_only_sample(proc, tok):
    ex = encode_sample(proc, sample("t", "Q1", "A1", "Q2", "A2"), None, 512)
    assert ex.pixel_values == [] and ex.image_sizes == [] and ex.image_tokens == 0
    assert tok.decode([lab for lab in ex.labels if lab != IGNORE_INDEX]) == " A1</s> A2</s>"


def test_multi_image_sample_keeps_placements(proc, folder, tok):
    s = sample("m", "<image>\nleft <image>\nright", "two", image=["img0.png", "img1.png"])
    ex = encode_sample(proc, s, folder, 512)
    assert ex.image_sizes == [(30, 40), (50, 20)]
    assert ex.image_tokens == 2 * TOKENS_PER_IMAGE
    assert len(ex.pixel_values) == 2
    image_id = proc.config.image_token_id
    text = tok.decode([t for t in ex.input_ids if t != image_id])
    assert text.endswith("USER: \nleft \nright ASSISTANT: two</s>")


def test_system_message(proc):
    s = {
        "id": "s",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Q"},
            {"from": "gpt", "value": "A"},
        ],
    }
    ex = encode_sample(proc, s, None, 512)
    text = proc.tokenizer.decode(ex.input_ids, skip_special_tokens=False)
    assert text == "<s>Be brief. USER: Q ASSISTANT: A</s>"


def test_anyres_counts_follow_the_image_size(tok, folder):
    config = tiny_config(family="llava_next", image_token_id=tok.convert_tokens_to_ids("<image>"))
    proc = LlavaProcessor(tok, config)
    ex = encode_sample(proc, sample("n", "Q", "A", image="img1.png"), folder, 2048)
    assert ex.image_tokens == image_token_count(config, (50, 20))
    assert ex.input_ids.count(config.image_token_id) == ex.image_tokens


def test_truncation_keeps_text_that_fits(proc, tok):
    s = sample("t", "Q1", "A1", "Q2", "A long answer " * 20)
    full = encode_sample(proc, s, None, 4096)
    cut = encode_sample(proc, s, None, len(full.input_ids) - 10)
    assert cut.input_ids == full.input_ids[:-10] and cut.labels == full.labels[:-10]


def test_truncation_into_the_image_or_all_replies_is_invalid(proc, folder):
    s = sample("img", "Q", "A", image="img0.png")
    with pytest.raises(InvalidSample, match="image tokens cut by truncation at 100 tokens"):
        encode_sample(proc, s, folder, 100)  # the system prompt alone is ~88 tokens
    with pytest.raises(InvalidSample, match="fully masked") as info:
        encode_sample(proc, sample("txt", "Q " * 50, "A"), None, 120)
    assert info.value.sample_id == "txt"


def test_dataset_is_lazy_and_supports_skip(proc, folder):
    data = [
        sample("ok", "Q", "A", image="img0.png"),
        sample("gone", "Q", "A", image="missing.png"),
        sample("text", "Q", "A longer answer"),
    ]
    path = folder / "data.json"
    path.write_text(json.dumps(data))
    ds = LlavaDataset(path, folder, proc, 512)  # the missing image is not noticed here
    assert len(ds) == 3
    assert ds.modality_lengths == [2, 2, -4]
    assert isinstance(ds[0], TrainExample)
    with pytest.raises(InvalidSample, match="missing.png") as info:
        ds[1]
    assert info.value.sample_id == "gone"
    ds.skip = {1}
    assert len(ds) == 2 and ds.modality_lengths == [2, -4]
    assert [ds[i].sample_id for i in range(len(ds))] == ["ok", "text"]


def test_dataset_rejects_a_file_that_is_not_a_list(tmp_path, proc):
    path = tmp_path / "data.json"
    path.write_text('{"id": 1}')
    with pytest.raises(DatasetFormatError, match="expected a JSON list"):
        LlavaDataset(path, tmp_path, proc)


def test_collate_right_pads(proc, folder):
    short = encode_sample(proc, sample("s", "Q", "A"), None, 512)
    long = encode_sample(proc, sample("l", "Q", "A", image="img0.png"), folder, 512)
    batch = collate([short, long], pad_token_id=3)
    n, m = len(short.input_ids), len(long.input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, m)
    assert batch["input_ids"][0].tolist() == short.input_ids + [3] * (m - n)
    assert batch["labels"][0].tolist() == short.labels + [IGNORE_INDEX] * (m - n)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (m - n)
    assert batch["attention_mask"][1].tolist() == [1] * m
    assert len(batch["pixel_values"]) == 1 and batch["image_sizes"] == [(30, 40)]


def test_forward_on_a_collated_batch_gives_a_label_dependent_loss(proc, folder):
    torch.manual_seed(0)
    model = LlavaForCausalLM(proc.config)
    randomize(model, seed=0)
    model.eval()
    examples = [
        encode_sample(
            proc, sample("i", "What is it?", "A red circle.", image="img0.png"), folder, 512
        ),
        encode_sample(proc, sample("t", "Q", "Two birds."), None, 512),
        encode_sample(
            proc,
            sample("m", "<image> <image>", "left right", image=["img0.png", "img1.png"]),
            folder,
            512,
        ),
    ]
    batch = collate(examples, pad_token_id=proc.tokenizer.pad_token_id)
    with torch.no_grad():
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        changed = batch["labels"].clone()
        supervised = changed != IGNORE_INDEX
        changed[supervised] = (changed[supervised] + 7) % 300
        other = model(**{**batch, "labels": changed}).loss
    assert torch.isfinite(other) and not torch.isclose(loss, other)
    prompt = VICUNA_SYSTEM  # sanity: the batch really is the vicuna rendering
    assert proc.tokenizer.decode(batch["input_ids"][1].tolist()).startswith("<s>" + prompt)


def test_json_lines_files(tmp_path, proc):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(sample("a", "Q", "A")), "", json.dumps(sample("b", "Q", "B"))]
    path.write_text("\n".join(lines) + "\n{broken\n")
    with pytest.raises(DatasetFormatError, match="line 4"):
        LlavaDataset(path, None, proc)
    path.write_text("\n".join(lines))
    assert [ex.sample_id for ex in LlavaDataset(path, None, proc)] == ["a", "b"]
