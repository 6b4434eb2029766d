"""Projector registry: maps vision features to the language model's embedding space.

Built from a one-line spec like the original's ``mm_projector_type``: ``linear``,
``mlp{N}x_gelu``, ``identity``; an ``ln_`` prefix adds a LayerNorm first (InternVL-Chat).
Layers are named ``linear_1 .. linear_N`` so mlp2x_gelu matches transformers' key names.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

ProjectorFactory = Callable[[int, int, bool], list[nn.Module]]
PROJECTORS: dict[str, ProjectorFactory] = {}


def register_projector(pattern: str) -> Callable[[ProjectorFactory], ProjectorFactory]:
    """Register a factory for spec names matching ``pattern`` (a regex, full match)."""

    def wrap(factory: ProjectorFactory) -> ProjectorFactory:
        PROJECTORS[pattern] = factory
        return factory

    return wrap


@register_projector("linear")
def _linear(vision_dim: int, text_dim: int, bias: bool) -> list[nn.Module]:
    return [nn.Linear(vision_dim, text_dim, bias=bias)]


@register_projector("identity")
def _identity(vision_dim: int, text_dim: int, bias: bool) -> list[nn.Module]:
    if vision_dim != text_dim:
        raise ValueError(f"identity projector needs equal sizes, got {vision_dim} -> {text_dim}")
    return []


@register_projector(r"mlp(\d+)x_gelu")
def _mlp_gelu(vision_dim: int, text_dim: int, bias: bool, depth: int = 2) -> list[nn.Module]:
    layers = [nn.Linear(vision_dim, text_dim, bias=bias)]
    layers += [nn.Linear(text_dim, text_dim, bias=bias) for _ in range(depth - 1)]
    return layers


class Projector(nn.Module):
    """[..., vision_dim] -> [..., text_dim]; GELU between consecutive linears."""

    def __init__(self, spec: str, vision_dim: int, text_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.spec = spec
        name = spec.removeprefix("ln_")
        self.pre_norm = nn.LayerNorm(vision_dim) if spec.startswith("ln_") else None
        linears = None
        for pattern, factory in PROJECTORS.items():
            match = re.fullmatch(pattern, name)
            if match:
                extra = [int(g) for g in match.groups()]
                linears = factory(vision_dim, text_dim, bias, *extra)
                break
        if linears is None:
            raise ValueError(
                f"unknown projector type {spec!r}; known: linear, mlpNx_gelu, identity"
            )
        self.num_linears = len(linears)
        for i, layer in enumerate(linears, start=1):
            setattr(self, f"linear_{i}", layer)
        self.act = nn.GELU()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(features) if self.pre_norm is not None else features
        for i in range(1, self.num_linears + 1):
            if i > 1:
                x = self.act(x)
            x = getattr(self, f"linear_{i}")(x)
        return x
