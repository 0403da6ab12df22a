"""Mean-field theory at initialisation: the predicted per-layer back-propagation factor and depth scale.

For an MLP s_l = W_l x_{l-1} + b_l, x_l = f(s_l) with iid weights, the pre-activations are Gaussian in the
wide limit with variance q_l = sigma_w,l^2 E[f(s_{l-1})^2] + sigma_b,l^2 (q_0 from the data's second moment),
and the back-propagated signal's squared norm changes from layer l+1 to layer l by

    chi1_l = n_l Var(W_{l+1}) E[f'(s_l)^2],   s_l ~ N(0, q_l)

(Schoenholz et al. 2017; n_l is the width of layer l, the fan-in of W_{l+1}). So
||dL/ds_l|| / ||dL/ds_{l+1}|| ~ sqrt(chi1_l); the signal reaching the input side of a depth-D net is about
chi1^(D/2) of the top's, and the depth scale xi = 1 / |ln chi1| (infinite at chi1 = 1) says over how many
layers it changes by e. Nets train up to a depth of roughly 6 xi.

sigma_w^2 = fan_in * mean(W^2) and sigma_b^2 = mean(b^2) are read from the weights as initialised, so every
init in the registry (and any user init) is covered: for He that is 2, for LeCun 1, for Xavier
2 fan_in / (fan_in + fan_out). Gaussian expectations use Gauss-Hermite quadrature with an even number of
nodes, so there is no node at the kink of relu-like activations and E[relu'(s)^2] = 1/2 exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from src.models.registry import ACTIVATIONS, lookup
from src.stats.modules import kind_of, linear_layers
from src.stats.names import mlp_layer, module_key

N_NODES = 128  # even: no node at 0 (relu's kink); 128 nodes integrate smooth activations to ~1e-12


@dataclass(frozen=True)
class Prediction:
    q: list[float]       # pre-activation variance of each hidden layer
    chi1: list[float]    # per hidden layer l: predicted ||dL/ds_l||^2 / ||dL/ds_{l+1}||^2
    depth_scale: float   # 1 / |ln chi1| of the geometric mean of the hidden-to-hidden chi1 (inf at exactly 1)


def gaussian_mean(fn, q: float) -> float:
    """E[fn(s)] for s ~ N(0, q), fn a torch function (probabilists' Gauss-Hermite quadrature)."""
    z, w = np.polynomial.hermite_e.hermegauss(N_NODES)
    s = torch.from_numpy(z * math.sqrt(max(q, 0.0)))
    return float(np.dot(w, fn(s).double().numpy()) / math.sqrt(2 * math.pi))


def depth_scale(chi1: float) -> float:
    return math.inf if chi1 == 1.0 else 1.0 / abs(math.log(chi1))


def not_applicable(net: nn.Module) -> str | None:
    """Why this mean-field theory does not describe `net` (None when it does): it describes stacks of Linear
    layers, each hidden one followed by an activation (norms and skips are treated as absent)."""
    kinds = {kind_of(m) for m in net.modules() if any(True for _ in m.parameters(recurse=False))}
    other = sorted(kinds - {"linear", "norm"})
    if other:
        return f"the mean-field theory here describes MLPs; this model has {', '.join(other)} modules"
    return None


def predict(net: nn.Module, x: Tensor, activation: str, activation_params: dict | None = None) -> Prediction:
    """The prediction for `net` (its Linear layers in order, one registry activation after each hidden one)
    as initialised, fed with inputs like `x` ([samples, features]). Call before training."""
    act = lookup(ACTIVATIONS, "activation", activation)
    f = act.make(**(activation_params or {}))
    linears = linear_layers(net)
    if len(linears) < 2:  # no hidden layer (a single Linear): nothing is back-propagated through an activation
        return Prediction([], [], math.nan)
    with torch.no_grad():
        sw2 = [m.in_features * float(m.weight.double().pow(2).mean()) for m in linears]
        sb2 = [float(m.bias.double().pow(2).mean()) if m.bias is not None else 0.0 for m in linears]
        q = sw2[0] * float(x.double().pow(2).mean()) + sb2[0]  # mean over features of E[x_i^2]
    qs, chi = [], []
    for l in range(len(linears) - 1):
        qs.append(q)
        chi.append(sw2[l + 1] * gaussian_mean(lambda s: act.derivative(s) ** 2, q))
        q = sw2[l + 1] * gaussian_mean(lambda s: f(s) ** 2, q) + sb2[l + 1]
    return Prediction(qs, chi, depth_scale(mean_chi1(chi)) if mean_chi1(chi) > 0 else 0.0)


def mean_chi1(chi: list[float]) -> float:
    """Geometric mean of the hidden-to-hidden factors (the last one, into the output head, has the head's
    own fan-out and is left out when there are others)."""
    inner = np.asarray(chi[:-1] if len(chi) > 1 else chi, dtype=np.float64)
    return float(np.exp(np.mean(np.log(inner)))) if (inner > 0).all() else 0.0


def measured_chi1(backprop_norms: np.ndarray) -> np.ndarray:
    """(||dL/ds_l|| / ||dL/ds_{l+1}||)^2 for each hidden layer l from one step's backprop_norm of the Linear
    layers (input first)."""
    bp = np.asarray(backprop_norms, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (bp[:-1] / bp[1:]) ** 2


def metrics(pred: Prediction, trace: dict | None) -> dict[str, float]:
    """MLflow metrics (step 0): theory/chi1/<layer>, theory/depth_scale, theory/chi1_mean and, from the
    trace's first recorded step when it is step 0, theory/measured_chi1/<layer> (the hidden Linear layers)."""
    if not pred.chi1:
        return {}
    names, bp = linear_columns(trace)
    if len(names) != len(pred.chi1) + 1:  # the trace does not hold every Linear layer (a narrower selection)
        names, bp = [mlp_layer(l) for l in range(len(pred.chi1) + 1)], None
    out = {module_key("theory/chi1", names[l]): c for l, c in enumerate(pred.chi1)}
    out["theory/chi1_mean"] = mean_chi1(pred.chi1)
    out["theory/depth_scale"] = pred.depth_scale if math.isfinite(pred.depth_scale) else 1e300  # MLflow: finite
    if bp is not None and len(trace["steps"]) and trace["steps"][0] == 0:
        for l, m in enumerate(measured_chi1(bp[0])):
            if math.isfinite(m):
                out[module_key("theory/measured_chi1", names[l])] = float(m)
    return out


def linear_columns(trace: dict | None) -> tuple[list[str], np.ndarray | None]:
    """The Linear layers' names and backprop_norm [steps, layers] in the trace (the theory's layers)."""
    if trace is None:
        return [], None
    keep = np.flatnonzero(np.asarray(trace["kinds"]) == "linear")
    return [str(trace["modules"][j]) for j in keep], trace["backprop_norm"][:, keep]
