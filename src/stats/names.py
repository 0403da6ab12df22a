"""The names that are an API: the per-module statistics (trace columns and MLflow keys) and the run-level
metrics derived from them. Change them here, in the README's metrics table and in docs/metrics.md at once.

A per-module MLflow key is `<statistic>/<module path>` (`grad_norm/encoder.layers.0.linear1`, and for the
built-in MLP, whose Linear layers are named `layer_00` ... from the input, `grad_norm/layer_03`): the MLflow UI
groups the keys of one statistic, so every module's values of it sit side by side.
"""
from __future__ import annotations

import math

import numpy as np

GRAD_STATS = ("grad_norm", "grad_mean", "grad_std", "grad_absmax", "grad_zero_frac")
ACT_STATS = ("act_mean", "act_std", "act_saturation")
WEIGHT_STATS = ("weight_mean", "weight_std")
# Columns of the per-module table and of the dense trace, in order. grad_nonfinite counts the NaN/Inf entries
# of the weight gradient (0 on a healthy step); update_ratio is ||dW|| / ||W|| of the step taken.
LAYER_STATS = GRAD_STATS + ("grad_nonfinite", "backprop_norm") + ACT_STATS + WEIGHT_STATS + ("update_ratio",)
COLUMN = {name: j for j, name in enumerate(LAYER_STATS)}
# Per-module families besides LAYER_STATS: each key is `<family>/<module path>`.
MODULE_FAMILIES = LAYER_STATS + ("backprop_time_ratio", "theory/chi1", "theory/measured_chi1",
                                 "weight_change/mean_abs", "weight_change/total_over_lr", "weight_change/pct_median")


def mlp_layer(i: int) -> str:
    """The name of the built-in MLP's i-th Linear layer (from the input; the head is the last)."""
    return f"layer_{i:02d}"


def module_key(stat: str, module: str) -> str:
    return f"{stat}/{module}"


def layer_key(stat: str, layer: int) -> str:
    """The key of one statistic of the built-in MLP's layer number `layer`, e.g. grad_norm/layer_03."""
    return module_key(stat, mlp_layer(layer))


def is_module_key(key: str) -> bool:
    """A per-module key (`grad_norm/layer_03`), as opposed to a run-level one (`backprop_ratio`, `val/acc`)."""
    return any(key.startswith(f + "/") for f in MODULE_FAMILIES)


def backprop_ratio(backprop_norms: np.ndarray, layers: list[int]) -> float:
    """Signal arriving at the first layer relative to the last hidden layer: ||dL/ds|| of the first of
    `layers` (indexes into backprop_norms, input to output) over that of the last but one (the last is the
    output layer). Tiny: the signal vanished on its way down; huge: it exploded. NaN without two hidden
    layers."""
    if len(layers) < 3:
        return math.nan
    bp = np.asarray(backprop_norms, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(bp[layers[0]] / bp[layers[-2]])


def jacobian_spread(max_sv: float, mean_sq_sv: float) -> float:
    """max sigma^2 / mean sigma^2 of the input-output Jacobian's singular values (the metrics jacobian/max_sv and
    jacobian/mean_sq_sv): 1 at an exact isometry, large for a spread spectrum; NaN without a positive mean."""
    max_sv, mean_sq_sv = float(max_sv), float(mean_sq_sv)
    return max_sv * max_sv / mean_sq_sv if mean_sq_sv > 0 else math.nan


def module_metrics(values: np.ndarray, modules: list[str], act_rows: set[int], layers: list[int]) -> dict[str, float]:
    """The browsable metrics of one step from its [modules, LAYER_STATS] table, plus backprop_ratio; modules
    without an activation after them (the output layer, a norm) get no act_* keys."""
    out = {}
    for j, stat in enumerate(LAYER_STATS):
        skip = stat in ACT_STATS
        for i, name in enumerate(modules):
            if not (skip and i not in act_rows):
                out[f"{stat}/{name}"] = float(values[i, j])
    ratio = backprop_ratio(values[:, COLUMN["backprop_norm"]], layers)
    if not math.isnan(ratio):
        out["backprop_ratio"] = ratio
    return out
