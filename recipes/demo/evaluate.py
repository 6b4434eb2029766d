"""Evaluate the demo model on held-out data through ``llavakit.load()``.

- synthetic scenes from the held-out (test) split: accuracy per question type, with the
  training phrasings and with phrasings never seen in training;
- Fashion-MNIST test set (10,000 images, never trained on): accuracy against the class names,
  next to the published table and a blind baseline (same model, grey image);
- text-only chat still works.

    .venv/bin/python recipes/demo/evaluate.py --model demo --out work/demo/eval
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from PIL import Image
from tqdm import tqdm

import llavakit
from llavakit.data import fashion, synthetic

PUBLISHED = {"human": 0.835, "2-layer CNN": 0.91, "ResNet-18": 0.95}


def answer_all(pipe, items, batch: int, max_new_tokens: int = 8, desc: str = "") -> list[str]:
    answers = []
    for i in tqdm(range(0, len(items), batch), desc=desc, leave=False):
        chunk = items[i : i + batch]
        requests = [{"images": [img], "prompt": q} for img, q in chunk]
        answers += pipe.generate_batch(requests, max_new_tokens=max_new_tokens)
    return answers


def eval_scenes(pipe, n: int, phrasing: str, batch: int) -> dict[str, float]:
    size = pipe.processor.config.image_size
    items = synthetic.eval_items(n, seed=123, phrasing=phrasing, split="test", size=size)
    answers = answer_all(
        pipe, [(img, q) for img, q, _, _ in items], batch, desc=f"scenes/{phrasing}"
    )
    right, total = defaultdict(int), defaultdict(int)
    for (_, _, expected, qtype), got in zip(items, answers, strict=True):
        total[qtype] += 1
        right[qtype] += synthetic.score(got, expected, qtype)
    return {q: right[q] / total[q] for q in synthetic.QTYPES}


def eval_fashion(pipe, n: int | None, phrasing: str, batch: int, blind: bool = False) -> float:
    size = pipe.processor.config.image_size
    items = fashion.eval_items("test", n=n, phrasing=phrasing, size=size)
    grey = Image.new("RGB", (size, size), (128, 128, 128))
    pairs = [(grey if blind else img, q) for img, q, _, _ in items]
    answers = answer_all(pipe, pairs, batch, desc=f"fashion/{phrasing}{'/blind' if blind else ''}")
    return sum(
        fashion.score(a, label) for a, (_, _, _, label) in zip(answers, items, strict=True)
    ) / len(items)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    qtypes = list(synthetic.QTYPES)
    x = range(len(qtypes))
    ax1.bar(
        [i - 0.2 for i in x],
        [report["scenes_train_phrasings"][q] for q in qtypes],
        0.4,
        label="training phrasings",
    )
    ax1.bar(
        [i + 0.2 for i in x],
        [report["scenes_heldout_phrasings"][q] for q in qtypes],
        0.4,
        label="unseen phrasings",
    )
    ax1.axhline(0.9, color="grey", ls="--", lw=1)
    ax1.set(
        xticks=list(x),
        xticklabels=qtypes,
        ylim=(0, 1),
        title="held-out synthetic scenes",
        ylabel="accuracy",
    )
    ax1.legend(loc="lower right", fontsize=8)
    names = ["demo (llavakit)", "demo, unseen phrasing", "blind (grey image)", *PUBLISHED]
    values = [
        report["fashion_test"],
        report["fashion_test_heldout_phrasings"],
        report["fashion_blind"],
        *PUBLISHED.values(),
    ]
    ax2.barh(
        names, values, color=["tab:blue", "tab:blue", "tab:red"] + ["tab:grey"] * len(PUBLISHED)
    )
    ax2.set(xlim=(0, 1), title="Fashion-MNIST test set (10,000 images)", xlabel="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--out", default="work/demo/eval")
    parser.add_argument(
        "--scenes", type=int, default=1000, help="held-out scenes (split over 5 types)"
    )
    parser.add_argument(
        "--fashion", type=int, default=None, help="test images (default: all 10,000)"
    )
    parser.add_argument(
        "--blind", type=int, default=2000, help="test images for the blind baseline"
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--quantize", default=None, help="int8: measure the quantized model")
    parser.add_argument("--gguf", default=None, help="f16 / q8_0: the LM in llama.cpp")
    args = parser.parse_args()
    start = time.time()
    pipe = llavakit.load(args.model)
    if args.quantize:
        from llavakit.engine.quant import quantize_pipeline

        quantize_pipeline(pipe, args.quantize)
    if args.gguf:
        from llavakit.engine.gguf import load_gguf

        pipe = load_gguf(args.model, args.gguf)
    report = {
        "scenes_train_phrasings": eval_scenes(pipe, args.scenes, "train", args.batch),
        "scenes_heldout_phrasings": eval_scenes(pipe, args.scenes, "heldout", args.batch),
        "fashion_test": eval_fashion(pipe, args.fashion, "train", args.batch),
        "fashion_test_heldout_phrasings": eval_fashion(pipe, 2000, "heldout", args.batch),
        "fashion_blind": eval_fashion(pipe, args.blind, "train", args.batch, blind=True),
        "fashion_published": PUBLISHED,
        "text_only": {
            q: pipe.chat(prompt=q, max_new_tokens=24)
            for q in ("What is the capital of France?", "What is 2 plus 3?")
        },
        "fashion_n": args.fashion or 10000,
        "quantize": args.quantize,
        "gguf": args.gguf,
        "blind_n": args.blind,
        "seconds": round(time.time() - start),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "report.png")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
