"""Write the demo model's training data (train splits only) with llavakit.data.

stage1.json: captions in the plain (stage-1) format — synthetic scenes and Fashion-MNIST.
stage2.json: visual questions (every synthetic question type, Fashion-MNIST items) with the
training phrasings, plus text-only chat answered by SmolLM2 itself (so LoRA does not erode
plain chat). Held-out scenes / phrasings and the Fashion-MNIST test set are never written here.

    .venv/bin/python recipes/demo/make_data.py --out work/demo/data
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from llavakit.data import fashion, synthetic

TEXT_QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Japan?",
    "What is the capital of Italy?",
    "What is 2 plus 3?",
    "What is 7 times 6?",
    "Name a primary colour.",
    "What is the boiling point of water?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?",
    "How many days are in a week?",
    "What gas do plants absorb?",
    "Translate 'hello' into French.",
    "What is the opposite of hot?",
    "Give me a synonym for happy.",
    "What is the chemical symbol for water?",
    "How many legs does a spider have?",
    "What language is spoken in Brazil?",
    "What is the square root of 81?",
    "Name a fruit that is yellow.",
    "What do bees make?",
    "Which ocean is the largest?",
    "What is the freezing point of water in Celsius?",
    "Write a haiku about the sea.",
    "Say something kind.",
    "What is a triangle?",
    "What colour is the sky?",
    "Tell me a fun fact about cats.",
    "What is the tallest mountain on Earth?",
    "How many continents are there?",
    "What is the main ingredient of bread?",
    "Who painted the Mona Lisa?",
    "What is the speed of light?",
    "Explain what a computer is in one sentence.",
    "What is the currency of the United Kingdom?",
    "What is photosynthesis?",
    "Name three animals that live in the ocean.",
    "What is 10 minus 4?",
    "What is the capital of Germany?",
    "What is the capital of Spain?",
    "Who was Albert Einstein?",
]


def text_only(out: Path, max_new_tokens: int = 48) -> Path:
    """Self-distilled text chat: SmolLM2's own answers (ChatML, no system turn)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llavakit.demo import smollm2_dir

    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    records = []
    for i, question in enumerate(TEXT_QUESTIONS):
        prompt = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        answer = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip()
        if answer:
            records.append(
                {
                    "id": f"text_{i:04d}",
                    "conversations": [
                        {"from": "human", "value": question},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
    return synthetic.write_json(out / "text_only.json", records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--scene-captions", type=int, default=3000)
    parser.add_argument("--fashion-captions", type=int, default=2000)
    parser.add_argument("--scene-qa", type=int, default=8800, help="scene conversations")
    parser.add_argument("--max-turns", type=int, default=3, help="questions per scene: 1..N")
    parser.add_argument(
        "--scene-weights",
        default="colour=2,shape=1,count=1,position=3,existence=3",
        help="relative share of each scene question type ('' = equal shares)",
    )
    parser.add_argument("--fashion-qa", type=int, default=4000)
    parser.add_argument("--size", type=int, default=84, help="image side = the tower's input")
    parser.add_argument("--text-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    weights = {
        k: float(v) for k, v in (kv.split("=") for kv in args.scene_weights.split(",") if kv)
    }
    load = lambda p: json.loads(Path(p).read_text())  # noqa: E731
    stage1 = load(
        synthetic.write_dataset(
            out, args.scene_captions, args.seed, "train", "caption", size=args.size, plain=True
        )
    )
    stage1 += load(
        fashion.write_dataset(
            out, "train", args.fashion_captions, args.seed, "caption", size=args.size, plain=True
        )
    )
    stage2 = load(
        synthetic.write_dataset(
            out,
            args.scene_qa,
            args.seed + 1,
            "train",
            "qa",
            size=args.size,
            max_turns=args.max_turns,
            weights=weights or None,
        )
    )
    stage2 += load(
        fashion.write_dataset(out, "train", args.fashion_qa, args.seed + 1, "qa", size=args.size)
    )
    stage2 += load(text_only(out)) * args.text_repeats
    rng = random.Random(args.seed)
    rng.shuffle(stage1)
    rng.shuffle(stage2)
    synthetic.write_json(out / "stage1.json", stage1)
    synthetic.write_json(out / "stage2.json", stage2)
    print(f"stage1: {len(stage1)} samples, stage2: {len(stage2)} samples -> {out}")


if __name__ == "__main__":
    main()
