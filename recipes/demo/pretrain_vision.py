"""Pretrain the demo model's vision tower (a transformers CLIPVisionModel) without the LM.

LLaVA assumes a pretrained, frozen-in-stage-1 vision encoder (CLIP). No CLIP weights install
offline, so this recipe trains a small ViT first, supervised on what the demo data asks about,
token by token on the layer LLaVA reads (-2): at 84 px with 28 px patches the 3x3 tokens are
exactly the scene's 3x3 cells, and each token learns what its cell holds (colour and shape,
size), which cell it is and how many objects the scene has; on Fashion-MNIST every token
learns the item's class. The projector maps tokens one at a time, so only information that
sits in each token (not spread over all of them) reaches the LM usefully. Cheap: no LM.

    .venv/bin/python recipes/demo/pretrain_vision.py --out work/demo/tower --steps 4500
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

N_CELL_CLASSES = 1 + len(synthetic.COLOURS) * len(synthetic.SHAPES)
MAX_COUNT = synthetic.MAX_OBJECTS + 1
# Per-token scene head: what is in this token's cell (kind, size), which cell it is, how many
# objects the scene has. Every token learns its own cell, so the projector (applied token by
# token) hands the LM local, position-aware features; every token also learns the item class
# of a Fashion-MNIST picture, so any of them can answer "what is this?".
SCENE_OUT = N_CELL_CLASSES + 3 + 9 + MAX_COUNT
_GRID = {
    name: (round(y / synthetic._CELL - 0.5), round(x / synthetic._CELL - 0.5))
    for name, (x, y) in synthetic._CENTRES.items()
}  # position -> (row, col) of 3x3


def token_cells(grid: int) -> np.ndarray:
    """For a grid x grid patch layout, the 3x3 scene cell (row * 3 + col) of each token."""
    centres = (np.arange(grid) + 0.5) / grid
    rows, cols = np.meshgrid(np.floor(centres * 3), np.floor(centres * 3), indexing="ij")
    return (rows * 3 + cols).astype(np.int64).ravel()


def scene_targets(scene: synthetic.Scene, cells: np.ndarray) -> np.ndarray:
    """(tokens, 4): kind (0 = empty, else 1 + colour * n_shapes + shape), size, cell, count."""
    kind, size = np.zeros(9, np.int64), np.zeros(9, np.int64)
    for obj in scene.objects:
        row, col = _GRID[obj.position]
        kind[row * 3 + col] = (
            1
            + synthetic.COLOURS.index(obj.colour) * len(synthetic.SHAPES)
            + synthetic.SHAPES.index(obj.shape)
        )
        size[row * 3 + col] = 1 + synthetic.SIZES.index(obj.size)
    count = np.full(len(cells), len(scene.objects))
    return np.stack([kind[cells], size[cells], cells, count], axis=1)


def random_scenes(n: int, seed: int, split: str, size: int):
    """``n`` random scenes of ``split`` and their pictures (uint8 NHWC)."""
    rng = np.random.default_rng(seed)
    scenes = [synthetic.random_scene(rng, split=split) for _ in range(n)]
    return scenes, np.stack([np.asarray(synthetic.render_scene(s, size)) for s in scenes])


def make_scenes(n: int, seed: int, split: str, size: int, cells: np.ndarray):
    scenes, images = random_scenes(n, seed, split, size)
    return images, np.stack([scene_targets(scene, cells) for scene in scenes])


def fashion_images(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    raw, labels = fashion.load_split(split)
    return np.stack([np.asarray(fashion.to_image(a, size)) for a in raw]), labels.astype(np.int64)


class Normalizer:
    """uint8 NHWC batches -> normalised float NCHW, exactly like the LLaVA processor."""

    def __init__(self, size: int) -> None:
        self.prep = ImagePreprocessor(size=size, crop_size=size, aspect="square")

    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        return torch.stack([self.prep.normalize(img) for img in batch])


def augment_fashion(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal flips and shifts of up to 1/14 of the side (the background is black)."""
    out = batch.copy()
    flip = rng.random(len(out)) < 0.5
    out[flip] = out[flip, :, ::-1]
    side = out.shape[1]
    pad = max(1, side // 14)
    padded = np.pad(out, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy, dx = rng.integers(0, 2 * pad + 1, 2)
    return padded[:, dy : dy + side, dx : dx + side]


class Heads(nn.Module):
    """Token-wise heads: each patch token is classified on its own."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.scene = nn.Linear(dim, SCENE_OUT)
        self.fashion = nn.Linear(dim, 10)

    def forward(self, patches: torch.Tensor, task: str) -> torch.Tensor:
        x = self.norm(patches)
        return self.scene(x) if task == "scene" else self.fashion(x)


def patch_tokens(tower: CLIPVisionModel, pixels: torch.Tensor) -> torch.Tensor:
    return tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]


def scene_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    k, c = N_CELL_CLASSES, N_CELL_CLASSES + 3
    ce = nn.functional.cross_entropy
    return (
        ce(logits[..., :k].flatten(0, 1), targets[..., 0].flatten())
        + 0.5 * ce(logits[..., k:c].flatten(0, 1), targets[..., 1].flatten())
        + 0.2 * ce(logits[..., c : c + 9].flatten(0, 1), targets[..., 2].flatten())
        + 0.5 * ce(logits[..., c + 9 :].flatten(0, 1), targets[..., 3].flatten())
    )


def fashion_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    tokens = logits.shape[1]
    return nn.functional.cross_entropy(logits.flatten(0, 1), labels.repeat_interleave(tokens))


@torch.no_grad()
def evaluate(tower, heads, norm, scenes, fashion_test) -> dict[str, float]:
    """Scenes: every token's kind right (images all right); Fashion: mean token logits."""
    tower.eval()
    images, targets = scenes
    correct_scene, token_acc = 0, 0.0
    for i in range(0, len(images), 256):
        logits = heads(patch_tokens(tower, norm(images[i : i + 256])), "scene")
        pred = logits[..., :N_CELL_CLASSES].argmax(-1)
        ok = pred == torch.from_numpy(targets[i : i + 256, :, 0])
        correct_scene += ok.all(-1).sum().item()
        token_acc += ok.float().mean(-1).sum().item()
    f_images, f_labels = fashion_test
    correct_fashion, token_fashion = 0, 0.0
    for i in range(0, len(f_images), 256):
        logits = heads(patch_tokens(tower, norm(f_images[i : i + 256])), "fashion")
        labels = torch.from_numpy(f_labels[i : i + 256])
        correct_fashion += (logits.mean(1).argmax(-1) == labels).sum().item()
        token_fashion += (logits.argmax(-1) == labels[:, None]).float().mean(-1).sum().item()
    tower.train()
    return {
        "scene_all_tokens": round(correct_scene / len(images), 4),
        "scene_token": round(token_acc / len(images), 4),
        "fashion_test": round(correct_fashion / len(f_images), 4),
        "fashion_test_per_token": round(token_fashion / len(f_images), 4),
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
    parser.add_argument("--size", type=int, default=84, help="image side (pixels)")
    parser.add_argument("--patch", type=int, default=28, help="patch side; 84/28 = 3x3 tokens")
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
    grid = args.size // args.patch
    cells = token_cells(grid)
    scenes = make_scenes(args.scenes, args.seed, "train", args.size, cells)
    scenes_test = make_scenes(2000, args.seed + 1, "test", args.size, cells)
    f_train, f_test = fashion_images("train", args.size), fashion_images("test", args.size)
    print(f"data ready in {time.time() - start:.0f}s", flush=True)

    config = CLIPVisionConfig(
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64 * 2 or 2,
        image_size=args.size,
        patch_size=args.patch,
    )
    tower = CLIPVisionModel(config)
    heads = Heads(args.hidden)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1
    )
    norm = Normalizer(args.size)
    log = []
    for step in range(1, args.steps + 1):
        si = rng.integers(0, len(scenes[0]), args.batch)
        fi = rng.integers(0, len(f_train[0]), args.fashion_batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            s_logits = heads(patch_tokens(tower, norm(scenes[0][si])), "scene")
            f_logits = heads(
                patch_tokens(tower, norm(augment_fashion(f_train[0][fi], rng))), "fashion"
            )
        loss = scene_loss(s_logits.float(), torch.from_numpy(scenes[1][si]))
        loss = loss + fashion_loss(f_logits.float(), torch.from_numpy(f_train[1][fi]))
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
        "crop_size": {"height": args.size, "width": args.size},
        "size": {"shortest_edge": args.size},
        "image_mean": list(norm.prep.mean),
        "image_std": list(norm.prep.std),
        "image_processor_type": "CLIPImageProcessor",
    }
    (out / "preprocessor_config.json").write_text(json.dumps(prep, indent=2))
    (out / "pretrain_log.jsonl").write_text("\n".join(json.dumps(r) for r in log) + "\n")
    print(f"saved {out} after {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
