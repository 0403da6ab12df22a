"""Per-layer gradient statistics as pure functions of tensors.

Each function takes one tensor per layer and returns a float tensor [n_layers, n_stats] on their
device, so a caller syncs with the host once for all layers. They run under no_grad: nothing is recorded
for autograd and no input needs detaching. They are written for cost: small layers are zero-padded into
one matrix so each statistic is one op for all of them, large ones get the cheapest whole-tensor
reductions (`_foreach_norm`, `sum`, `aminmax`, `count_nonzero`), and std is derived from the norm and the
sum rather than the slow Welford `std_mean`. Activations of one kind and size are stacked likewise.
tests/reference_stats.py holds the plain per-tensor formulas these must agree with.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

GRAD_STATS = ("grad_norm", "grad_mean", "grad_std", "grad_absmax", "grad_zero_frac")
ACT_STATS = ("act_mean", "act_std", "act_saturation")
WEIGHT_STATS = ("weight_mean", "weight_std")
# Columns of the per-layer table and of the dense trace, in order; a stable API like the metric names.
# grad_nonfinite counts NaN/Inf entries of the weight gradient (0 on a healthy step).
LAYER_STATS = GRAD_STATS + ("grad_nonfinite", "backprop_norm") + ACT_STATS + WEIGHT_STATS + ("update_ratio",)


# Below this many elements in all, layers are zero-padded into one [L, max numel] matrix and every
# statistic is one op for all layers (per-op dispatch, ~5 us, dominates there). Above it, whole-tensor
# reductions per layer: the arithmetic dominates, and dim-wise reductions of big matrices measured 4-8x
# slower than whole-tensor ones.
PAD_TOTAL_NUMEL = 1 << 18


def _reduce(tensors: Sequence[Tensor], extremes: bool) -> Tensor:
    """[L, 3] float64 per tensor: numel, sum, L2 norm; with `extremes`, [L, 5]: also max |x| and the
    number of exact zeros."""
    tensors = [t.reshape(-1) for t in tensors]
    numel = [t.numel() for t in tensors]
    n = torch.tensor(numel, dtype=torch.float64, device=tensors[0].device)
    if sum(numel) <= PAD_TOTAL_NUMEL:
        x = pad_sequence(tensors, batch_first=True)  # padding zeros change no sum, norm or max |x|
        cols = [x.sum(1), torch.linalg.vector_norm(x, dim=1)]
        if extremes:
            cols += [x.abs().amax(1), n - torch.count_nonzero(x, dim=1)]  # zeros = numel - non-zeros
    else:
        cols = [torch.stack([t.sum() for t in tensors]), torch.stack(torch._foreach_norm(tensors))]
        if extremes:
            lo, hi = (torch.stack(v) for v in zip(*(torch.aminmax(t) for t in tensors)))
            cols += [torch.maximum(hi, -lo), n - torch.stack([torch.count_nonzero(t) for t in tensors])]
    return torch.stack([n, *(c.double() for c in cols)], dim=1)


def _mean_std(r: Tensor) -> tuple[Tensor, Tensor]:
    """mean and population std from a _reduce table: var = ||x||^2/n - mean^2, combined in float64.
    ||x|| comes from a float32 reduction (float64 ones cost 3-6x more), so std carries an absolute error
    of about 3e-4 * |mean|: exact enough for weights and gradients, whose std is not << their mean."""
    n, total, norm = r[:, 0], r[:, 1], r[:, 2]
    mean = total / n
    return mean, (norm * norm / n - mean * mean).clamp_min(0).sqrt()


@torch.no_grad()
def gradient_stats(grads: Sequence[Tensor]) -> Tensor:
    """[L, 5]: norm, mean, std, max |g|, fraction of exact zeros (the GRAD_STATS columns).
    NaN/Inf propagate into norm, mean and std, so a broken gradient is never reported as a number."""
    r = _reduce(grads, extremes=True)
    mean, std = _mean_std(r)
    return torch.stack([r[:, 2], mean, std, r[:, 3], r[:, 4] / r[:, 0]], dim=1).float()


@torch.no_grad()
def nonfinite_counts(tensors: Sequence[Tensor]) -> Tensor:
    """[L]: number of NaN/Inf entries per tensor (only worth its cost when a norm came out non-finite)."""
    return torch.stack([(~torch.isfinite(t)).sum() for t in tensors]).float()


@torch.no_grad()
def weight_stats(before: Sequence[Tensor], after: Sequence[Tensor]) -> Tensor:
    """[L, 3]: mean and std of the weights after the step, and the step's relative size
    ||W_after - W_before|| / ||W_after||."""
    r = _reduce(after, extremes=False)
    mean, std = _mean_std(r)
    step = torch.stack(torch._foreach_norm(torch._foreach_sub(list(after), list(before))))
    return torch.stack([mean, std, step.double() / r[:, 2].clamp_min(1e-30)], dim=1).float()


@torch.no_grad()
def backprop_sq_norms(signals: Sequence[Tensor]) -> Tensor:
    """[L]: ||dL/ds||^2 per layer; squared so that micro-batches of one step add up."""
    norms = torch.stack(torch._foreach_norm(list(signals))).double()
    return norms * norms


@torch.no_grad()
def activation_stats(
    outputs: Sequence[Tensor],
    pre_activations: Sequence[Tensor],
    derivatives: Sequence[Callable[[Tensor], Tensor]],
    max_derivatives: Sequence[float],
    threshold: float,
) -> Tensor:
    """[L, 3]: mean and std of each activation output, and the saturated fraction of units x samples:
    where f'(s) < threshold * max f' (a saturated sigmoid/tanh, a dead ReLU).

    Layers with the same activation and the same output size are stacked and reduced together."""
    out = torch.empty(len(outputs), 3, dtype=torch.float64, device=outputs[0].device)
    groups: dict[tuple, list[int]] = {}
    for i, (a, fprime) in enumerate(zip(outputs, derivatives)):
        groups.setdefault((fprime, max_derivatives[i], a.numel()), []).append(i)
    for (fprime, fmax, numel), idx in groups.items():
        a = torch.stack([outputs[i].reshape(-1) for i in idx]).double()  # batch x width: small
        s = torch.stack([pre_activations[i].reshape(-1) for i in idx])
        # centred two-pass std: a saturated sigmoid layer has std << mean, where the shortcut above fails
        mean = a.mean(dim=1, keepdim=True)
        std = torch.linalg.vector_norm(a - mean, dim=1) / numel ** 0.5
        mean = mean[:, 0]
        saturated = (fprime(s) < threshold * fmax).sum(dim=1).double() / numel
        out[idx] = torch.stack([mean, std, saturated], dim=1)
    return out.float()


def backprop_ratio(backprop_norms: Tensor) -> Tensor:
    """Signal arriving at the first hidden layer relative to the last hidden layer.

    `backprop_norms` holds ||dL/ds_l|| for every Linear layer l, the output layer last; the hidden layers
    are all but the last. Tiny means the signal vanished on its way down; huge means it exploded.
    """
    if backprop_norms.numel() < 3:
        return torch.tensor(float("nan"))
    return backprop_norms[0] / backprop_norms[-2]
