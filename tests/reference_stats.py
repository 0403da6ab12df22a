"""Per-layer gradient statistics as pure functions of tensors.

Every function takes a list of tensors (one per layer) and returns a float tensor of shape
[n_layers, n_stats] on the tensors' device, so a caller syncs with the host once for all layers.
The column order is the module-level tuple beside each function; the callback names metrics from them.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

GRAD_STATS = ("grad_norm", "grad_mean", "grad_std", "grad_absmax", "grad_zero_frac")
WEIGHT_STATS = ("weight_mean", "weight_std")
ACT_STATS = ("act_mean", "act_std", "act_saturation")
# Order of the per-layer columns in the dense trace; a stable API like the metric names.
LAYER_STATS = GRAD_STATS + ("backprop_norm",) + ACT_STATS + WEIGHT_STATS + ("update_ratio",)


def moments(tensors: Sequence[Tensor]) -> Tensor:
    """[L, 5]: L2 norm, mean, std (population), max |x|, fraction of exact zeros, per tensor."""
    rows = []
    for t in tensors:
        t = t.detach().float().reshape(-1)
        std, mean = torch.std_mean(t, correction=0)
        rows.append(torch.stack([
            torch.linalg.vector_norm(t), mean, std, t.abs().amax(), (t == 0).float().mean(),
        ]))
    return torch.stack(rows)


def mean_std(tensors: Sequence[Tensor]) -> Tensor:
    """[L, 2]: mean and population std per tensor."""
    return torch.stack([torch.stack(torch.std_mean(t.detach().float(), correction=0)[::-1]) for t in tensors])


def norms(tensors: Sequence[Tensor]) -> Tensor:
    """[L]: L2 norm per tensor."""
    return torch.stack([torch.linalg.vector_norm(t.detach().float()) for t in tensors])


def activation_stats(
    outputs: Sequence[Tensor],
    pre_activations: Sequence[Tensor],
    derivatives: Sequence[Callable[[Tensor], Tensor]],
    max_derivatives: Sequence[float],
    threshold: float,
) -> Tensor:
    """[L, 3]: mean and std of the activation output, and the saturated fraction of units x samples:
    where f'(s) < threshold * max f' (a saturated sigmoid/tanh, a dead ReLU)."""
    rows = []
    for a, s, fprime, fmax in zip(outputs, pre_activations, derivatives, max_derivatives):
        a, s = a.detach().float(), s.detach().float()
        std, mean = torch.std_mean(a, correction=0)
        saturated = (fprime(s) < threshold * fmax).float().mean()
        rows.append(torch.stack([mean, std, saturated]))
    return torch.stack(rows)


def update_ratio(before: Sequence[Tensor], after: Sequence[Tensor]) -> Tensor:
    """[L]: ||W_after - W_before|| / ||W_before|| per layer (relative size of one optimizer step)."""
    return torch.stack([
        torch.linalg.vector_norm((a.float() - b.float())) / torch.linalg.vector_norm(b.float()).clamp_min(1e-30)
        for b, a in zip(before, after)
    ])


def backprop_ratio(backprop_norms: Tensor) -> Tensor:
    """Signal arriving at the first hidden layer relative to the last hidden layer.

    `backprop_norms` holds ||dL/ds_l|| for every Linear layer l, the output layer last; the hidden layers
    are all but the last. Tiny means the signal vanished on its way down; huge means it exploded.
    """
    if backprop_norms.numel() < 3:
        return torch.tensor(float("nan"))
    return backprop_norms[0] / backprop_norms[-2]
