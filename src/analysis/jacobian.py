"""The input-output Jacobian's singular values at initialisation (Pennington, Schoenholz & Ganguli 2017).

For an MLP with hidden blocks h_l = f(W_l h_{l-1} + b_l), l = 1..L, the Jacobian J = dh_L / dh_1 is the
product of the blocks 2..L's D_l W_l (D_l: diag f'(s_l)). The first block, from the input features to the
width, is left out so that J is width x width, as in the paper. Its mean squared singular value is about
chi1^(L-1) (src/analysis/theory.py); dynamical isometry is every singular value near 1, which at chi1 = 1
orthogonal weights on tanh give and Gaussian weights or any ReLU do not.

J is exact, per input, by torch.func.jacrev over the blocks as MLP.forward runs them (norms and skips
included), vmapped over the first N_INPUTS training inputs pushed through block 1, on a float64 copy of the
net; norms run in eval mode (their running statistics at init: the identity), so one input needs no batch.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.func import jacrev, vmap

from src.models.mlp import MLP
from src.stats.names import jacobian_spread, mlp_layer

N_INPUTS = 32  # inputs the spectrum is pooled over: 32 x width singular values
BINS = 40      # histogram bins, evenly spaced in log10 sigma between the smallest and the largest
FLOOR = 1e-12  # relative to the largest sigma: smaller ones (0 included) are counted in the histogram's first bin


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
    """[inputs, min(width)] singular values of dh_L/dh_1 at the first `n` inputs of `x`, largest first (float64;
    `net` itself is left as it was)."""
    net64 = copy.deepcopy(net).double().eval()
    with torch.no_grad():
        h1 = _block(net64, 0, x[:n].to(next(net64.parameters()).device, torch.float64))

    def upper(h: Tensor) -> Tensor:
        h = h.unsqueeze(0)
        for i in range(1, net64.depth):
            h = _block(net64, i, h)
        return h.squeeze(0)

    jac = vmap(jacrev(upper))(h1)
    return torch.linalg.svdvals(jac.detach()).cpu().numpy()


def at_init(enabled: bool, net, x: Tensor) -> tuple[np.ndarray | None, str | None]:
    """(the spectrum, why there is none) of `net` as initialised, fed the training inputs `x`; (None, None) when
    `enabled` (stats.jacobian) is off."""
    if not enabled:
        return None, None
    why = not_applicable(net)
    return (None, why) if why else (singular_values(net, x), None)


def metrics(sv: np.ndarray) -> dict[str, float]:
    """jacobian/mean_sq_sv: the mean of sigma^2 over singular values and inputs; jacobian/max_sv: the largest."""
    return {"jacobian/mean_sq_sv": float(np.mean(sv ** 2)), "jacobian/max_sv": float(np.max(sv))}


def spread(sv: np.ndarray) -> float:
    """max sigma^2 / mean sigma^2 of these singular values: 1 at an exact isometry (NaN when every sigma is 0)."""
    return jacobian_spread(np.max(sv), np.mean(sv ** 2))


def histogram(sv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(BINS + 1 edges in log10 sigma, the fraction of the singular values in each bin): the smallest to the
    largest, sigma below FLOOR x the largest (0 included) counted in the first bin."""
    top = float(np.max(sv)) if sv.size else 1.0
    logs = np.log10(np.maximum(sv.ravel(), top * FLOOR if top > 0 else 1e-300))
    lo, hi = float(logs.min()), float(logs.max())
    if hi - lo < 1e-3:  # an exact isometry: one narrow bin around its value
        lo, hi = lo - 5e-4, hi + 5e-4
    counts, edges = np.histogram(logs, bins=BINS, range=(lo, hi))
    return edges, counts / max(logs.size, 1)


def write_csv(sv: np.ndarray, path: Path) -> Path:
    """One row per input, its singular values largest first (columns sv_000, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ",".join(f"sv_{j:03d}" for j in range(sv.shape[1]))
    np.savetxt(path, sv, delimiter=",", header=header, comments="", fmt="%.6g")
    return path


def record(run, sv: np.ndarray | None, why_not: str | None, out_dir: Path, draw: bool, title: str) -> None:
    """Into the TrackedRun `run`: the metrics at step 0 and jacobian/spectrum.csv, with `draw` the figure
    plots/jacobian_spectrum.png; or the tag `jacobian` saying why there is no spectrum."""
    if why_not:
        run.writer.set_tags({"jacobian": f"not applicable: {why_not}"})
    if sv is None:
        return
    run.writer.log_metrics(metrics(sv), 0)
    run.log_artifact(write_csv(sv, out_dir / "jacobian" / "spectrum.csv"), "jacobian")
    if draw:
        try:
            from src.analysis import plots  # matplotlib: imported only when PNGs are asked for

            run.log_artifact(plots.jacobian_spectrum(sv, out_dir / "plots" / "jacobian_spectrum.png", title), "plots")
        except Exception as e:  # noqa: BLE001
            print(f"plots: could not draw the Jacobian spectrum: {e}", file=sys.stderr)
