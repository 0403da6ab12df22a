"""The back-propagated signal through time of torch's recurrent modules, as pure functions.

nn.RNN, nn.LSTM and nn.GRU run their time loop inside one op, so the hidden states h_t are never tensors of
the graph and their gradients cannot be hooked. `time_signal` recovers ||dL/dh_t||, the total derivative of
the loss with respect to the top layer's hidden state at every time step t (through the output at t and
through every later step), from what the module's forward hook and its output's gradient show: it re-runs
the module's own equations one step at a time (the documented ones, with its own weights) and
back-propagates the output's gradient through that copy of the graph alone. Training's own gradients are
untouched: the copy is built, differentiated and dropped.

Not unrolled (None): bidirectional modules, LSTM projections, and dropout between layers while training
(the copy could not draw the same masks).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def _cell(mode: str):
    """h (and c) at one time step from the input's and the state's affine maps, as torch documents them."""
    if mode == "LSTM":
        def lstm(gi, h, c, w_hh, b_hh):
            gates = gi + h @ w_hh.T + (b_hh if b_hh is not None else 0)
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        return lstm
    if mode == "GRU":
        def gru(gi, h, c, w_hh, b_hh):
            gh = h @ w_hh.T + (b_hh if b_hh is not None else 0)
            i_r, i_z, i_n = gi.chunk(3, dim=-1)
            h_r, h_z, h_n = gh.chunk(3, dim=-1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            return (1 - z) * n + z * h, None
        return gru
    act = torch.tanh if mode == "RNN_TANH" else torch.relu

    def rnn(gi, h, c, w_hh, b_hh):
        return act(gi + h @ w_hh.T + (b_hh if b_hh is not None else 0)), None
    return rnn


def unrollable(module: nn.RNNBase) -> bool:
    return not (module.bidirectional or getattr(module, "proj_size", 0)
                or (module.training and module.dropout > 0 and module.num_layers > 1))


def unroll(module: nn.RNNBase, x: Tensor, hx=None) -> tuple[Tensor, list[Tensor]]:
    """The module's output sequence recomputed one step at a time, time-major [T, B, H], and the top layer's
    hidden states h_t (the tensors whose gradients are the signal through time). x as the module takes it."""
    if x.dim() == 2:  # unbatched: [T, features]
        x = x.unsqueeze(1)
        hx = None if hx is None else tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
    elif module.batch_first:
        x = x.transpose(0, 1)
    T, B = x.shape[:2]
    H, cell = module.hidden_size, _cell(module.mode)
    zeros = x.new_zeros(module.num_layers, B, H)
    h0, c0 = (hx if isinstance(hx, tuple) else (hx, None)) if hx is not None else (zeros, None)
    c0 = zeros if (module.mode == "LSTM" and c0 is None) else c0
    seq = x
    for layer in range(module.num_layers):
        w_ih, w_hh = getattr(module, f"weight_ih_l{layer}"), getattr(module, f"weight_hh_l{layer}")
        b_ih, b_hh = getattr(module, f"bias_ih_l{layer}", None), getattr(module, f"bias_hh_l{layer}", None)
        gi = seq @ w_ih.T + (b_ih if b_ih is not None else 0)  # the input's part of every step at once
        h, c = h0[layer], (c0[layer] if c0 is not None else None)
        hs = []
        for t in range(T):
            h, c = cell(gi[t], h, c, w_hh, b_hh)
            hs.append(h)
        seq = torch.stack(hs)
    return seq, hs


def time_signal(module: nn.RNNBase, x: Tensor, hx, grad_out: Tensor) -> Tensor | None:
    """float64 [T]: ||dL/dh_t|| over the batch for t = 1..T, given dL/d(output) `grad_out` (as the module's
    output is laid out); None when the module cannot be unrolled (see the module docstring)."""
    if not unrollable(module):
        return None
    with torch.enable_grad():
        detached = None if hx is None else tuple(h.detach() for h in hx) if isinstance(hx, tuple) else hx.detach()
        out, hs = unroll(module, x.detach(), detached)
        g = grad_out.detach()
        g = g.unsqueeze(1) if g.dim() == 2 else g.transpose(0, 1) if module.batch_first else g
        grads = torch.autograd.grad(out, hs, grad_outputs=g.to(out.dtype), allow_unused=True)
    return torch.stack([torch.linalg.vector_norm(gt.double()) if gt is not None else
                        torch.zeros((), dtype=torch.float64, device=x.device) for gt in grads])
