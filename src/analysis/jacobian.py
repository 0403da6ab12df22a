"""The input-output Jacobian's singular values at initialisation (Pennington, Schoenholz & Ganguli 2017).

For an MLP with hidden blocks h_l = f(W_l h_{l-1} + b_l), l = 1..L, the Jacobian J = dh_L / dh_1 is the
product of the blocks 2..L's D_l W_l (D_l: diag f'(s_l)). The first block, from the input features to the
width, is left out so that J is width x width, as in the paper. Its mean squared singular value is about
chi1^(L-1) (src/analysis/theory.py); dynamical isometry is every singular value near 1, which at chi1 = 1
orthogonal weights on tanh give and Gaussian weights or any ReLU do not.

J is exact, per input, by torch.func.jacrev over the blocks, vmapped over a sample of training inputs; norms
run in eval mode (their running statistics at init: the identity), so one input does not need a batch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.func import jacrev, vmap

from src.models.mlp import MLP
from src.stats.names import mlp_layer

N_INPUTS = 32  # inputs the spectrum is pooled over: 32 x width singular values


def not_applicable(net) -> str | None:
    """Why the spectrum is not computed for `net` (None when it is)."""
    if not isinstance(net, MLP):
        return "the Jacobian spectrum is computed for MLPs (model=mlp)"
    if net.depth < 2:
        return "the Jacobian spans hidden blocks 2..L: it needs 2 hidden layers or more"
    return None


def _block(net: MLP, i: int, x: Tensor) -> Tensor:
    """Hidden block i of the MLP (as MLP.forward computes it)."""
    h = getattr(net, mlp_layer(i))(x)
    if hasattr(net, f"norm_{i:02d}"):
        h = getattr(net, f"norm_{i:02d}")(h)
    h = getattr(net, f"act_{i:02d}")(h)
    return x + h if net.residual[i] else h


def singular_values(net: MLP, x: Tensor, n: int = N_INPUTS) -> np.ndarray:
    """[inputs, min(width)] singular values of dh_L/dh_1 at the first `n` inputs of `x`, largest first."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            h1 = _block(net, 0, x[:n].to(next(net.parameters()).device))

        def upper(h: Tensor) -> Tensor:
            h = h.unsqueeze(0)
            for i in range(1, net.depth):
                h = _block(net, i, h)
            return h.squeeze(0)

        jac = vmap(jacrev(upper))(h1)
    finally:
        net.train(was_training)
    return torch.linalg.svdvals(jac.detach().double()).cpu().numpy()


def metrics(sv: np.ndarray) -> dict[str, float]:
    """jacobian/mean_sq_sv: the mean of sigma^2 over singular values and inputs; jacobian/max_sv: the largest."""
    return {"jacobian/mean_sq_sv": float(np.mean(sv ** 2)), "jacobian/max_sv": float(np.max(sv))}


def write_csv(sv: np.ndarray, path: Path) -> Path:
    """One row per input, its singular values largest first (columns sv_000, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ",".join(f"sv_{j:03d}" for j in range(sv.shape[1]))
    np.savetxt(path, sv, delimiter=",", header=header, comments="", fmt="%.6g")
    return path
