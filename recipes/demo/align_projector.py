"""Warm-start the demo projector: each image token lands on the LM's embeddings of its words.

Stage 1 of LLaVA aligns the projector through the frozen LM with captions. A 135M LM learning
that from a few thousand captions reads what every token carries (the object count, the
Fashion-MNIST class) but does not learn to find the one token that holds "the red square".
Text LMs find words by content already, so before stage 1 the projector is fitted (no LM
forward, a minute on CPU) to send each tower token to the sum of the input embeddings of the
words that describe it: its cell's size, colour, shape and position word ("nothing" for an empty
cell) and the object count; on a Fashion-MNIST picture, the item's name. Stage 1 and stage 2 then
start from tokens the LM can already attend to like words.

    .venv/bin/python recipes/demo/align_projector.py --tower work/demo/tower --out work/demo/align
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

import llavakit.demo
from llavakit.data import fashion, synthetic
from llavakit.model.projector import Projector

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_vision import (  # noqa: E402
    _GRID,
    Normalizer,
    fashion_images,
    patch_tokens,
    random_scenes,
    token_cells,
)

COUNT_WORDS = ("zero", "one", "two", "three", "four")
CELL_WORDS = {v: k for k, v in _GRID.items()}  # (row, col) -> position word; corners: none


class WordTable:
    """Input embeddings of words as they appear mid-sentence (" red", " ankle boot")."""

    def __init__(self, lm_dir: str) -> None:
        self.tok = AutoTokenizer.from_pretrained(lm_dir)
        lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
        self.emb = lm.get_input_embeddings().weight.detach()
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, words: list[str]) -> torch.Tensor:
        """Sum over words of each word's mean token embedding."""
        out = torch.zeros(self.emb.shape[1])
        for word in words:
            if word not in self.cache:
                ids = self.tok(" " + word, add_special_tokens=False)["input_ids"]
                self.cache[word] = self.emb[ids].mean(0)
            out += self.cache[word]
        return out


def scene_words(scene: synthetic.Scene, cells: np.ndarray) -> list[list[str]]:
    by_cell = {}
    for obj in scene.objects:
        row, col = _GRID[obj.position]
        by_cell[row * 3 + col] = [obj.size, obj.colour, obj.shape, obj.position]
    count = COUNT_WORDS[len(scene.objects)]
    words = []
    for cell in cells:
        here = by_cell.get(int(cell))
        if here is None:
            where = CELL_WORDS.get((int(cell) // 3, int(cell) % 3))
            here = ["nothing"] + ([where] if where else [])
        words.append([*here, count])
    return words


@torch.no_grad()
def features(tower: CLIPVisionModel, norm: Normalizer, images: np.ndarray) -> torch.Tensor:
    return torch.cat(
        [patch_tokens(tower, norm(images[i : i + 256])) for i in range(0, len(images), 256)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tower", default="work/demo/tower")
    parser.add_argument("--out", default="work/demo/align")
    parser.add_argument("--lm", default=llavakit.demo.SMOLLM2)
    parser.add_argument("--scenes", type=int, default=8000)
    parser.add_argument("--fashion", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--check", metavar="PROJECTOR", help="only report how word-aligned a saved projector is"
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.time()
    words = WordTable(llavakit.demo.resolve_lm(args.lm))
    tower = CLIPVisionModel.from_pretrained(args.tower).eval()
    size = tower.config.image_size
    cells = token_cells(size // tower.config.patch_size)
    norm = Normalizer(size)
    if args.check:
        projector = Projector("mlp2x_gelu", tower.config.hidden_size, words.emb.shape[1])
        projector.load_state_dict(load_file(args.check))
        print(json.dumps(check(projector, words, tower, norm, cells, size)))
        return

    def scene_set(n: int, seed: int, split: str):
        scenes, images = random_scenes(n, seed, split, size)
        return features(tower, norm, images), [scene_words(s, cells) for s in scenes]

    def fashion_set(split: str, n: int):
        images, labels = fashion_images(split, size)
        images, labels = images[:n], labels[:n]
        tokens = len(cells)
        return features(tower, norm, images), [[[fashion.NAMES[y]]] * tokens for y in labels]

    s_feat, s_words = scene_set(args.scenes, args.seed + 10, "train")
    f_feat, f_words = fashion_set("train", args.fashion)
    feats = torch.cat([s_feat, f_feat]).flatten(0, 1)
    targets = torch.stack([words(w) for img in s_words + f_words for w in img])
    scale = targets.norm(dim=-1).mean()
    print(f"features ready in {time.time() - start:.0f}s: {tuple(feats.shape)}", flush=True)

    projector = Projector("mlp2x_gelu", feats.shape[-1], targets.shape[-1])
    opt = torch.optim.AdamW(projector.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(feats), (1024,))
        loss = nn.functional.mse_loss(projector(feats[idx]) / scale, targets[idx] / scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0:
            print(json.dumps({"step": step, "loss": round(loss.item(), 5)}), flush=True)

    report = check(projector, words, tower, norm, cells, size)
    print(json.dumps(report), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in projector.state_dict().items()}
    save_file(state, str(out / "mm_projector.safetensors"))
    (out / "align_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {out} after {time.time() - start:.0f}s", flush=True)


@torch.no_grad()
def check(projector, words: WordTable, tower, norm, cells, size) -> dict[str, float]:
    """Held-out scenes: does the nearest colour / shape / position word of each token match?"""
    scenes, images = random_scenes(500, 123, "test", size)
    out = projector(features(tower, norm, images))
    vocab = {
        "colour": list(synthetic.COLOURS),
        "shape": list(synthetic.SHAPES),
        "position": list(synthetic.POSITIONS),
    }
    report = {}
    for attr, names in vocab.items():
        table = torch.stack([words([n]) for n in names])
        right = total = 0
        for i, scene in enumerate(scenes):
            for obj in scene.objects:
                row, col = _GRID[obj.position]
                token = int(np.flatnonzero(cells == row * 3 + col)[0])
                guess = names[int((out[i, token] @ table.T).argmax())]
                right += guess == getattr(obj, attr)
                total += 1
        report[f"nearest_{attr}_word"] = round(right / total, 4)
    return report


if __name__ == "__main__":
    main()
