"""A transformer encoder: an input embedding, `depth` nn.TransformerEncoderLayer blocks of width `width`
with the LayerNorm before (pre-LN) or after (post-LN) each sublayer, and a Linear head read at the last
position. Plain typed arguments only (conf/model/transformer.yaml)."""
from __future__ import annotations

import torch
from torch import nn

from src.models import registry

NORM_POSITIONS = ("pre", "post")


class Positions(nn.Module):
    """Learned position embeddings added to a [batch, positions, width] input (a module of its own, so its
    parameter is recorded under its own name)."""

    def __init__(self, max_len: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_len, width))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.weight[: h.shape[1]]


class Transformer(nn.Module):
    """`embed` (an Embedding for tokens, a Linear for features; flat features are one per position) plus the
    learned positions `pos`, `encoder.layers.L.*` (self_attn with its out_proj, linear1, act, linear2,
    norm1, norm2), `norm` (pre-LN only: the final LayerNorm), then `head` on the last position."""

    def __init__(self, in_dim: int, in_kind: str, out_dim: int, depth: int, width: int, heads: int, max_len: int,
                 activation: nn.Module, norm_position: str):
        super().__init__()
        self.embed = nn.Embedding(in_dim, width) if in_kind == "tokens" else \
            nn.Linear(1 if in_kind == "features" else in_dim, width)
        self.pos = Positions(max_len, width)
        block = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                           activation=activation, batch_first=True,
                                           norm_first=norm_position == "pre")
        self.encoder = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        if norm_position == "pre":
            self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.is_floating_point():  # flat features: one per position
            x = x.unsqueeze(-1)
        h = self.embed(x)
        h = self.encoder(self.pos(h))
        if hasattr(self, "norm"):
            h = self.norm(h)
        return self.head(h[:, -1])


def build_transformer(in_dim: int, out_dim: int, *, in_kind: str = "features", activation: str, init: str,
                      depth: int, width: int, heads: int = 4, max_len: int = 512, norm_position: str = "pre",
                      activation_params: dict | None = None, init_params: dict | None = None) -> Transformer:
    """The activation group is the feed-forward's activation (a module, so the statistics see it); the init
    group fills every projection (attention, feed-forward, head), not the embedding nor the positions."""
    if norm_position not in NORM_POSITIONS:
        raise ValueError(f"unknown norm_position {norm_position!r}; valid: {', '.join(NORM_POSITIONS)}")
    if width % heads:
        raise ValueError(f"model.width ({width}) must be a multiple of model.heads ({heads})")
    registry.init_fn(init, **(init_params or {}))  # fail before building anything
    net = Transformer(in_dim, in_kind, out_dim, depth, width, heads, max_len,
                      registry.activation(activation, **(activation_params or {})), norm_position)
    registry.init_weights(net, init, **(init_params or {}))
    return net
