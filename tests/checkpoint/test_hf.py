"""The transformers (llava-hf) layout: parity with transformers, round trips, safe writing."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

import llavakit
from llavakit.checkpoint.check import sample_image
from llavakit.checkpoint.hf import save_hf
from llavakit.cli import main
from llavakit.errors import OutputExists
from llavakit.testing import build_tiny_checkpoint

HF_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "llava": build_tiny_checkpoint(root / "llava", seed=4, family="llava"),
        "llava_next": build_tiny_checkpoint(root / "llava_next", seed=5, family="llava_next"),
    }


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under ``directory``."""
    return {
        str(f.relative_to(directory)): (
            hashlib.sha256(f.read_bytes()).hexdigest(),
            f.stat().st_mtime_ns,
        )
        for f in sorted(directory.rglob("*"))
        if f.is_file()
    }


def hf_inputs(family: str, batch) -> dict[str, torch.Tensor]:
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    if family == "llava":
        inputs["pixel_values"] = torch.cat(batch.pixel_values)
    else:
        assert len({p.shape[0] for p in batch.pixel_values}) == 1  # equal tile counts
        inputs["pixel_values"] = torch.stack(batch.pixel_values)
        inputs["image_sizes"] = torch.tensor(batch.image_sizes)
    return inputs


@torch.no_grad()
def llavakit_logits(pipe, batch) -> torch.Tensor:
    return pipe.model(
        batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_sizes
    ).logits


@torch.no_grad()
def transformers_logits(path: Path, family: str, batch) -> torch.Tensor:
    model = HF_CLASSES[family].from_pretrained(path, dtype=torch.float32).eval()
    return model(**hf_inputs(family, batch)).logits


def encode_one(pipe, prompt: str = "What is in the image?"):
    return pipe.processor.collate([pipe.processor.encode(images=[sample_image()], prompt=prompt)])


def state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


# -- parity with transformers ---------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_transformers_loads_llavakit_checkpoint_with_identical_logits(checkpoints, family):
    path = checkpoints[family]
    pipe = llavakit.load(path, dtype="float32")
    batch = encode_one(pipe)
    n_image_tokens = int((batch.input_ids == pipe.model.config.image_token_id).sum())
    if family == "llava_next":
        assert batch.pixel_values[0].shape[0] > 1  # anyres: several tiles
        assert n_image_tokens > 16
    else:
        assert n_image_tokens == 16
    ours = llavakit_logits(pipe, batch)
    theirs = transformers_logits(path, family, batch)
    assert ours.shape == theirs.shape == (*batch.input_ids.shape, 384)
    assert ours.std().item() > 0.5  # peaked random logits, not near-uniform
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_transformers_processor_matches_llavakit_processor(checkpoints):
    """The saved processor files reproduce llavakit's token ids and pixels (pad mode)."""
    path = checkpoints["llava"]
    pipe = llavakit.load(path, dtype="float32")
    proc = AutoProcessor.from_pretrained(path)
    content = [{"type": "image"}, {"type": "text", "text": "What is this?"}]
    text = proc.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True
    )
    theirs = proc(images=[sample_image()], text=text, return_tensors="pt")
    ours = pipe.processor.encode(
        images=[sample_image()], messages=[{"role": "user", "content": "What is this?"}]
    )
    assert theirs["input_ids"][0].tolist() == ours.input_ids
    assert torch.equal(theirs["pixel_values"], ours.pixel_values[0])


# -- round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_save_load_round_trip(checkpoints, family, tmp_path):
    first = llavakit.load(checkpoints[family], dtype="float32")
    save_hf(first.model, first.processor, tmp_path / "copy")
    second = llavakit.load(tmp_path / "copy", dtype="float32")
    assert state_dicts_equal(first.model, second.model)
    assert second.model.config.llavakit_fields() == first.model.config.llavakit_fields()
    assert second.model.config.text_config.to_dict() == first.model.config.text_config.to_dict()
    assert second.model.config.vision_config.to_dict() == first.model.config.vision_config.to_dict()
    assert second.processor.template.name == "vicuna_v1"
    assert second.model.config.image_aspect_ratio == ("pad" if family == "llava" else "anyres")
    batch = encode_one(first)
    assert torch.equal(llavakit_logits(first, batch), llavakit_logits(second, batch))


def test_round_trip_keeps_non_default_settings(tmp_path):
    """Template, aspect mode and image-token style are llavakit-only and must survive."""
    path = build_tiny_checkpoint(
        tmp_path / "src", seed=6, template="llava_v1", image_aspect_ratio="square"
    )
    first = llavakit.load(path, dtype="float32")
    assert (first.processor.template.name, first.model.config.image_aspect_ratio) == (
        "llava_v1",
        "square",
    )
    first.model.config.image_token_style = "sentinel"
    save_hf(first.model, first.processor, tmp_path / "copy")
    second = llavakit.load(tmp_path / "copy", dtype="float32")
    assert second.processor.template.name == "llava_v1"
    assert second.model.config.image_aspect_ratio == "square"
    assert second.model.config.image_token_style == "sentinel"
    assert state_dicts_equal(first.model, second.model)

    # A template chosen at load time is what gets saved.
    third = llavakit.load(tmp_path / "copy", dtype="float32", template="vicuna_v1")
    save_hf(third.model, third.processor, tmp_path / "copy2")
    assert llavakit.load(tmp_path / "copy2").processor.template.name == "vicuna_v1"


def test_save_refuses_existing_directory(checkpoints, tmp_path):
    pipe = llavakit.load(checkpoints["llava"], dtype="float32")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(out)
    with pytest.raises(OutputExists):
        save_hf(pipe.model, pipe.processor, out)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no partial directories


def test_save_refuses_existing_file(checkpoints, tmp_path):
    pipe = llavakit.load(checkpoints["llava"], dtype="float32")
    out = tmp_path / "file"
    out.write_text("not a directory")
    with pytest.raises(OutputExists):
        save_hf(pipe.model, pipe.processor, out)
    assert out.read_text() == "not a directory"


# -- llavakit convert (hf -> hf) --------------------------------------------------------------------


def run_cli(args: list[str]) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(args)
    return code, stdout.getvalue()


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_convert_hf_to_hf(checkpoints, family, tmp_path):
    src = checkpoints[family]
    before = snapshot(src)
    out = tmp_path / "converted"
    code, stdout = run_cli(["convert", str(src), str(out), "--check"])
    assert code == 0, stdout
    assert snapshot(src) == before
    lines = [line for line in stdout.splitlines() if "max |logit difference|" in line]
    assert len(lines) == 1, stdout
    assert float(lines[0].split("=")[1].split(";")[0]) == 0.0
    assert "greedy text identical: True" in lines[0]
    assert state_dicts_equal(
        llavakit.load(src, dtype="float32").model, llavakit.load(out, dtype="float32").model
    )


def test_convert_without_check_prints_no_check_line(checkpoints, tmp_path):
    code, stdout = run_cli(
        ["convert", str(checkpoints["llava"]), str(tmp_path / "o"), "--from", "hf"]
    )
    assert code == 0
    assert "max |logit difference|" not in stdout
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_convert_refuses_existing_output(checkpoints, tmp_path, capsys):
    src = checkpoints["llava"]
    before_src = snapshot(src)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(out)
    assert main(["convert", str(src), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert snapshot(out) == before
    assert snapshot(src) == before_src


def test_convert_refuses_output_equal_to_input(checkpoints, capsys):
    src = checkpoints["llava"]
    before = snapshot(src)
    assert main(["convert", str(src), str(src)]) == 2
    assert "convert never writes into its input" in capsys.readouterr().err
    assert main(["convert", str(src), str(src / "nested" / "out")]) == 2
    assert "convert never writes into its input" in capsys.readouterr().err
    assert snapshot(src) == before


# -- checkpoints written by transformers ----------------------------------------------------------


def keys_of(path: Path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


def copy_processor_files(src: Path, dst: Path) -> None:
    for name in (*TOKENIZER_FILES, "processor_config.json"):
        shutil.copy(src / name, dst / name)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_transformers_save_pretrained_loads(checkpoints, family, tmp_path):
    src = checkpoints[family]
    model = HF_CLASSES[family].from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(tmp_path / "sp")
    written = keys_of(tmp_path / "sp")
    # transformers 5 writes the classic on-disk names back (in memory it uses model.*).
    assert any(k.startswith("model.language_model.") for k in model.state_dict())
    assert written == keys_of(src)
    copy_processor_files(src, tmp_path / "sp")
    first = llavakit.load(src, dtype="float32")
    second = llavakit.load(tmp_path / "sp", dtype="float32")
    assert state_dicts_equal(first.model, second.model)
    assert second.model.config.llavakit_fields() == first.model.config.llavakit_fields()


def _in_memory_layout(state: dict[str, torch.Tensor], vision_model: bool) -> dict:
    """transformers >= 4.52 in-memory names; 4.x CLIP towers kept a ``vision_model.`` level."""
    if not vision_model:
        return state
    prefix = "model.vision_tower."
    return {
        (prefix + "vision_model." + k[len(prefix) :] if k.startswith(prefix) else k): v
        for k, v in state.items()
    }


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("vision_model", [False, True], ids=["tf5", "tf4.52"])
def test_in_memory_key_layout_loads(checkpoints, family, vision_model, tmp_path):
    src = checkpoints[family]
    hf_model = HF_CLASSES[family].from_pretrained(src, dtype=torch.float32).eval()
    state = _in_memory_layout(
        {k: v.contiguous() for k, v in hf_model.state_dict().items()}, vision_model
    )
    out = tmp_path / "in_memory"
    out.mkdir()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "config.json", out / "config.json")
    copy_processor_files(src, out)
    keys = keys_of(out)
    assert "lm_head.weight" in keys
    assert any(k.startswith("model.language_model.layers.") for k in keys)
    assert any(k.startswith("model.multi_modal_projector.") for k in keys)
    assert not any(k.startswith("language_model.") for k in keys)

    pipe = llavakit.load(out, dtype="float32")
    assert state_dicts_equal(pipe.model, llavakit.load(src, dtype="float32").model)
    batch = encode_one(pipe)
    with torch.no_grad():
        theirs = hf_model(**hf_inputs(family, batch)).logits
    assert (llavakit_logits(pipe, batch) - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_tower_saved_under_classic_names_and_flat_names_load(checkpoints, family, tmp_path):
    """llavakit writes llava-hf's ``vision_tower.vision_model.*`` (what transformers 4.x and hub
    files use); files with transformers 5's flat tower names load as well."""
    src = checkpoints[family]
    saved = load_file(str(src / "model.safetensors"))
    tower = [k for k in saved if k.startswith("vision_tower.")]
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
    out = tmp_path / "flat"
    shutil.copytree(src, out)
    state = {
        k.replace("vision_tower.vision_model.", "vision_tower.", 1): v for k, v in saved.items()
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    pipe = llavakit.load(out, dtype="float32")
    assert state_dicts_equal(pipe.model, llavakit.load(src, dtype="float32").model)
    batch = encode_one(pipe)
    theirs = transformers_logits(out, family, batch)
    assert (llavakit_logits(pipe, batch) - theirs).abs().max().item() <= 1e-5


def test_checkpoint_without_llavakit_section_reads_processor_config(checkpoints, tmp_path):
    """A llava checkpoint saved by transformers 5 alone: pad mode comes from processor_config.json."""
    src = checkpoints["llava"]
    out = tmp_path / "plain"
    shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    config.pop("llavakit")
    (out / "config.json").write_text(json.dumps(config))
    assert not (out / "preprocessor_config.json").exists()
    pipe = llavakit.load(out, dtype="float32")
    assert pipe.model.config.image_aspect_ratio == "pad"
    ours = pipe.processor.encode(images=[sample_image()], prompt="What is this?")
    reference = llavakit.load(src, dtype="float32").processor.encode(
        images=[sample_image()], prompt="What is this?"
    )
    assert ours.input_ids == reference.input_ids
    assert torch.equal(ours.pixel_values[0], reference.pixel_values[0])


def test_convert_to_bfloat16_checks_against_float32_source(checkpoints, tmp_path):
    src = checkpoints["llava"]
    out = tmp_path / "bf16"
    code, stdout = run_cli(["convert", str(src), str(out), "--dtype", "bfloat16", "--check"])
    assert code == 0, stdout
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("language_model.lm_head.weight").dtype == torch.bfloat16
    line = next(line for line in stdout.splitlines() if "max |logit difference|" in line)
    diff = float(line.split("=")[1].split(";")[0])
    assert 0.0 < diff < 1.0  # bf16 rounding is visible, not hidden by casting the reference


def test_convert_bad_input_writes_nothing(tmp_path, capsys):
    src = tmp_path / "not_a_checkpoint"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    assert "not a LLaVA checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_checkpoint"]
