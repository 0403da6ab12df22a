"""The MLP: hidden blocks Linear -> norm -> activation, optional skips, a Linear head. Plain typed arguments
only (no config objects); conf/model/mlp.yaml names this builder as its _target_."""
from __future__ import annotations

import torch
from torch import nn

from src.models import registry
from src.stats.names import mlp_layer

NORMS = ("none", "batch", "layer")


class MLP(nn.Module):
    """Hidden blocks `layer_LL` -> `norm_LL` -> `act_LL` (x + block(x) where the block is residual), then the
    head `layer_LL` (and `head_act`). Flat names, so a module's path is its name: `layer_03` is the fourth
    Linear from the input whether or not it sits in a residual block."""

    def __init__(self, blocks: list[tuple[nn.Linear, list[nn.Module], nn.Module, bool]], head: nn.Linear,
                 head_act: nn.Module | None):
        super().__init__()
        self.residual = [res for *_, res in blocks]
        self.depth = len(blocks)
        for i, (linear, norm, act, _) in enumerate(blocks):
            self.add_module(mlp_layer(i), linear)
            for m in norm:
                self.add_module(f"norm_{i:02d}", m)
            self.add_module(f"act_{i:02d}", act)
        self.add_module(mlp_layer(len(blocks)), head)
        if head_act is not None:
            self.head_act = head_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, res in enumerate(self.residual):
            h = getattr(self, mlp_layer(i))(x)
            if hasattr(self, f"norm_{i:02d}"):
                h = getattr(self, f"norm_{i:02d}")(h)
            h = getattr(self, f"act_{i:02d}")(h)
            x = x + h if res else h
        x = getattr(self, mlp_layer(self.depth))(x)
        return self.head_act(x) if hasattr(self, "head_act") else x


def _norm(kind: str, width: int) -> list[nn.Module]:
    if kind not in NORMS:
        raise ValueError(f"unknown norm {kind!r}; valid: {', '.join(NORMS)}")
    return {"none": [], "batch": [nn.BatchNorm1d(width)], "layer": [nn.LayerNorm(width)]}[kind]


def build_mlp(
    in_dim: int,
    out_dim: int,
    *,
    in_kind: str = "features",
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
) -> MLP:
    """One hidden block per width (`widths`, else `depth` blocks of `width`), then a Linear head (logits, or
    `head_activation` of them).

    A hidden block is Linear -> norm -> activation: the norm (BatchNorm1d or LayerNorm, `norm`) acts on
    the pre-activation, where Ioffe & Szegedy put it, so it keeps sigmoid/tanh inputs out of saturation.
    With `residual`, a block whose input and output widths are equal computes x + block(x); a block that
    changes the width (always the first, from the input) has no skip, as there is nothing of its size to
    add. `widths=[]` is a net with no hidden layer (a linear or, with `head_activation`, a GLM-like model).
    """
    if in_kind != "features":
        raise ValueError(f"model=mlp takes flat features, not {in_kind}; for sequences and tokens use model=rnn, "
                         "lstm, gru or transformer")
    if widths is None:
        if depth is None or width is None:
            raise ValueError("build_mlp needs widths, or depth and width")
        widths = [width] * depth
    if any(int(w) <= 0 for w in widths):
        raise ValueError(f"hidden widths must be positive integers, got {widths}")
    registry.init_fn(init, **(init_params or {}))  # fail before building anything
    registry.activation(activation, **(activation_params or {}))  # fail before building anything
    if head_activation is not None:
        registry.activation(head_activation)
    _norm(norm, 1)
    blocks = []
    sizes = [in_dim, *widths]
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        blocks.append((nn.Linear(fan_in, fan_out), _norm(norm, fan_out),
                       registry.activation(activation, **(activation_params or {})), residual and fan_in == fan_out))
    net = MLP(blocks, nn.Linear(sizes[-1], out_dim),
              registry.activation(head_activation) if head_activation is not None else None)
    registry.init_weights(net, init, **(init_params or {}))
    return net
