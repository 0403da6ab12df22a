"""Convolutional nets: `depth` 3x3 convolutions of `channels` channels, each followed by a norm and an
activation, optional skips, then global average pooling and a Linear head. Plain typed arguments only
(conf/model/cnn.yaml and resnet.yaml name this builder as their _target_)."""
from __future__ import annotations

import math

import torch
from torch import nn

from src.models import registry

NORMS = ("none", "batch", "layer")


class ConvNet(nn.Module):
    """conv_LL -> norm_LL -> act_LL for each block, x + block(x) where `residual` (every block but the first,
    whose input has the image's channels), then `pool` (global average) and the Linear `head`. Flat names, so
    a module's path is its name. The convolutions keep the image's size (padding 1). Flat inputs of a square
    number of features are read as one-channel square images (digits' 64, MNIST's 784)."""

    def __init__(self, in_channels: int, out_dim: int, depth: int, channels: int, activation: str,
                 activation_params: dict, norm: str, residual: bool):
        super().__init__()
        self.depth, self.residual = depth, residual
        for i in range(depth):
            self.add_module(f"conv_{i:02d}", nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1))
            if norm != "none":
                self.add_module(f"norm_{i:02d}", nn.BatchNorm2d(channels) if norm == "batch" else
                                nn.GroupNorm(1, channels))
            self.add_module(f"act_{i:02d}", registry.activation(activation, **activation_params))
        self.head = nn.Linear(channels, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # flat features of a square image
            side = math.isqrt(x.shape[1])
            x = x.view(len(x), 1, side, side)
        for i in range(self.depth):
            h = getattr(self, f"conv_{i:02d}")(x)
            if hasattr(self, f"norm_{i:02d}"):
                h = getattr(self, f"norm_{i:02d}")(h)
            h = getattr(self, f"act_{i:02d}")(h)
            x = x + h if self.residual and i > 0 else h
        return self.head(x.mean(dim=(2, 3)))


def build_cnn(in_dim: int, out_dim: int, *, in_kind: str = "features", activation: str, init: str, depth: int,
              channels: int, activation_params: dict | None = None, init_params: dict | None = None,
              norm: str = "none", residual: bool = False) -> ConvNet:
    """A ConvNet for images (`in_dim` channels) or square flat inputs (`in_dim` features, one channel)."""
    if in_kind != "features":
        raise ValueError(f"model=cnn takes images (flat square inputs such as digits), not {in_kind}")
    if math.isqrt(in_dim) ** 2 != in_dim:
        raise ValueError(f"model=cnn reads flat inputs as square images; {in_dim} features are not a square")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
    registry.init_fn(init, **(init_params or {}))  # fail before building anything
    net = ConvNet(1, out_dim, depth, channels, activation, activation_params or {}, norm, residual)
    registry.init_weights(net, init, **(init_params or {}))
    return net
