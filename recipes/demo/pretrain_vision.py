"""Pretrain the demo model's vision tower (a transformers CLIPVisionModel) without the LM.

LLaVA assumes a pretrained, frozen-in-stage-1 vision encoder (CLIP). No CLIP weights install
offline, so this recipe trains a small ViT first, supervised on what the demo data asks about:
for synthetic scenes, the (colour, shape, size) in each of the five scene cells, read from the
patch tokens of the layer LLaVA uses (-2), and for Fashion-MNIST the item's class. Reading
the targets from the patch tokens (not a CLS head) is what makes those tokens carry the
information the LM will need. Cheap: no LM in the loop.

    .venv/bin/python recipes/demo/pretrain_vision.py --out work/demo/tower --steps 3000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from llavakit.data import fashion, synthetic
from llavakit.processing.image import ImagePreprocessor

SIZE, PATCH = 56, 14
N_CELL_CLASSES = 1 + len(synthetic.COLOURS) * len(synthetic.SHAPES)


def scene_targets(scene: synthetic.Scene) -> tuple[list[int], list[int]]:
    """Per cell (POSITIONS order): 0 = empty or 1 + colour * n_shapes + shape; size 0/1/2."""
    kind, size = [0] * len(synthetic.POSITIONS), [0] * len(synthetic.POSITIONS)
    for obj in scene.objects:
        cell = synthetic.POSITIONS.index(obj.position)
        kind[cell] = (
            1
            + synthetic.COLOURS.index(obj.colour) * len(synthetic.SHAPES)
            + synthetic.SHAPES.index(obj.shape)
        )
        size[cell] = 1 + synthetic.SIZES.index(obj.size)
    return kind, size


def make_scenes(n: int, seed: int, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images, kinds, sizes = [], [], []
    for _ in range(n):
        scene = synthetic.random_scene(rng, split=split)
        images.append(np.asarray(synthetic.render_scene(scene, SIZE)))
        k, s = scene_targets(scene)
        kinds.append(k)
        sizes.append(s)
    return np.stack(images), np.array(kinds), np.array(sizes)


def fashion_images(split: str) -> tuple[np.ndarray, np.ndarray]:
    raw, labels = fashion.load_split(split)
    return np.stack([np.asarray(fashion.to_image(a, SIZE)) for a in raw]), labels.astype(np.int64)


class Normalizer:
    """uint8 NHWC batches -> normalised float NCHW, exactly like the LLaVA processor."""

    def __init__(self) -> None:
        prep = ImagePreprocessor(size=SIZE, crop_size=SIZE, aspect="square")
        self.prep = prep

    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        return torch.stack([self.prep.normalize(img) for img in batch])


def augment_fashion(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal flips and shifts of up to 4 px (the grey background is black)."""
    out = batch.copy()
    flip = rng.random(len(out)) < 0.5
    out[flip] = out[flip, :, ::-1]
    padded = np.pad(out, ((0, 0), (4, 4), (4, 4), (0, 0)))
    dy, dx = rng.integers(0, 9, 2)
    return padded[:, dy : dy + SIZE, dx : dx + SIZE]


class Heads(nn.Module):
    def __init__(self, dim: int, tokens: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        cells = len(synthetic.POSITIONS)
        self.cells = nn.Linear(dim * tokens, cells * (N_CELL_CLASSES + 3))
        self.fashion = nn.Linear(dim * tokens, 10)

    def forward(self, patches: torch.Tensor, task: str) -> torch.Tensor:
        flat = self.norm(patches).flatten(1)
        return self.cells(flat) if task == "scene" else self.fashion(flat)


def patch_tokens(tower: CLIPVisionModel, pixels: torch.Tensor) -> torch.Tensor:
    return tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]


def scene_loss(logits: torch.Tensor, kinds: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    cells = len(synthetic.POSITIONS)
    logits = logits.view(-1, cells, N_CELL_CLASSES + 3)
    return nn.functional.cross_entropy(
        logits[..., :N_CELL_CLASSES].flatten(0, 1), kinds.flatten()
    ) + 0.5 * nn.functional.cross_entropy(
        logits[..., N_CELL_CLASSES:].flatten(0, 1), sizes.flatten()
    )


@torch.no_grad()
def evaluate(tower, heads, norm, scenes, fashion_test) -> dict[str, float]:
    tower.eval()
    images, kinds, _ = scenes
    correct_scene = 0
    for i in range(0, len(images), 256):
        logits = heads(patch_tokens(tower, norm(images[i : i + 256])), "scene")
        pred = logits.view(-1, len(synthetic.POSITIONS), N_CELL_CLASSES + 3)[
            ..., :N_CELL_CLASSES
        ].argmax(-1)
        correct_scene += (pred == torch.from_numpy(kinds[i : i + 256])).all(-1).sum().item()
    f_images, f_labels = fashion_test
    correct_fashion = 0
    for i in range(0, len(f_images), 256):
        pred = heads(patch_tokens(tower, norm(f_images[i : i + 256])), "fashion").argmax(-1)
        correct_fashion += (pred == torch.from_numpy(f_labels[i : i + 256])).sum().item()
    tower.train()
    return {
        "scene_all_cells": correct_scene / len(images),
        "fashion_test": correct_fashion / len(f_images),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32, help="scene images per step")
    parser.add_argument(
        "--fashion-batch", type=int, default=96, help="Fashion-MNIST images per step"
    )
    parser.add_argument("--scenes", type=int, default=20000)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bf16", action="store_true", help="autocast to bfloat16 (slower for tiny towers)"
    )
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # oversubscribed cores make small models 4x slower
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    start = time.time()
    scenes = make_scenes(args.scenes, args.seed, "train")
    scenes_test = make_scenes(2000, args.seed + 1, "test")
    f_train, f_test = fashion_images("train"), fashion_images("test")
    print(f"data ready in {time.time() - start:.0f}s", flush=True)

    config = CLIPVisionConfig(
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64 * 2 or 2,
        image_size=SIZE,
        patch_size=PATCH,
    )
    tower = CLIPVisionModel(config)
    tokens = (SIZE // PATCH) ** 2
    heads = Heads(args.hidden, tokens)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1
    )
    norm = Normalizer()
    log = []
    for step in range(1, args.steps + 1):
        si = rng.integers(0, len(scenes[0]), args.batch)
        fi = rng.integers(0, len(f_train[0]), args.fashion_batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            s_logits = heads(patch_tokens(tower, norm(scenes[0][si])), "scene")
            f_logits = heads(
                patch_tokens(tower, norm(augment_fashion(f_train[0][fi], rng))), "fashion"
            )
        loss = scene_loss(
            s_logits.float(), torch.from_numpy(scenes[1][si]), torch.from_numpy(scenes[2][si])
        )
        loss = loss + nn.functional.cross_entropy(
            f_logits.float(), torch.from_numpy(f_train[1][fi])
        )
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps:
            row = {
                "step": step,
                "loss": round(loss.item(), 4),
                "elapsed_s": round(time.time() - start),
            }
            if step % args.eval_every == 0 or step == args.steps:
                row |= evaluate(tower, heads, norm, scenes_test, f_test)
            log.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tower.save_pretrained(out)
    prep = {
        "crop_size": {"height": SIZE, "width": SIZE},
        "size": {"shortest_edge": SIZE},
        "image_mean": list(norm.prep.mean),
        "image_std": list(norm.prep.std),
        "image_processor_type": "CLIPImageProcessor",
    }
    (out / "preprocessor_config.json").write_text(json.dumps(prep, indent=2))
    (out / "pretrain_log.jsonl").write_text("\n".join(json.dumps(r) for r in log) + "\n")
    print(f"saved {out} after {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
