"""PNG figures of one run, drawn from the dense trace and the run-level scalar history."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402


def _save(fig, path: Path, title: str = "") -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _layer_colors(n: int):
    return plt.cm.viridis(np.linspace(0, 0.95, n))


def gradient_flow(trace: dict, path: Path, title: str = "") -> Path:
    """Heatmap of ||dL/ds|| per layer (rows, input at the bottom) over steps, log colour scale."""
    bp = trace["backprop_norm"].T  # [L, T]
    finite = bp[np.isfinite(bp) & (bp > 0)]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    if finite.size:
        steps = trace["steps"]
        im = ax.imshow(np.where(bp > 0, bp, np.nan), aspect="auto", origin="lower", interpolation="nearest",
                       norm=LogNorm(vmin=finite.min(), vmax=finite.max()), cmap="magma",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, bp.shape[0] - 0.5))
        fig.colorbar(im, ax=ax, label="backprop_norm  ||dL/ds||")
    ax.set(xlabel="step", ylabel="layer (0 = input side)", title=title or "gradient flow")
    return _save(fig, path)


def layer_curves(trace: dict, path: Path, stats: tuple[str, ...], log: bool = True, title: str = "") -> Path:
    """One panel per statistic, one line per layer."""
    fig, axes = plt.subplots(1, len(stats), figsize=(5.2 * len(stats), 4), squeeze=False)
    steps = trace["steps"]
    n_layers = trace[stats[0]].shape[1]
    for ax, stat in zip(axes[0], stats):
        for layer, color in zip(range(n_layers), _layer_colors(n_layers)):
            ax.plot(steps, trace[stat][:, layer], color=color, lw=1, label=f"layer {layer:02d}")
        ax.set(xlabel="step", title=stat)
        if log:
            ax.set_yscale("log")
    axes[0][-1].legend(fontsize=7, ncol=2, loc="best")
    return _save(fig, path, title)


def training_curves(history: dict[str, list[tuple[int, float]]], path: Path, title: str = "") -> Path:
    """Loss and accuracy, train and validation."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, what in zip(axes, ("loss", "acc")):
        for split, style in (("train", "-"), ("val", "o-")):
            pts = history.get(f"{split}/{what}", [])
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, style, ms=3, label=split)
        ax.set(xlabel="step", title=what)
        ax.legend()
    return _save(fig, path, title)


def draw_all(trace: dict | None, history: dict, out_dir: Path, title: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [training_curves(history, out_dir / "curves.png", title)]
    if trace is not None and len(trace["steps"]):
        paths += [
            gradient_flow(trace, out_dir / "gradient_flow.png", title),
            layer_curves(trace, out_dir / "layer_norms.png", ("grad_norm", "backprop_norm"), True, title),
            layer_curves(trace, out_dir / "saturation.png", ("act_saturation",), False, title),
        ]
    return paths


EPOCH_STATS = ("weight_mean", "weight_std", "grad_mean", "grad_std")


def epoch_stats(trace: dict, steps_per_epoch: int, csv_path: Path, png_path: Path | None = None,
                title: str = "") -> list[Path]:
    """Seed 003's per-epoch view from the dense trace: each layer's weight mean/std at the end of each
    epoch and weight-gradient mean/std at the first step of each epoch (where the seed samples them).
    Writes the CSV, and the figure too when png_path is given."""
    steps = trace["steps"]
    epoch = steps // max(1, steps_per_epoch)
    epochs = np.unique(epoch)
    first = np.searchsorted(epoch, epochs, side="left")
    last = np.searchsorted(epoch, epochs, side="right") - 1
    n_layers = trace["weight_mean"].shape[1]
    rows = []
    for e, f, l in zip(epochs, first, last):
        for layer in range(n_layers):
            rows.append([int(e), layer] + [float(trace[s][l if s.startswith("weight") else f, layer])
                                           for s in EPOCH_STATS])
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w") as f:
        f.write("epoch,layer," + ",".join(EPOCH_STATS) + "\n")
        f.writelines(",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in r) + "\n" for r in rows)
    if png_path is None:
        return [csv_path]
    png_path.parent.mkdir(parents=True, exist_ok=True)
    table = np.array([r[2:] for r in rows]).reshape(len(epochs), n_layers, len(EPOCH_STATS))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, j, stat in zip(axes.flat, range(len(EPOCH_STATS)), EPOCH_STATS):
        for layer, color in zip(range(n_layers), _layer_colors(n_layers)):
            ax.plot(epochs, np.abs(table[:, layer, j]) if stat == "grad_std" else table[:, layer, j],
                    color=color, lw=1, label=f"layer {layer:02d}")
        ax.set(title=stat, xlabel="epoch")
        if stat == "grad_std":
            ax.set_yscale("log")
    axes[0][1].legend(fontsize=7, ncol=2)
    return [csv_path, _save(fig, png_path, title)]


def weight_change(steps: list[int], mean_abs: list, path: Path, title: str = "") -> Path:
    """Seed 000's figure: each layer's mean |ΔW| per step, log scale."""
    values = np.array(mean_abs)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 4))
    for layer, color in zip(range(values.shape[1]), _layer_colors(values.shape[1])):
        ax.plot(steps, values[:, layer], color=color, lw=0.8, label=f"layer {layer:02d}")
    ax.set(xlabel="step", ylabel="mean |ΔW|", yscale="log", title=title or "weight change per step")
    ax.legend(fontsize=7)
    return _save(fig, path)
