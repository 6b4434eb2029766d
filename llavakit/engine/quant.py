"""Quantized inference for the language model (the vision tower and projector stay as they are).

- ``int8``: dynamic int8 (weights int8 per tensor, activations quantized on the fly) through
  PyTorch's x86/fbgemm kernels. Measured on this CPU (see bench/quant.py) it is the fastest
  int8 path for decoding: a 576x49152 decode matmul takes 3.6 ms against 11.5 ms in bfloat16
  and 8.4 ms with weight-only int8 (``torch._weight_int8pack_mm``), one thread.
- ``int8w``: weight-only int8 (per output channel, activations stay bfloat16) through
  ``torch._weight_int8pack_mm``: slower than ``int8`` but it keeps the float model's answers
  (the activations are not quantized), halving the weights' memory.
- ``bnb8`` / ``bnb4``: bitsandbytes LLM.int8() / NF4 layers, where bitsandbytes is installed
  and supports the device; otherwise a clear error.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from llavakit.errors import LlavakitError

METHODS = ("int8", "int8w", "bnb8", "bnb4")


class QuantizationUnavailable(LlavakitError):
    """The requested quantization cannot run here (missing library or unsupported shapes)."""


def quantize_pipeline(pipe, method: str = "int8"):
    """Quantize ``pipe.model.language_model`` in place; returns ``pipe``."""
    if method not in METHODS:
        raise ValueError(f"quantization must be one of {METHODS}, got {method!r}")
    lm = pipe.model.language_model
    if method == "int8":
        lm.float()  # dynamic int8 takes float32 Linear layers; activations stay float32
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices
            torch.ao.quantization.quantize_dynamic(lm, {nn.Linear}, dtype=torch.qint8, inplace=True)
        pipe.model.quantization = "int8"
        return pipe
    if method == "int8w":
        lm.to(torch.bfloat16)
        _replace_linears(lm, WeightInt8Linear.from_linear)
        pipe.model.quantization = "int8w"
        return pipe
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise QuantizationUnavailable(
            f"--quantize {method} needs bitsandbytes (pip install bitsandbytes); "
            "on CPU, --quantize int8 is the fast option"
        ) from None
    _replace_with_bnb(lm, bnb, method)
    pipe.model.quantization = method
    return pipe


def _replace_with_bnb(module: nn.Module, bnb, method: str) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and name != "lm_head":
            if method == "bnb4" and child.out_features % 32:
                raise QuantizationUnavailable(
                    f"bitsandbytes 4-bit needs output sizes divisible by 32; {name} has "
                    f"{child.out_features}"
                )
            if method == "bnb8":
                new = bnb.nn.Linear8bitLt(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    has_fp16_weights=False,
                    threshold=6.0,
                )
                new.weight = bnb.nn.Int8Params(
                    child.weight.data.float().contiguous(),
                    requires_grad=False,
                    has_fp16_weights=False,
                )
            else:
                new = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=child.weight.dtype,
                    quant_type="nf4",
                )
                new.weight = bnb.nn.Params4bit(
                    child.weight.data.contiguous(), requires_grad=False, quant_type="nf4"
                )
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data, requires_grad=False)
            new.to(child.weight.device)  # quantizes on .to() (bitsandbytes convention)
            setattr(module, name, new)
        else:
            _replace_with_bnb(child, bnb, method)


class WeightInt8Linear(nn.Module):
    """``y = x @ (int8 weight * per-row scale).T + b`` without materialising the float weight."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> WeightInt8Linear:
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        return cls(q.contiguous(), scales.to(torch.bfloat16), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch._weight_int8pack_mm(flat, self.weight, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def _replace_linears(module: nn.Module, make) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child))
        else:
            _replace_linears(child, make)
