"""Per-layer gradient statistics as pure functions of tensors.

Three layouts, one set of formulas:
- *stacked*: many steps of small layers at once. A layer's tensor lives, flattened and zero-padded, in a
  row of a [steps, layers, max numel] matrix, so each statistic is one op for all steps and layers (on a
  small net per-op dispatch costs more than the arithmetic). Padding zeros change no sum, norm or max |x|;
  zero counts subtract them.
- *per tensor*: one step of big layers, each reduced whole (there the arithmetic dominates, and row-wise
  reductions of big matrices are slower than whole-tensor ones).
- *from sums*: the per-layer sums the fused C pass (src/stats/fused.c) computes in one read of each
  tensor, turned into the same columns for many steps at once.
Every function runs under no_grad and returns float32 [..., layers, stats] on the input's device (the
columns of src.stats.names), so a caller syncs with the host once for many steps. tests/reference_stats.py
holds the plain per-tensor formulas these must agree with.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def _shifted_mean_std(numel: Tensor, shift, total: Tensor, total_sq: Tensor) -> tuple[Tensor, Tensor]:
    """mean and population std of entries x from the sums of x - shift and of (x - shift)^2."""
    centred = total / numel
    return shift + centred, (total_sq / numel - centred * centred).clamp_min(0).sqrt()


def _mean_std(n: Tensor, total: Tensor, norm: Tensor) -> tuple[Tensor, Tensor]:
    """mean and population std from count, sum and L2 norm: var = ||x||^2/n - mean^2, in float64.
    ||x|| comes from a float32 reduction (float64 reductions cost several times more), so std carries an
    absolute error of about 3e-4 * |mean|: exact enough for weights and gradients, whose std is not << their
    mean."""
    norm = norm.double()
    return _shifted_mean_std(n.double(), 0.0, total.double(), norm * norm)


def _grad_columns(n: Tensor, total: Tensor, norm: Tensor, absmax: Tensor, nonzero: Tensor) -> Tensor:
    mean, std = _mean_std(n, total, norm)
    return torch.stack([norm.double(), mean, std, absmax.double(), 1 - nonzero.double() / n], dim=-1).float()


# ---- stacked layout: [..., layers, max numel], zero-padded ------------------------------------------
@torch.no_grad()
def stacked_gradient_stats(g: Tensor, numel: Tensor) -> Tensor:
    """[..., L, 5] (the GRAD_STATS columns) from zero-padded gradients g [..., L, M]; numel [L] is each
    layer's true size. NaN/Inf propagate into norm, mean and std: a broken gradient never reads as a number
    (nor does its zero fraction: count those rows' zeros with `stacked_zero_counts`).

    Only reductions that CPU kernels vectorise along the last dim (sum, norm, amax, amin): aminmax,
    count_nonzero and sums of booleans along a dim are an order of magnitude slower, so non-zeros are
    counted as ||sign(g)||^2, rounded."""
    absmax = torch.maximum(g.amax(-1), -g.amin(-1))
    nonzero = torch.linalg.vector_norm(g.sign(), dim=-1).square_().round_()
    return _grad_columns(numel, g.sum(-1), torch.linalg.vector_norm(g, dim=-1), absmax, nonzero)


@torch.no_grad()
def stacked_weight_stats(before: Tensor, after: Tensor, numel: Tensor) -> Tensor:
    """[..., L, 3]: mean and std of the weights after the step and ||W_after - W_before|| / ||W_after||,
    from zero-padded weights [..., L, M]."""
    norm = torch.linalg.vector_norm(after, dim=-1)
    mean, std = _mean_std(numel, after.sum(-1), norm)
    step = torch.linalg.vector_norm(after - before, dim=-1)
    return torch.stack([mean, std, step.double() / norm.double().clamp_min(1e-30)], dim=-1).float()


@torch.no_grad()
def stacked_nonfinite_counts(x: Tensor) -> Tensor:
    """[..., L]: number of NaN/Inf entries per row of x [..., L, M] (only worth its cost when a norm came
    out non-finite)."""
    return (~torch.isfinite(x)).sum(-1).float()


@torch.no_grad()
def stacked_zero_counts(x: Tensor, numel: Tensor) -> Tensor:
    """[..., L]: number of exact zeros per row of zero-padded x [..., L, M] whose rows hold numel [L] true
    entries (the exact count where NaN makes the fast one in stacked_gradient_stats NaN)."""
    return (x == 0).sum(-1).double() - (x.shape[-1] - numel)


@torch.no_grad()
def stacked_activation_stats(
    pre: Tensor,
    activation: Callable[[Tensor], Tensor],
    derivative: Callable[[Tensor], Tensor],
    max_derivative: float,
    threshold: float,
    rows: Tensor | None = None,
) -> Tensor:
    """[..., L, 3] from pre-activations s [..., L, B, W] of layers followed by the same activation module:
    mean and std of f(s), and the saturated fraction of units x samples, where f'(s) < threshold * max f'
    (a saturated sigmoid/tanh, a dead ReLU). `rows` [...] (optional): how many of the B rows are real
    samples (a short last batch); the rest are ignored."""
    # f(s) recomputed: the same op as the forward pass, so the same values. All in float32: float64 copies
    # and boolean-to-float conversions of [steps, layers, batch, width] are several times slower than float32
    # arithmetic. Each layer is shifted by one of its own values, an exact float32 difference, so that the
    # spread of a saturated layer (all ~1 - 1e-6) survives the one-pass variance below.
    # The two fresh tensors (f(s), f'(s)) are worked on in place: every new buffer of that size costs page
    # faults that an in-place pass does not; it also keeps peak memory down.
    a = _own(activation(pre).float(), pre)
    corner = a[..., :1, :1].clone()
    d = a.sub_(corner)
    # -1 where f'(s) < threshold * max f', else 0 (sign(0) = 0: the comparison is strict)
    saturated = _own(derivative(pre).float(), pre).sub_(threshold * max_derivative).sign_().clamp_max_(0)
    if rows is None:
        n = torch.tensor(float(pre.shape[-1] * pre.shape[-2]), dtype=torch.float64, device=pre.device)
    else:
        keep = (torch.arange(pre.shape[-2], device=pre.device) < rows[..., None]).float()[..., None, :, None]
        d, saturated = d.mul_(keep), saturated.mul_(keep)
        n = (rows.double() * pre.shape[-1])[..., None]  # [..., 1]: real entries per layer
    d, saturated = d.flatten(-2), saturated.flatten(-2)  # contiguous last dim: the fast reductions
    shift, sat = corner[..., 0, 0].double(), -saturated.sum(-1).double()
    mean_d, std = _mean_std(n, d.sum(-1), torch.linalg.vector_norm(d, dim=-1))
    return torch.stack([shift + mean_d, std, sat / n], dim=-1).float()


def _own(x: Tensor, source: Tensor) -> Tensor:
    """x, or a copy of it if it shares memory with `source` (an identity activation returns its input):
    safe to modify in place."""
    return x.clone() if x.data_ptr() == source.data_ptr() else x


# ---- raw per-layer sums of the fused pass (src/stats/fused.c), one row per layer -----------------------
# "shifted": of x - c, c the layer's first entry ("shift"), for a variance without cancellation
FUSED_GRAD_SUMS = ("shift", "shifted_sum", "shifted_sum_sq", "sum_sq", "absmax", "nonzero", "nonfinite", "nan")
FUSED_WEIGHT_SUMS = ("shift", "shifted_sum", "shifted_sum_sq", "sum_sq", "step_sum_sq")
FUSED_ACT_SUMS = ("count", "shift", "shifted_sum", "shifted_sum_sq", "saturated")


@torch.no_grad()
def gradient_stats_from_sums(sums: Tensor, numel: Tensor) -> Tensor:
    """[..., L, 6]: the GRAD_STATS columns and grad_nonfinite from float64 sums [..., L, FUSED_GRAD_SUMS] of
    layers of numel [L] entries. The zero fraction is exact even beside NaN (NaN and Inf are not zeros)."""
    shift, total, total_sq, sq, absmax, nonzero, nonfinite, _ = sums.unbind(-1)
    mean, std = _shifted_mean_std(numel, shift, total, total_sq)
    return torch.stack([sq.sqrt(), mean, std, absmax, 1 - nonzero / numel, nonfinite], dim=-1).float()


@torch.no_grad()
def weight_stats_from_sums(sums: Tensor, numel: Tensor) -> Tensor:
    """[..., L, 3] (as weight_stats) from float64 sums [..., L, FUSED_WEIGHT_SUMS]."""
    shift, total, total_sq, sq, step_sq = sums.unbind(-1)
    mean, std = _shifted_mean_std(numel, shift, total, total_sq)
    return torch.stack([mean, std, step_sq.sqrt() / sq.sqrt().clamp_min(1e-30)], dim=-1).float()


@torch.no_grad()
def activation_stats_from_sums(sums: Tensor) -> Tensor:
    """[..., L, 3] (the ACT_STATS columns) from float64 sums [..., L, FUSED_ACT_SUMS]; NaN where the count
    is 0 (the layer's activation did not run that step)."""
    count, shift, total, total_sq, saturated = sums.unbind(-1)
    mean, std = _shifted_mean_std(count, shift, total, total_sq)
    return torch.stack([mean, std, saturated / count], dim=-1).float()


# ---- per tensor: one step, layers reduced whole -------------------------------------------------------
@torch.no_grad()
def gradient_stats(grads: Sequence[Tensor]) -> Tensor:
    """[L, 5]: norm, mean, std, max |g|, fraction of exact zeros (the GRAD_STATS columns), one row per
    tensor of any shape. Whole-tensor passes per layer (sum, min and max in one, sign g), one norm op for
    all g and one for all sign g, whose square counts the non-zeros (several times cheaper than
    count_nonzero); NaN makes the zero fraction NaN too (count those with `zero_fractions`)."""
    flat = [g.reshape(-1) for g in grads]
    numel = torch.tensor([t.numel() for t in flat], dtype=torch.float64, device=flat[0].device)
    # float32 signs: a half-precision norm cannot count exactly past 256
    signs = [t.sign().float() if t.element_size() < 4 else t.sign() for t in flat]
    bounds = [torch.aminmax(t) for t in flat]
    cols = torch.stack([t.sum() for t in flat] + [b.max for b in bounds] + [b.min for b in bounds]
                       + list(torch._foreach_norm(signs)) + list(torch._foreach_norm(flat)))
    total, hi, lo, sign_norm, norm = cols.view(5, -1)
    nonzero = sign_norm.double().square().round()  # ||sign g||^2: the number of non-zero entries
    return _grad_columns(numel, total, norm, torch.maximum(hi, -lo), nonzero)


@torch.no_grad()
def zero_fractions(tensors: Sequence[Tensor]) -> Tensor:
    """[L]: fraction of exact zeros per tensor, counted exactly (NaN and Inf are not zeros)."""
    return torch.stack([(t == 0).sum() / t.numel() for t in tensors]).float()


@torch.no_grad()
def nonfinite_counts(tensors: Sequence[Tensor]) -> Tensor:
    """[L]: number of NaN/Inf entries per tensor (only worth its cost when a norm came out non-finite)."""
    return torch.stack([(~torch.isfinite(t)).sum() for t in tensors]).float()


@torch.no_grad()
def weight_stats(after: Sequence[Tensor], delta: Sequence[Tensor]) -> Tensor:
    """[L, 3]: mean and std of the weights after the step, and the step's relative size ||delta|| / ||W_after||
    (delta = W_after - W_before, or its negative)."""
    numel = torch.tensor([t.numel() for t in after], dtype=torch.float64, device=after[0].device)
    cols = torch.stack([t.sum() for t in after] + list(torch._foreach_norm(list(after)))
                       + list(torch._foreach_norm(list(delta))))
    total, norm, step = cols.view(3, -1)
    mean, std = _mean_std(numel, total, norm)
    return torch.stack([mean, std, step.double() / norm.double().clamp_min(1e-30)], dim=-1).float()
