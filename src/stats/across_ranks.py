"""The statistics of a global batch from those of its shards: under DDP each process sees 1/W of every batch,
and its activations and back-propagated signal are those of its shard. Pure math; the callback gathers the
shards' columns (one collective per flush) and hands them here.

A shard's columns per step and module (SHARD_COLUMNS):
  signal_sq   ||dL_r/ds||^2 of the rank's own loss L_r (the mean over its shard)
  count       activation entries seen (samples x units)
  mean, m2    their mean and sum of squared deviations (count x population variance)
  saturated   entries counted saturated
"""
from __future__ import annotations

import torch
from torch import Tensor

SHARD_COLUMNS = ("signal_sq", "count", "mean", "m2", "saturated")


@torch.no_grad()
def shard_columns(signal_sq: Tensor, act: Tensor, count: Tensor) -> Tensor:
    """[n, L, 5] float64 from a shard's signal_sq [n, L], its ACT_STATS [n, L, 3] (act_mean, act_std,
    act_saturation; NaN where a module has no activation) and its activation entries count [n, L]."""
    act, count = act.double(), count.double()
    mean, std, sat = act.unbind(-1)
    return torch.stack([signal_sq.double(), count, mean, std * std * count, sat * count], dim=-1)


@torch.no_grad()
def combine(shards: Tensor) -> tuple[Tensor, Tensor]:
    """(signal_sq [n, L] float64, ACT_STATS [n, L, 3] float32) of the global batch from W shards' columns
    [W, n, L, 5].

    Signal: DDP averages the W ranks' gradients, so the loss it descends is the mean of the ranks' losses,
    L = (1/W) sum_r L_r, and dL/ds = (1/W) dL_r/ds on rank r's samples: ||dL/ds||^2 = sum_r ||dL_r/ds||^2 / W^2
    (for a mean loss over equal shards, exactly the signal of one process on the whole batch).
    Activations: counts add up; the mean is the counts' weighted mean; the variance combines each shard's
    with its mean's distance to the global one (Chan et al.'s pairwise update, without the cancellation of
    sum x^2 - n mean^2); the saturated entries add up. A module without activation (count 0) stays NaN."""
    sq, count, mean, m2, sat = shards.double().unbind(-1)
    w = shards.shape[0]
    total = count.sum(0)
    seen = count > 0  # a shard that saw no entry has NaN statistics; it adds nothing
    g_mean = torch.where(seen, count * mean, 0.0).sum(0) / total
    spread = torch.where(seen, m2 + count * (mean - g_mean) ** 2, 0.0).sum(0)
    g_sat = torch.where(seen, sat, 0.0).sum(0) / total
    act = torch.stack([g_mean, (spread / total).clamp_min(0).sqrt(), g_sat], dim=-1).float()
    return sq.sum(0) / (w * w), act
