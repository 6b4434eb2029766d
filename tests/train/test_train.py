"""`llavakit train` end to end on tiny parts: stages, LoRA merge, data refusal, recipes, curves."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

import llavakit
from llavakit.cli import main
from llavakit.errors import LlavakitError
from llavakit.train.run import parse_args, train


def _common(parts, out: Path, data: Path, **extra) -> list[str]:
    args = {
        "model_name_or_path": parts.lm,
        "vision_tower": parts.tower,
        "data_path": data,
        "image_folder": parts.data,
        "image_aspect_ratio": "pad",
        "output_dir": out,
        "per_device_train_batch_size": 4,
        "num_train_epochs": 1,
        "logging_steps": 1,
        "save_steps": 100,
        "report_to": "none",
        "model_max_length": 256,
        "seed": 0,
    }
    args.update(extra)
    return [item for k, v in args.items() for item in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def stage1(tiny_parts, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "stage1"
    train(
        _common(
            tiny_parts,
            out,
            tiny_parts.caption,
            version="plain",
            tune_mm_mlp_adapter=True,
            learning_rate=1e-3,
        )
    )
    return out


@pytest.fixture(scope="module")
def lora_run(tiny_parts, stage1, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    train(
        _common(
            tiny_parts,
            out,
            tiny_parts.qa,
            version="chatml_nosystem",
            pretrain_mm_mlp_adapter=stage1 / "mm_projector.safetensors",
            mm_tunable_parts="mm_mlp_adapter,mm_language_model,mm_vision_tower",
            mm_vision_tower_lr=1e-4,
            lora_enable=True,
            lora_r=4,
            lora_alpha=8,
            image_token_style="token",
            learning_rate=1e-3,
        )
    )
    return out


def test_stage1_saves_projector_alone_and_curves(stage1):
    weights = load_file(str(stage1 / "mm_projector.safetensors"))
    assert set(weights) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert weights["linear_1.weight"].shape == (48, 32)  # tower 32 -> LM 48
    rows = [json.loads(line) for line in (stage1 / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r and "learning_rate" in r for r in rows)
    assert (stage1 / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((stage1 / "llavakit_train.json").read_text())["stage"] == "pretrain"


def test_stage1_only_moves_the_projector(tiny_parts, stage1):
    from llavakit.checkpoint.original import load_projector
    from llavakit.train.args import DataArguments, ModelArguments
    from llavakit.train.build import new_llava

    model_args = ModelArguments(
        model_name_or_path=str(tiny_parts.lm), vision_tower=str(tiny_parts.tower)
    )
    fresh, _ = new_llava(
        model_args, DataArguments(image_aspect_ratio="pad"), type("T", (), {"bits": 16})()
    )
    before = {k: v.clone() for k, v in fresh.multi_modal_projector.state_dict().items()}
    load_projector(fresh, stage1 / "mm_projector.safetensors")
    after = fresh.multi_modal_projector.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_lora_run_loads_merges_and_converts(lora_run, tmp_path, capsys):
    record = json.loads((lora_run / "llavakit_train.json").read_text())
    assert record["stage"] == "lora"
    trainables = load_file(str(lora_run / "non_lora_trainables.safetensors"))
    assert any(k.startswith("multi_modal_projector.") for k in trainables)
    assert any(k.startswith("vision_tower.") for k in trainables)
    assert not any(k.startswith("language_model.") for k in trainables)
    pipe = llavakit.load(lora_run, dtype="float32")
    image = str(next((lora_run.parent.parent).rglob("*.png"), None) or "")
    question = "What colour is the shape?"
    out = tmp_path / "merged"
    assert main(["convert", str(lora_run), str(out)]) == 0
    assert "(lora -> hf)" in capsys.readouterr().out
    hf = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["LlavaForConditionalGeneration"]  # GGUF converters read it
    cfg = pipe.model.config
    assert saved["image_seq_length"] == (cfg.image_size // cfg.patch_size) ** 2
    from tests.conftest import random_image

    img = random_image(56, 56, 4)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    inputs = proc(
        images=img,
        text=proc.apply_chat_template(messages, add_generation_prompt=True),
        return_tensors="pt",
    )
    generated = hf.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = proc.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert pipe.chat([img], question, max_new_tokens=6) == expected
    assert llavakit.load(out, dtype="float32").chat([img], question, max_new_tokens=6) == expected
    del image


def test_full_finetune_saves_a_checkpoint_and_learns(tiny_parts, tmp_path):
    out = tmp_path / "full"
    train(
        _common(
            tiny_parts,
            out,
            tiny_parts.qa,
            version="vicuna_v1",
            mm_tunable_parts="mm_mlp_adapter,mm_language_model",
            learning_rate=3e-3,
            num_train_epochs=6,
        )
    )
    rows = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert rows[-1]["loss"] < rows[0]["loss"] * 0.8
    pipe = llavakit.load(out / "model", dtype="float32")
    assert pipe.processor.template.name == "vicuna_v1"
    assert pipe.model.config.image_token_style == "sentinel"


def test_invalid_data_is_refused_with_the_report_or_skipped(tiny_parts, tmp_path, capsys):
    samples = json.loads(Path(tiny_parts.qa).read_text())[:8]
    samples.append(
        {
            "id": "broken-missing-image",
            "image": "images/nope.png",
            "conversations": samples[0]["conversations"],
        }
    )
    samples.append({"id": "broken-empty", "conversations": []})
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(samples))
    argv = _common(tiny_parts, tmp_path / "refused", data, version="vicuna_v1")
    with pytest.raises(LlavakitError, match="broken-missing-image") as info:
        train(argv)
    assert "broken-empty" in str(info.value)
    assert not (tmp_path / "refused" / "model").exists()
    code = main(["train", *argv])
    assert code == 2 and "broken-missing-image" in capsys.readouterr().err
    out = tmp_path / "skipped"
    train(_common(tiny_parts, out, data, version="vicuna_v1", skip_invalid=True))
    assert "skipping 2 invalid sample(s) of 10" in capsys.readouterr().err
    assert (out / "model" / "config.json").is_file()


def test_qlora_without_bitsandbytes_is_a_clear_error(tiny_parts, tmp_path, block_import):
    block_import("bitsandbytes")
    argv = _common(tiny_parts, tmp_path / "q", tiny_parts.qa, lora_enable=True, bits=4)
    with pytest.raises(LlavakitError, match="--bits 4 .*needs bitsandbytes"):
        train(argv)


def test_recipe_yaml_with_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model_name_or_path: lm\nversion: plain\ntune_mm_mlp_adapter: true\ndata_path: d.json\n"
        "output_dir: out\nlearning_rate: 1.0e-3\nmm_vision_select_layer: -2\nreport_to: none\n"
    )
    model_args, data_args, training_args = parse_args([str(recipe), "--learning_rate", "5e-4"])
    assert model_args.tune_mm_mlp_adapter and model_args.version == "plain"
    assert data_args.data_path == "d.json"
    assert training_args.learning_rate == 5e-4


def test_parameter_groups_use_part_learning_rates(tiny_parts, tmp_path):
    from llavakit.train.build import build_model
    from llavakit.train.trainer import LlavaTrainer

    argv = _common(
        tiny_parts,
        tmp_path / "groups",
        tiny_parts.qa,
        mm_tunable_parts="mm_mlp_adapter,mm_language_model,mm_vision_tower",
        mm_vision_tower_lr=1e-5,
        mm_projector_lr=2e-4,
        learning_rate=3e-5,
    )
    model_args, data_args, training_args = parse_args(argv)
    model, _ = build_model(model_args, data_args, training_args)
    optimizer = LlavaTrainer(model=model, args=training_args).create_optimizer()
    lr_of = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lr_of[names[id(p)].split(".")[0]] = group["lr"]
    assert lr_of == {"vision_tower": 1e-5, "multi_modal_projector": 2e-4, "language_model": 3e-5}


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_qlora_8bit_trains_and_loads(tiny_parts, stage1, tmp_path):
    """QLoRA with an 8-bit base LM (bitsandbytes LLM.int8 runs on CPU): LoRA weights move,
    the run loads as a merged model."""
    out = tmp_path / "qlora"
    train(
        _common(
            tiny_parts,
            out,
            tiny_parts.qa,
            version="chatml_nosystem",
            pretrain_mm_mlp_adapter=stage1 / "mm_projector.safetensors",
            mm_tunable_parts="mm_mlp_adapter,mm_language_model",
            lora_enable=True,
            lora_r=4,
            lora_alpha=8,
            bits=8,
            image_token_style="token",
            learning_rate=1e-2,
            use_cpu=True,
        )
    )
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it trained
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    answer = llavakit.load(out, dtype="float32").chat(None, "hi", max_new_tokens=3)
    assert isinstance(answer, str)


@pytest.mark.parametrize("megabatches", [1, 4])
def test_modality_grouped_sampler_keeps_modalities_apart(megabatches):
    from llavakit.train.trainer import ModalityGroupedSampler

    gen = torch.Generator().manual_seed(1)
    lengths = [int(n) for n in torch.randint(1, 60, (72,), generator=gen)]
    lengths += [-int(n) for n in torch.randint(1, 60, (24,), generator=gen)]
    sampler = ModalityGroupedSampler(lengths, batch_size=8, seed=3, megabatches=megabatches)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))  # every sample once
    assert order == list(sampler)  # deterministic for a seed and epoch
    batches = [order[k : k + 8] for k in range(0, len(order), 8)]
    assert all(len({lengths[i] > 0 for i in b}) == 1 for b in batches)  # one modality each

    def padding(batches):
        return sum(
            max(abs(lengths[i]) for i in b) * len(b) - sum(abs(lengths[i]) for i in b)
            for b in batches
        )

    if megabatches > 1:  # length-sorted runs: far less padding than the unsorted order
        plain = ModalityGroupedSampler(lengths, batch_size=8, seed=3)
        unsorted = list(plain)
        assert padding(batches) < 0.5 * padding(
            [unsorted[k : k + 8] for k in range(0, len(unsorted), 8)]
        )
        sampler.set_epoch(1)
        assert list(sampler) != order  # a new shuffle each epoch
