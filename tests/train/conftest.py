"""Training fixtures: a tiny LLM directory, a tiny CLIP tower directory and a small synthetic
data set (built once per session, offline, a few seconds), plus a helper running ``llavakit
train`` in a subprocess with a single thread on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TinyParts:
    lm: Path  # LlamaForCausalLM + tokenizer
    tower: Path  # CLIPVisionModel + preprocessor_config.json
    data: Path  # image folder (holds images/)
    caption: Path  # stage-1 data: bare "<image>" -> caption
    qa: Path  # stage-2 data: question -> short answer


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory) -> TinyParts:
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM

    from llavakit.data import synthetic
    from llavakit.testing import tiny_text_config, tiny_tokenizer

    root = tmp_path_factory.mktemp("train_parts")
    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_text_config(vocab_size=384, max_positions=512))
    lm.save_pretrained(root / "lm")
    tiny_tokenizer().save_pretrained(root / "lm")
    tower = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=56,
            patch_size=14,
        )
    )
    tower.save_pretrained(root / "tower")
    (root / "tower" / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_size": {"height": 56, "width": 56},
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            }
        )
    )
    data = root / "data"
    caption = synthetic.write_dataset(data, 16, 0, "train", "caption", plain=True)
    qa = synthetic.write_dataset(data, 16, 1, "train", "qa")
    return TinyParts(root / "lm", root / "tower", data, caption, qa)


class Runner:
    """Subprocess runs of ``python -m llavakit train`` (or any command) with one thread, CPU
    only, offline; output goes to a log whose tail is shown when a run fails or times out."""

    @staticmethod
    def env() -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            CUDA_VISIBLE_DEVICES="",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_VERBOSITY="error",
            TOKENIZERS_PARALLELISM="false",
            PYTHONUNBUFFERED="1",
            WANDB_DISABLED="true",
        )
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        return env

    @staticmethod
    def train_cmd(args: list) -> list[str]:
        return [sys.executable, "-m", "llavakit", "train", *map(str, args)]

    @staticmethod
    def tail(log: Path, n: int = 60) -> str:
        """The last ``n`` lines, after any earlier error lines (torchrun ends with a summary)."""
        lines = Path(log).read_text(errors="replace").splitlines()
        errors = [
            line
            for line in lines[:-n]
            if "Error" in line or "error:" in line or "Exception" in line
        ]
        head = [f"--- error lines of {log} ---", *errors[:20]] if errors else []
        return "\n".join([*head, f"--- last {n} lines of {log} ---", *lines[-n:]])

    def run(self, cmd: list, log: Path, timeout: float = 180) -> None:
        """Run ``cmd`` to completion; on failure or timeout (the whole process group is killed:
        torchrun has workers) fail with the tail of its output."""
        cmd = [str(c) for c in cmd]
        with open(log, "w") as f:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=self.env(),
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop(proc)
                pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{self.tail(log)}")
            finally:
                stop(proc)  # interrupted
        if proc.returncode != 0:
            pytest.fail(f"exit code {proc.returncode}: {' '.join(cmd)}\n{self.tail(log)}")

    def train(self, args: list, log: Path, timeout: float = 180) -> None:
        self.run(self.train_cmd(args), log, timeout)

    def popen_train(self, args: list, log_file) -> subprocess.Popen:
        return subprocess.Popen(
            self.train_cmd(args),
            cwd=ROOT,
            env=self.env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def stop(proc: subprocess.Popen) -> None:
    """End a run started in its own session: SIGTERM first (torchrun then stops its workers,
    which live in sessions of their own), SIGKILL to the group if that is not enough."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def runner() -> Runner:
    return Runner()
