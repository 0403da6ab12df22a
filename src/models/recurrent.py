"""Recurrent nets: `depth` stacked nn.RNN / nn.LSTM / nn.GRU layers of `width` units, then a Linear head on
the last time step's output. Plain typed arguments only (conf/model/rnn.yaml, lstm.yaml, gru.yaml)."""
from __future__ import annotations

import torch
from torch import nn

from src.models import registry

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
RNN_ACTIVATIONS = ("tanh", "relu")  # what nn.RNN can apply


class RecurrentNet(nn.Module):
    """`embed` (token inputs only), then rnn_00, rnn_01, ...: one single-layer module per layer, so each is
    recorded with its own signal, and its own signal through time; then `head` on the last step's output.
    Flat features [N, F] are read as F steps of one feature (pixel by pixel, as in sequential MNIST)."""

    def __init__(self, cell: str, in_dim: int, in_kind: str, out_dim: int, depth: int, width: int,
                 nonlinearity: str):
        super().__init__()
        self.depth = depth
        if in_kind == "tokens":
            self.embed = nn.Embedding(in_dim, width)
        size = width if in_kind == "tokens" else (1 if in_kind == "features" else in_dim)
        kwargs = {"nonlinearity": nonlinearity} if cell == "rnn" else {}
        for i in range(depth):
            self.add_module(f"rnn_{i:02d}", CELLS[cell](size if i == 0 else width, width, batch_first=True,
                                                        **kwargs))
        self.head = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "embed"):
            x = self.embed(x)
        elif x.dim() == 2:  # flat features: one per step
            x = x.unsqueeze(-1)
        for i in range(self.depth):
            x, _ = getattr(self, f"rnn_{i:02d}")(x)
        return self.head(x[:, -1])


def build_recurrent(in_dim: int, out_dim: int, *, in_kind: str = "features", cell: str, activation: str,
                    init: str, depth: int, width: int, forget_bias: float = 1.0,
                    activation_params: dict | None = None, init_params: dict | None = None) -> RecurrentNet:
    """`cell` rnn (its nonlinearity is the activation: tanh or relu), lstm or gru (their gates are their own:
    the activation group does not apply). An LSTM's forget gates start at `forget_bias` (b_ih's forget
    slice; b_hh's is zero), whatever the init."""
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; valid: {', '.join(CELLS)}")
    if cell == "rnn" and activation not in RNN_ACTIVATIONS:
        raise ValueError(f"model=rnn: nn.RNN applies tanh or relu, not activation={activation}")
    if cell != "rnn" and activation != "tanh":
        raise ValueError(f"model={cell}: its gates are sigmoid and tanh by construction; activation={activation} "
                         "does not apply (leave activation=tanh)")
    registry.init_fn(init, **(init_params or {}))  # fail before building anything
    net = RecurrentNet(cell, in_dim, in_kind, out_dim, depth, width, activation)
    registry.init_weights(net, init, **(init_params or {}))
    if cell == "lstm":
        with torch.no_grad():
            for i in range(depth):
                lstm = getattr(net, f"rnn_{i:02d}")
                lstm.bias_ih_l0[width:2 * width] = forget_bias  # gates are ordered input, forget, cell, output
                lstm.bias_hh_l0[width:2 * width] = 0.0
    return net
