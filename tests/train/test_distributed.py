"""Two-process CPU training (gloo) under torchrun: DDP, and DeepSpeed ZeRO-3 whose partitioned
weights must be gathered before saving; the ZeRO-3 projector then feeds a stage-2 run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "deepspeed"
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
)
STEPS = 4  # 16 captions / (2 processes x batch 2) = 4 steps, one epoch
# tiny parts: CLIP hidden 32 (layer -2 patches) -> LM hidden 48, mlp2x_gelu
PROJECTOR_SHAPES = {
    "linear_1.weight": (48, 32),
    "linear_1.bias": (48,),
    "linear_2.weight": (48, 48),
    "linear_2.bias": (48,),
}


def torchrun(args: list) -> list:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nproc_per_node", "2",
        "-m", "llavakit", "train", *args,
    ]  # fmt: skip


def stage1_args(parts, out: Path) -> list:
    return [
        "--model_name_or_path", parts.lm,
        "--vision_tower", parts.tower,
        "--version", "plain",
        "--tune_mm_mlp_adapter", "True",
        "--data_path", parts.caption,
        "--image_folder", parts.data,
        "--image_aspect_ratio", "pad",
        "--output_dir", out,
        "--max_steps", STEPS,
        "--per_device_train_batch_size", 2,
        "--learning_rate", "1e-3",
        "--logging_steps", 1,
        "--save_steps", 2,
        "--report_to", "none",
        "--model_max_length", 256,
        "--seed", 3,
        "--ddp_backend", "gloo",
    ]  # fmt: skip


def check_stage1(out: Path) -> dict[str, torch.Tensor]:
    record = json.loads((out / "llavakit_train.json").read_text())
    assert record["stage"] == "pretrain"
    projector = load_file(out / "mm_projector.safetensors")
    assert {k: tuple(v.shape) for k, v in projector.items()} == PROJECTOR_SHAPES
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in projector.values())
    for step in (2, STEPS):
        ck = out / f"checkpoint-{step}"
        for name in ("trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"):
            assert (ck / name).is_file(), f"{ck} lacks {name}"
        trainable = load_file(ck / "trainable.safetensors")
        shapes = {
            k.removeprefix("multi_modal_projector."): tuple(v.shape) for k, v in trainable.items()
        }
        assert shapes == PROJECTOR_SHAPES
    final = load_file(out / f"checkpoint-{STEPS}" / "trainable.safetensors")
    for k, v in projector.items():
        assert torch.equal(final["multi_modal_projector." + k], v)
    # one row per step: only the main process logs
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
    assert rows[-1]["epoch"] == pytest.approx(1.0)  # the two ranks split the data
    assert not (out / ".staging").exists()
    return projector


@pytest.fixture(scope="module")
def ddp_run(tiny_parts, runner, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    runner.run(
        torchrun([*stage1_args(tiny_parts, out), "--use_cpu", "True"]), out.with_suffix(".log")
    )
    return out


def test_ddp_stage1(ddp_run):
    check_stage1(ddp_run)


@pytest.fixture(scope="session")
def deepspeed_cpu_ops(runner, tmp_path_factory) -> None:
    """DeepSpeed's CPU communication op is compiled on first use (once per machine, cached in
    ~/.cache/torch_extensions); do it here, with its own time limit, so a slow first build does
    not eat the training runs' time."""
    code = (
        "from deepspeed.accelerator import get_accelerator\n"
        "assert get_accelerator().device_name() == 'cpu', get_accelerator().device_name()\n"
        "try:\n"
        "    from deepspeed.comm.torch import build_shm_op\n"
        "except ImportError:  # another DeepSpeed version: the first run builds what it needs\n"
        "    build_shm_op = lambda: None\n"
        "build_shm_op()\n"
    )
    runner.run([sys.executable, "-c", code], tmp_path_factory.mktemp("ds") / "ops.log", 900)


@needs_deepspeed
def test_deepspeed_zero3_stage1_then_stage2(
    tiny_parts, runner, ddp_run, deepspeed_cpu_ops, tmp_path
):
    out = tmp_path / "zero3"
    args = [*stage1_args(tiny_parts, out), "--deepspeed", RECIPES / "zero3.json"]
    runner.run(torchrun(args), tmp_path / "zero3.log", timeout=240)
    projector = check_stage1(out)

    # it really ran ZeRO-3 on two ranks: the engine's own module state is partitioned
    states = out / f"checkpoint-{STEPS}" / f"global_step{STEPS}"
    shards = sorted(p.name for p in states.glob("zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 2, shards
    engine = torch.load(
        states / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )
    assert engine["ds_config"]["zero_optimization"]["stage"] == 3
    assert engine["dp_world_size"] == 2
    assert engine["module"]["multi_modal_projector.linear_2.weight"].numel() == 0

    # same seed, same data, same global batch: ZeRO-3 and DDP train the same projector
    ddp = load_file(ddp_run / "mm_projector.safetensors")
    for k, v in projector.items():
        torch.testing.assert_close(v, ddp[k], rtol=1e-5, atol=1e-6)

    # the gathered projector loads into a (single-process) stage 2 with the projector frozen
    stage2 = tmp_path / "stage2"
    runner.train(
        [
            "--model_name_or_path", tiny_parts.lm,
            "--vision_tower", tiny_parts.tower,
            "--pretrain_mm_mlp_adapter", out / "mm_projector.safetensors",
            "--mm_tunable_parts", "mm_language_model",
            "--version", "chatml_nosystem",
            "--image_token_style", "token",
            "--data_path", tiny_parts.qa,
            "--image_folder", tiny_parts.data,
            "--image_aspect_ratio", "pad",
            "--output_dir", stage2,
            "--max_steps", 2,
            "--per_device_train_batch_size", 2,
            "--learning_rate", "1e-3",
            "--save_strategy", "no",
            "--report_to", "none",
            "--model_max_length", 256,
        ],
        tmp_path / "stage2.log",
    )  # fmt: skip
    weights = load_file(stage2 / "model" / "model.safetensors")
    loaded = {
        k.split("multi_modal_projector.")[1]: v
        for k, v in weights.items()
        if "multi_modal_projector." in k
    }
    assert sorted(loaded) == sorted(projector)
    for k, v in projector.items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_recipes(name):
    """The shipped configs are valid JSON with "auto" batch sizes / precision for the Trainer."""
    config = json.loads((RECIPES / f"{name}.json").read_text())
    assert config["train_micro_batch_size_per_gpu"] == "auto"
    assert config["gradient_accumulation_steps"] == "auto"
    assert config["bf16"]["enabled"] == "auto"
    stage = config["zero_optimization"]["stage"]
    assert stage == (2 if name == "zero2" else 3)
    if name == "zero3_offload":
        zero = config["zero_optimization"]
        assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"


def test_fsdp_without_accelerators_is_refused_not_silently_ddp(tiny_parts, runner, tmp_path):
    """accelerate enables FSDP only on accelerators; on CPU the run must say so, not quietly
    train with DDP (what the Trainer would otherwise do)."""
    out = tmp_path / "fsdp"
    args = [
        *stage1_args(tiny_parts, out), "--use_cpu", "True",
        "--fsdp", "full_shard auto_wrap",
        "--fsdp_config", json.dumps({"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}),
    ]  # fmt: skip
    log = tmp_path / "fsdp.log"
    with pytest.raises(pytest.fail.Exception):
        runner.run(torchrun(args), log, timeout=240)
    text = log.read_text()
    assert "accelerate did not enable FSDP" in text and "zero3.json" in text
    assert not (out / "mm_projector.safetensors").exists()


def test_gradient_checkpointing_trains_the_same_weights(tiny_parts, runner, tmp_path):
    """--gradient_checkpointing recomputes activations in backward: same weights, less memory."""

    def run(out: Path, *extra) -> dict[str, torch.Tensor]:
        runner.train(
            [
                "--model_name_or_path", tiny_parts.lm,
                "--vision_tower", tiny_parts.tower,
                "--mm_tunable_parts", "mm_mlp_adapter,mm_language_model",
                "--version", "chatml_nosystem",
                "--image_token_style", "token",
                "--data_path", tiny_parts.qa,
                "--image_folder", tiny_parts.data,
                "--image_aspect_ratio", "pad",
                "--output_dir", out,
                "--max_steps", 2,
                "--per_device_train_batch_size", 2,
                "--learning_rate", "1e-3",
                "--save_strategy", "no",
                "--report_to", "none",
                "--model_max_length", 256,
                "--seed", 5,
                *extra,
            ],
            out.with_suffix(".log"),
        )  # fmt: skip
        return load_file(out / "model" / "model.safetensors")

    plain = run(tmp_path / "plain")
    checkpointed = run(tmp_path / "gc", "--gradient_checkpointing", "True")
    log = (tmp_path / "gc.log").read_text()
    assert "gradient checkpointing: on" in log
    changed = 0
    for k, v in plain.items():
        torch.testing.assert_close(checkpointed[k], v, rtol=1e-4, atol=1e-5)
        changed += "layers" in k
    assert changed
