"""The plain reference for src/stats.py: one tensor at a time, textbook formulas, no attention to cost.
The tests require the fast implementation to agree with it."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


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
    """[L]: ||W_after - W_before|| / ||W_after|| per layer (relative size of the step actually taken)."""
    return torch.stack([
        torch.linalg.vector_norm((a.float() - b.float())) / torch.linalg.vector_norm(a.float()).clamp_min(1e-30)
        for b, a in zip(before, after)
    ])
