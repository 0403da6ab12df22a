"""The mean-field phase diagram of a deep net with iid Gaussian weights (Schoenholz et al. 2017): where on the
(sigma_w^2, sigma_b^2) plane a signal survives depth, and over how many layers.

Weights have variance sigma_w^2 / fan_in and biases sigma_b^2. The pre-activation variance obeys
q_l = sigma_w^2 E[f(sqrt(q_{l-1}) z)^2] + sigma_b^2 and settles at a fixed point q*. Two inputs' pre-activations
have correlation c_l, mapped by c_l q* = sigma_w^2 E[f(u1) f(u2)] + sigma_b^2 with u1, u2 ~ N(0, q*) correlated
c_{l-1}, to a fixed point c*. The slope of that map at c*,

    chi_c = sigma_w^2 E[f'(u1) f'(u2)]   (u1, u2 at q*, c*),

sets the correlation depth scale xi_c = -1 / ln chi_c: how many layers two inputs stay distinguishable. In the
ordered phase c* = 1 and chi_c is chi1 = sigma_w^2 E[f'(sqrt(q*) z)^2]; in the chaotic phase (chi1 > 1) c* < 1.
The critical line chi1 = 1 separates them; there xi_c diverges. A net trains up to a depth of about 6 xi_c.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import brentq

from src.models.registry import ACTIVATIONS, lookup

N_NODES = 64  # per dimension; even (no node at relu's kink). Accurate while q* stays below ~20 (sigma_w^2 up to
# ~10): beyond, f' is a spike narrower than the nodes' spacing
MAX_ITERS, TOL = 5000, 1e-13


def _nodes() -> tuple[np.ndarray, np.ndarray]:
    z, w = np.polynomial.hermite_e.hermegauss(N_NODES)
    return z, w / math.sqrt(2 * math.pi)  # weights of N(0, 1)


# The 1-D means use the 2-D quadrature's nodes, not theory.gaussian_mean's finer ones: with one set of nodes
# c = 1 is exactly a fixed point of the discretised correlation map, which c_fixed_point's bracket relies on.
def _mean(fn, x: np.ndarray, w: np.ndarray) -> float:
    return float(np.dot(w.ravel(), fn(torch.from_numpy(x.ravel())).double().numpy()))


def q_fixed_point(activation: str, sw2: float, sb2: float, q0: float = 1.0) -> float:
    """q* by iterating the variance map from q0 (it converges from any q0 > 0 for bounded activations)."""
    f, (z, w) = lookup(ACTIVATIONS, "activation", activation).make(), _nodes()
    q = q0
    for _ in range(MAX_ITERS):
        new = sw2 * _mean(lambda s: f(s) ** 2, math.sqrt(q) * z, w) + sb2
        if abs(new - q) <= TOL * max(1.0, q):
            return new
        q = new
    return q


def chi1(activation: str, sw2: float, sb2: float) -> float:
    """sigma_w^2 E[f'(s)^2] at q*: > 1 chaotic, < 1 ordered."""
    act, (z, w) = lookup(ACTIVATIONS, "activation", activation), _nodes()
    q = q_fixed_point(activation, sw2, sb2)
    return sw2 * _mean(lambda s: act.derivative(s) ** 2, math.sqrt(q) * z, w)


def _pair(q: float, c: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nodes u1, u2 ~ N(0, q) with correlation c, and their weights (tensor-product quadrature)."""
    z, w = _nodes()
    z1, z2 = np.meshgrid(z, z, indexing="ij")
    u1 = math.sqrt(q) * z1
    u2 = math.sqrt(q) * (c * z1 + math.sqrt(max(0.0, 1 - c * c)) * z2)
    return u1, u2, np.outer(w, w)


def c_fixed_point(activation: str, sw2: float, sb2: float) -> tuple[float, float]:
    """(q*, c*): c* = 1 in the ordered phase; in the chaotic one the root of c_map(c) = c below 1 (c = 1 is
    a fixed point too, but unstable there)."""
    f = lookup(ACTIVATIONS, "activation", activation).make()
    q = q_fixed_point(activation, sw2, sb2)
    if chi1(activation, sw2, sb2) <= 1.0:
        return q, 1.0

    def gap(c: float) -> float:
        u1, u2, w = _pair(q, c)
        return (sw2 * float(np.sum(w * (f(torch.from_numpy(u1)) * f(torch.from_numpy(u2))).numpy())) + sb2) / q - c

    if gap(0.0) <= 0.0:  # sigma_b = 0 and an odd activation: uncorrelated inputs stay uncorrelated
        return q, 0.0
    return q, float(brentq(gap, 0.0, 1.0 - 1e-9, xtol=1e-13))


def chi_c(activation: str, sw2: float, sb2: float) -> float:
    """The slope of the correlation map at its fixed point."""
    act = lookup(ACTIVATIONS, "activation", activation)
    q, c = c_fixed_point(activation, sw2, sb2)
    if c == 1.0:
        return chi1(activation, sw2, sb2)
    u1, u2, w = _pair(q, c)
    d = act.derivative
    return sw2 * float(np.sum(w * (d(torch.from_numpy(u1)) * d(torch.from_numpy(u2))).numpy()))


def correlation_depth(activation: str, sw2: float, sb2: float) -> float:
    """xi_c = -1 / ln chi_c (inf on the critical line)."""
    x = chi_c(activation, sw2, sb2)
    return math.inf if x >= 1.0 else -1.0 / math.log(x)  # chi_c < 1 at a stable fixed point


def critical_weight_variance(activation: str, sb2: float, lo: float = 0.5, hi: float = 8.0) -> float:
    """The sigma_w^2 where chi1 = 1 for this sigma_b^2 (bisection: chi1 grows with sigma_w^2)."""
    if (chi1(activation, lo, sb2) - 1) * (chi1(activation, hi, sb2) - 1) > 0:
        raise ValueError(f"{activation} has no critical sigma_w^2 at sigma_b^2={sb2:g} (chi1 does not cross 1 for "
                         f"sigma_w^2 in [{lo:g}, {hi:g}]): choose another activation or init")
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if chi1(activation, mid, sb2) < 1.0 else (lo, mid)
    return 0.5 * (lo + hi)
