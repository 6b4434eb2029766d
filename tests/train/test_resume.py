"""Exact resume: a run killed with SIGKILL mid-checkpoint and resumed ends bit-identical to an
uninterrupted run, and a ``checkpoint-N`` directory is never seen half-written."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

CHECKPOINT_FILES = (
    "trainable.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
)
MAX_STEPS = 24  # 16 samples / batch 2 = 8 steps an epoch: the runs cross two epoch boundaries
SAVE_STEPS = 4


def checkpoints(run: Path) -> dict[int, Path]:
    found = {}
    for d in run.glob("checkpoint-*"):
        if d.name[11:].isdigit():
            found[int(d.name[11:])] = d
    return dict(sorted(found.items()))


def assert_complete(ck: Path) -> None:
    # listdir can race a rotation; a rename is atomic, so a listed checkpoint must be complete
    try:
        names = set(os.listdir(ck))
    except FileNotFoundError:
        return
    missing = [f for f in CHECKPOINT_FILES if f not in names]
    assert not missing, f"{ck} exists but lacks {missing} (has {sorted(names)})"


def common_args(parts, out: Path) -> list[str]:
    return [
        "--model_name_or_path", parts.lm,
        "--vision_tower", parts.tower,
        "--version", "chatml_nosystem",
        "--image_token_style", "token",
        "--image_folder", parts.data,
        "--image_aspect_ratio", "pad",
        "--output_dir", out,
        "--max_steps", MAX_STEPS,
        "--per_device_train_batch_size", 2,
        "--learning_rate", "1e-3",
        "--lr_scheduler_type", "cosine",
        "--warmup_steps", 2,
        "--weight_decay", "0.01",
        "--logging_steps", 1,
        "--save_steps", SAVE_STEPS,
        "--report_to", "none",
        "--model_max_length", 256,
        "--seed", 7,
        "--dataloader_num_workers", 0,
        "--use_cpu", "True",
    ]  # fmt: skip


def run_and_kill(
    runner, args: list, out: Path, after: int, log: Path, timeout: float = 180
) -> None:
    """Start a run and SIGKILL it once ``checkpoint-{after}`` exists and the next checkpoint is
    being staged (found by polling the output directory, no hook in the trainer), checking all
    the while that every visible checkpoint is complete."""
    with open(log, "w") as f:
        proc = runner.popen_train(args, f)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"the run to be killed timed out after {timeout}s\n{runner.tail(log)}"
                    )
                seen = checkpoints(out)
                for ck in seen.values():
                    assert_complete(ck)
                if any(n >= after for n in seen) and (
                    (out / ".staging").exists() or any(n > after for n in seen)
                ):
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.002)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (
        f"the run ended (exit code {proc.returncode}) before it could be killed\n{runner.tail(log)}"
    )
    assert not (out / "llavakit_train.json").exists()


def resume_and_compare(
    runner, args: list, out: Path, ref: Path, resume_arg: str, tmp_path: Path
) -> None:
    """After a kill: every checkpoint is complete; resuming finishes the run; every later
    checkpoint and the logged losses equal the uninterrupted run's bit for bit."""
    survived = checkpoints(out)
    assert survived, "the killed run left no checkpoint"
    for ck in survived.values():
        assert_complete(ck)
    last = max(survived)
    assert last < MAX_STEPS
    # what a kill mid-write leaves behind must be replaced, not merged into the next checkpoint
    stale = out / ".staging" / f"checkpoint-{last + SAVE_STEPS}"
    stale.mkdir(parents=True, exist_ok=True)
    (stale / "stale.bin").write_bytes(b"half-written")
    resume = str(survived[last]) if resume_arg == "path" else "True"
    runner.train([*args, "--resume_from_checkpoint", resume], tmp_path / "resume.log")
    assert not (out / ".staging").exists()
    ref_cks, cks = checkpoints(ref), checkpoints(out)
    assert list(cks) == list(ref_cks) == list(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))
    for step in cks:
        assert_complete(cks[step])
        assert not (cks[step] / "stale.bin").exists()
        assert_tensors_equal(
            load_file(cks[step] / "trainable.safetensors"),
            load_file(ref_cks[step] / "trainable.safetensors"),
            f"checkpoint-{step}",
        )
    # the logged losses after the resume point match too; no step is logged twice
    assert losses(out, after=last) == losses(ref, after=last)
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps == list(range(1, MAX_STEPS + 1))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path, after: int) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run) if "loss" in r and r["step"] > after}


def assert_tensors_equal(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: different tensor names"
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ after resume, e.g. {differ[:3]}"


def test_full_finetune_resumes_exactly(tiny_parts, runner, tmp_path):
    """Projector + LM trained; killed while writing the checkpoint after checkpoint-8 (the first
    epoch boundary); resumed from the explicit path of the last complete checkpoint."""

    def args(out):
        return [
            *common_args(tiny_parts, out),
            "--data_path", tiny_parts.qa,
            "--mm_tunable_parts", "mm_mlp_adapter,mm_language_model",
        ]  # fmt: skip

    ref, out = tmp_path / "ref", tmp_path / "run"
    runner.train(args(ref), tmp_path / "ref.log")
    run_and_kill(runner, args(out), out, after=2 * SAVE_STEPS, log=tmp_path / "killed.log")
    resume_and_compare(runner, args(out), out, ref, "path", tmp_path)
    assert_tensors_equal(
        load_file(out / "model" / "model.safetensors"),
        load_file(ref / "model" / "model.safetensors"),
        "final model",
    )


def test_lora_resumes_exactly(tiny_parts, runner, tmp_path):
    """LoRA (with dropout, so the RNG state matters) + projector + vision tower with their own
    learning rate, modality-grouped batches over image and text-only samples; killed while
    writing the checkpoint after checkpoint-12 (mid second epoch); ``True`` resumes from the
    last complete checkpoint."""
    records = json.loads(tiny_parts.qa.read_text())
    for i in range(4):
        records.insert(
            3 * i + 1,
            {
                "id": f"text_{i}",
                "conversations": [
                    {"from": "human", "value": f"How many sides does shape {i} have?"},
                    {"from": "gpt", "value": "three"},
                ],
            },
        )
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(records[:16]))

    def args(out):
        return [
            *common_args(tiny_parts, out),
            "--data_path", mixed,
            "--mm_tunable_parts", "mm_mlp_adapter,mm_language_model,mm_vision_tower",
            "--lora_enable", "True",
            "--lora_r", 4,
            "--lora_alpha", 8,
            "--lora_dropout", "0.1",
            "--group_by_modality_length", "True",
            "--mm_projector_lr", "2e-3",
            "--mm_vision_tower_lr", "5e-4",
        ]  # fmt: skip

    ref, out = tmp_path / "ref", tmp_path / "run"
    runner.train(args(ref), tmp_path / "ref.log")
    run_and_kill(runner, args(out), out, after=3 * SAVE_STEPS, log=tmp_path / "killed.log")
    resume_and_compare(runner, args(out), out, ref, "True", tmp_path)
    assert_tensors_equal(
        load_file(out / "non_lora_trainables.safetensors"),
        load_file(ref / "non_lora_trainables.safetensors"),
        "non_lora_trainables",
    )
    assert_tensors_equal(
        load_file(out / "adapter" / "adapter_model.safetensors"),
        load_file(ref / "adapter" / "adapter_model.safetensors"),
        "adapter",
    )
