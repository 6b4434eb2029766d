"""transformers' Trainer, adapted to LLaVA: modality-grouped batches, per-part learning rates,
checkpoints holding only what trains (written atomically), metrics as JSONL + a PNG curve."""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import nullcontext

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback

from llavakit.errors import CheckpointError

TRAINABLE_FILE = "trainable.safetensors"


def gathered(params):
    """A context in which ZeRO-3-partitioned parameters hold their full data on every rank
    (a collective: every rank must enter it); a no-op for ordinary parameters."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def full_state(named_params) -> dict[str, torch.Tensor]:
    """{name: a full CPU copy} of the given (name, parameter) pairs, gathered under ZeRO-3."""
    named = list(named_params)
    with gathered([p for _, p in named]):
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in named}


def trainable_state(model) -> dict[str, torch.Tensor]:
    return full_state((n, p) for n, p in model.named_parameters() if p.requires_grad)


class ModalityGroupedSampler(Sampler[int]):
    """Batches hold one modality (image or text-only), in shuffled order (group_by_modality_length).

    ``lengths`` follow the original: positive for image samples, negative for text-only. With
    ``megabatches`` > 1 (``--group_by_length`` too), each run of that many shuffled batches is
    sorted by length before it is cut into batches, so a batch pads to a similar length (as
    transformers' length-grouped sampler); the batches are still visited in random order.
    """

    def __init__(
        self, lengths: list[int], batch_size: int, seed: int, megabatches: int = 1
    ) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.megabatches = megabatches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = []
        for want_image in (True, False):
            idx = [i for i, n in enumerate(self.lengths) if (n > 0) == want_image]
            order = [idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()]
            span = self.batch_size * self.megabatches
            if self.megabatches > 1:
                order = [
                    i
                    for k in range(0, len(order), span)
                    for i in sorted(order[k : k + span], key=lambda i: -abs(self.lengths[i]))
                ]
            batches += [
                order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size)
            ]
        for b in torch.randperm(len(batches), generator=gen).tolist():
            yield from batches[b]


class LlavaTrainer(Trainer):
    """Trainer for ``LlavaForCausalLM`` (also works with a peft-wrapped language model)."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset or self.train_dataset
        if self.args.group_by_modality_length and hasattr(dataset, "modality_lengths"):
            batch = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
            return ModalityGroupedSampler(
                dataset.modality_lengths,
                batch * self.args.world_size,
                self.args.seed,
                megabatches=50 if self.args.group_by_length else 1,
            )
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None):
        """Parameter groups with their own learning rates for the projector and the vision tower."""
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        lrs = {
            "multi_modal_projector.": self.args.mm_projector_lr,
            "vision_tower.": self.args.mm_vision_tower_lr,
        }
        groups: dict[tuple[float, float], list] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            lr = next(
                (v for k, v in lrs.items() if name.startswith(k) and v is not None),
                self.args.learning_rate,
            )
            wd = self.args.weight_decay if name in decay else 0.0
            groups.setdefault((lr, wd), []).append(param)
        # The Trainer logs the first group's learning rate: put the run's own --learning_rate first.
        order = sorted(groups, key=lambda key: key[0] != self.args.learning_rate)
        param_groups = [{"params": groups[k], "lr": k[0], "weight_decay": k[1]} for k in order]
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(param_groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    # -- checkpoints: only trainable weights, written to a staging dir then renamed -------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.is_deepspeed_enabled:
            # Trainer would gather the whole model (ZeRO-3); gather only what trains, on every
            # rank (a collective), and let the main process write it
            state = trainable_state(self.accelerator.unwrap_model(self.model))
            self._save(output_dir, state_dict=state)
            return
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Only the main process writes: under DeepSpeed the trainables save_model gathered,
        else the trainable parameters (a full state_dict passed by other paths is not wanted)."""
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        if state_dict is None or not self.is_deepspeed_enabled:
            state_dict = trainable_state(self.accelerator.unwrap_model(self.model))
        save_file(state_dict, os.path.join(output_dir, TRAINABLE_FILE), metadata={"format": "pt"})
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.model
        path = os.path.join(resume_from_checkpoint, TRAINABLE_FILE)
        if not os.path.isfile(path):
            raise CheckpointError(
                f"{resume_from_checkpoint}: no {TRAINABLE_FILE}; not a llavakit training checkpoint"
            )
        state = load_file(path)
        params = dict(model.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        if set(state) != trainable:
            raise CheckpointError(
                f"{resume_from_checkpoint}: checkpoint trains {len(state)} tensors, this run {len(trainable)}; "
                "resume with the same stage flags"
            )
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def _save_checkpoint(self, model, trial) -> None:
        """Write checkpoint-N under a staging name and rename it when complete, so a kill never
        leaves a half-written checkpoint that resume would pick up."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"checkpoint-{self.state.global_step}"
        staging_root = os.path.join(run_dir, ".staging")
        if self.args.should_save:  # leftovers of a killed run must not end up in this one
            shutil.rmtree(os.path.join(staging_root, name), ignore_errors=True)
        self.accelerator.wait_for_everyone()
        real = self._get_output_dir
        self._get_output_dir = lambda trial=None: staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._get_output_dir = real
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging_root, name), final)
            shutil.rmtree(staging_root, ignore_errors=True)
            self._rotate(run_dir)
        self.accelerator.wait_for_everyone()

    def _rotate(self, run_dir: str) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        found = sorted(
            (d for d in os.listdir(run_dir) if d.startswith("checkpoint-") and d[11:].isdigit()),
            key=lambda d: int(d[11:]),
        )
        for old in found[:-limit]:
            shutil.rmtree(os.path.join(run_dir, old), ignore_errors=True)


class MetricsCallback(TrainerCallback):
    """Append every log to metrics.jsonl and draw loss / learning-rate curves to training_curves.png."""

    def __init__(self, output_dir: str) -> None:
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.png = os.path.join(output_dir, "training_curves.png")

    def on_train_begin(self, args, state, control, **kwargs):
        """On resume, drop the rows the killed run logged after its checkpoint (they are logged
        again), so metrics.jsonl stays one row per step. Also says whether gradient
        checkpointing really is on (a flag the model ignored would otherwise go unnoticed)."""
        model = kwargs.get("model")
        if args.gradient_checkpointing and state.is_world_process_zero and model is not None:
            on = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
            print(f"llavakit: gradient checkpointing: {'on' if on else 'OFF (not supported)'}")
        if not state.is_world_process_zero or not state.global_step:
            return
        if not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        keep = [line for line in lines if json.loads(line).get("step", 0) <= state.global_step]
        if len(keep) != len(lines):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_metrics(self.path, self.png)


def plot_metrics(jsonl: str, png: str) -> str | None:
    """Loss and learning rate against step, from a metrics.jsonl; returns the PNG path."""
    if not os.path.isfile(jsonl):
        return None
    rows = [json.loads(line) for line in open(jsonl) if line.strip()]
    rows = [r for r in rows if "loss" in r and math.isfinite(r["loss"])]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [r["step"] for r in rows]
    ax1.plot(steps, [r["loss"] for r in rows], color="tab:blue")
    ax1.set(xlabel="step", ylabel="training loss", title="loss")
    ax1.grid(alpha=0.3)
    if any("learning_rate" in r for r in rows):
        ax2.plot(steps, [r.get("learning_rate", float("nan")) for r in rows], color="tab:orange")
    ax2.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)
    return png
