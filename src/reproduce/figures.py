"""The papers' figures, redrawn from our runs (docs/results/<preset>.png): the phase diagram with the theory's
6 xi_c line, the Jacobian spectrum's spread over depth, epochs to learn over depth, per-layer activations."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from src.analysis import phase
from src.reproduce import papers
from src.reproduce.columns import Row, last, swept


def _figure(ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(5.2 * ncols, 4), squeeze=False)


def _save(fig, path: Path, title: str) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)


def trainability(rows: list[Row], path: Path) -> None:
    """val/acc over (sigma_w^2, depth) as coloured dots, the theory's depth = 6 xi_c as a line."""
    fig, ax = _figure()
    ax = ax[0, 0]
    x = [papers._p(r, "init.weight_var") for r in rows]
    y = [papers._p(r, "model.depth") for r in rows]
    acc = [last("val/acc")(r) or 0.0 for r in rows]
    dots = ax.scatter(x, y, c=acc, cmap="viridis", vmin=0, vmax=1, s=160, edgecolors="k")
    fig.colorbar(dots, ax=ax, label="val/acc (final)")
    act, sb2 = rows[0]["params"]["activation.name"], papers._p(rows[0], "init.bias_std") ** 2
    grid = np.linspace(min(x) * 0.9, max(x) * 1.05, 80)
    line = [6 * phase.correlation_depth(act, g, sb2) for g in grid]
    ax.plot(grid, line, "r-", label="6 ξ_c (mean-field theory)")
    ax.axvline(phase.critical_weight_variance(act, sb2), color="r", ls=":", label="critical σ_w²")
    ax.set(xlabel="σ_w²", ylabel="depth", yscale="log", ylim=(min(y) / 1.5, max(y) * 3))
    ax.legend(loc="upper right", fontsize=8)
    _save(fig, path, f"trainability: {act}, σ_b² = {sb2:.2g}")


def isometry(rows: list[Row], path: Path) -> None:
    """The Jacobian's max sigma^2 / mean sigma^2 (left) and mean sigma^2 (right) over depth, per cell."""
    fig, axes = _figure(2)
    for act in ("tanh", "relu"):
        for init, style in (("critical_orthogonal", "-o"), ("critical", "--s")):
            cells = papers._cells(rows, act, init)
            if not cells:
                continue
            d = [papers._p(r, "model.depth") for r in cells]
            axes[0, 0].plot(d, [papers.spread(r) for r in cells], style, label=f"{act} / {init}")
            axes[0, 1].plot(d, [papers.first("jacobian/mean_sq_sv")(r) for r in cells], style, label=f"{act} / {init}")
    axes[0, 0].set(xlabel="depth", ylabel="max σ² / mean σ² (step 0)", xscale="log", yscale="log")
    axes[0, 1].set(xlabel="depth", ylabel="mean σ² (step 0)", xscale="log", yscale="log")
    axes[0, 0].axhline(1, color="grey", lw=0.5)
    axes[0, 1].axhline(1, color="grey", lw=0.5)
    axes[0, 0].legend(fontsize=8)
    _save(fig, path, "isometry: the input-output Jacobian at criticality")


def deep_linear(rows: list[Row], path: Path) -> None:
    """Epochs to the loss level over depth, per init; never reached is drawn at the run's length."""
    fig, ax = _figure()
    ax = ax[0, 0]
    longest = max(len(r["history"]("val/loss")) for r in rows)
    for init, style in (("orthogonal", "-o"), ("gaussian", "--s")):
        cells = papers._by_depth(rows, init)
        e = [papers.epochs_to_level(r) for r in cells]
        ax.plot([papers._p(r, "model.depth") for r in cells], [v if math.isfinite(v) else longest for v in e],
                style, label=init)
    ax.set(xlabel="depth", ylabel=f"epochs to val/loss < {papers.LOSS_LEVEL}", xscale="log")
    ax.legend()
    _save(fig, path, "deep linear nets (lr ∝ 1/depth)")


def glorot_saturation(rows: list[Row], path: Path) -> None:
    """Per-layer mean activation (sigmoid, as the paper's figure 2) and saturated fraction (tanh) over steps."""
    fig, axes = _figure(2)
    for ax, act, stat in ((axes[0, 0], "sigmoid", "act_mean"), (axes[0, 1], "tanh", "act_saturation")):
        r = next((r for r in rows if swept(r).get("activation") == act), None)
        if r is None:
            continue
        for m in papers.hidden(r):
            h = r["history"](f"{stat}/{m}")
            ax.plot([s for s, _ in h], [v for _, v in h], label=m)
        ax.set(xlabel="step", ylabel=stat, title=act)
        ax.legend(fontsize=8)
    _save(fig, path, "Glorot & Bengio's figures 2-3, redrawn")

