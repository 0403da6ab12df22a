"""The MLP: hidden blocks Linear -> norm -> activation, optional skips, a Linear head. Plain typed arguments
only (no config objects); conf/model/mlp.yaml names this builder as its _target_."""
from __future__ import annotations

import torch
from torch import nn

from src.models import registry

NORMS = ("none", "batch", "layer")


class Residual(nn.Module):
    """x + body(x): a skip connection around one hidden block (only where input and output widths match)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _norm(kind: str, width: int) -> list[nn.Module]:
    if kind not in NORMS:
        raise ValueError(f"unknown norm {kind!r}; valid: {', '.join(NORMS)}")
    return {"none": [], "batch": [nn.BatchNorm1d(width)], "layer": [nn.LayerNorm(width)]}[kind]


def build_mlp(
    in_dim: int,
    out_dim: int,
    *,
    activation: str,
    init: str,
    depth: int | None = None,
    width: int | None = None,
    widths: list[int] | None = None,
    activation_params: dict | None = None,
    init_params: dict | None = None,
    norm: str = "none",
    residual: bool = False,
    head_activation: str | None = None,
) -> nn.Sequential:
    """One hidden block per width (`widths`, else `depth` blocks of `width`), then a Linear head (logits, or
    `head_activation` of them).

    A hidden block is Linear -> norm -> activation: the norm (BatchNorm1d or LayerNorm, `norm`) acts on
    the pre-activation, where Ioffe & Szegedy put it, so it keeps sigmoid/tanh inputs out of saturation.
    With `residual`, a block whose input and output widths are equal computes x + block(x); a block that
    changes the width (always the first, from the input) has no skip, as there is nothing of its size to
    add. `widths=[]` is a net with no hidden layer (a linear or, with `head_activation`, a GLM-like model).
    """
    if widths is None:
        if depth is None or width is None:
            raise ValueError("build_mlp needs widths, or depth and width")
        widths = [width] * depth
    if any(int(w) <= 0 for w in widths):
        raise ValueError(f"hidden widths must be positive integers, got {widths}")
    fill = registry.init_fn(init, **(init_params or {}))
    registry.activation(activation, **(activation_params or {}))  # fail before building anything
    if head_activation is not None:
        registry.activation(head_activation)
    _norm(norm, 1)
    layers: list[nn.Module] = []
    sizes = [in_dim, *widths]
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        block = [nn.Linear(fan_in, fan_out), *_norm(norm, fan_out),
                 registry.activation(activation, **(activation_params or {}))]
        if residual and fan_in == fan_out:
            layers.append(Residual(nn.Sequential(*block)))
        else:
            layers += block
    layers.append(nn.Linear(sizes[-1], out_dim))
    if head_activation is not None:
        layers.append(registry.activation(head_activation))
    if init != "torch_default":
        for module in nn.Sequential(*layers).modules():
            if isinstance(module, nn.Linear):
                fill(module.weight)
                nn.init.zeros_(module.bias)
    return nn.Sequential(*layers)
