"""Which int8 method decodes fastest on this CPU? Batch-1 decode of a LLaVA model's LM with
float32, bfloat16, dynamic int8 (torch.ao / fbgemm, what ``--quantize int8`` uses) and
weight-only int8 (``torch._weight_int8pack_mm``, bfloat16 activations), same prompt, same run.

    .venv/bin/python bench/quant.py [--model demo] [--tokens 64]
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from torch import nn

import llavakit
from llavakit.engine.engine import Engine
from llavakit.engine.quant import quantize_pipeline


class WeightOnlyInt8Linear(nn.Module):
    """int8 weights, per-output-channel scales, bfloat16 activations."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scales", scale.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().bfloat16())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch._weight_int8pack_mm(
            x.reshape(-1, shape[-1]).bfloat16(), self.qweight, self.scales
        )
        out = out.reshape(*shape[:-1], -1)
        return out if self.bias is None else out + self.bias


def weight_only(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, WeightOnlyInt8Linear(child))
        else:
            weight_only(child)


def decode_speed(pipe, tokens: int) -> tuple[float, str]:
    engine = Engine(pipe, max_batch=1)
    enc = pipe.encode([llavakit_example()], "Describe the image in detail.")

    def run(n: int) -> tuple[float, str]:
        start = time.perf_counter()
        text = engine.generate(enc, pipe.generation_config(max_new_tokens=n, ignore_eos=True))
        return time.perf_counter() - start, text

    run(2)
    one = min(run(1)[0] for _ in range(3))
    full, text = min(run(tokens) for _ in range(2))
    engine.close()
    return (tokens - 1) / (full - one), text


def llavakit_example():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "examples" / "scene.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    base = llavakit.load(args.model, dtype="float32")
    variants = {}
    variants["float32"] = base
    bf16 = copy.deepcopy(base)
    bf16.model.to(torch.bfloat16)
    variants["bfloat16"] = bf16
    variants["int8 dynamic (torch.ao, --quantize int8)"] = quantize_pipeline(
        copy.deepcopy(base), "int8"
    )
    wo = copy.deepcopy(bf16)
    weight_only(wo.model.language_model)
    variants["int8 weight-only (int8pack_mm, bf16)"] = wo
    rows = []
    for name, pipe in variants.items():
        speed, text = decode_speed(pipe, args.tokens)
        rows.append((name, speed, text[:40]))
        print(f"{name:45s} {speed:7.1f} tok/s   {text[:40]!r}", flush=True)
    ref = rows[1][1]
    print("\n| method | decode tok/s (batch 1) | vs bfloat16 |\n|---|---|---|")
    for name, speed, _ in rows:
        print(f"| {name} | {speed:.1f} | {speed / ref:.2f}x |")


if __name__ == "__main__":
    main()
