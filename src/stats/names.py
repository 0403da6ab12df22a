"""The names that are an API: the per-layer statistics (trace columns and MLflow keys) and the run-level
metrics derived from them. Change them here, in the README's metrics table and in docs/metrics.md at once."""
from __future__ import annotations

import math

import numpy as np

GRAD_STATS = ("grad_norm", "grad_mean", "grad_std", "grad_absmax", "grad_zero_frac")
ACT_STATS = ("act_mean", "act_std", "act_saturation")
WEIGHT_STATS = ("weight_mean", "weight_std")
# Columns of the per-layer table and of the dense trace, in order. grad_nonfinite counts the NaN/Inf entries
# of the weight gradient (0 on a healthy step); update_ratio is ||dW|| / ||W|| of the step taken.
LAYER_STATS = GRAD_STATS + ("grad_nonfinite", "backprop_norm") + ACT_STATS + WEIGHT_STATS + ("update_ratio",)
COLUMN = {name: j for j, name in enumerate(LAYER_STATS)}

LAYER = "/layer_"  # what separates a statistic from its layer in a metric key


def layer_key(stat: str, layer: int) -> str:
    """The metric key of one statistic of one layer, e.g. grad_norm/layer_03 (layers numbered from the
    input): the MLflow UI groups the keys of one statistic, so all layers share a chart."""
    return f"{stat}{LAYER}{layer:02d}"


def is_layer_key(key: str) -> bool:
    return LAYER in key


def backprop_ratio(backprop_norms: np.ndarray) -> float:
    """Signal arriving at the first hidden layer relative to the last hidden layer: ||dL/ds|| of the first
    recorded layer over that of the one before the output layer (the last). Tiny: the signal vanished on its
    way down; huge: it exploded. NaN without two hidden layers."""
    bp = np.asarray(backprop_norms, dtype=np.float64)
    if bp.size < 3:
        return math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(bp[0] / bp[-2])


def layer_metrics(values: np.ndarray, act_layers: set[int]) -> dict[str, float]:
    """The browsable metrics of one step from its [layers, LAYER_STATS] table, plus backprop_ratio; layers
    without an activation module after them (the output layer) get no act_* keys."""
    out = {}
    for j, stat in enumerate(LAYER_STATS):
        skip = stat in ACT_STATS
        for i in range(values.shape[0]):
            if not (skip and i not in act_layers):
                out[layer_key(stat, i)] = float(values[i, j])
    ratio = backprop_ratio(values[:, COLUMN["backprop_norm"]])
    if not math.isnan(ratio):
        out["backprop_ratio"] = ratio
    return out
