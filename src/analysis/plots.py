"""PNG figures of one run, drawn from the dense trace, the histograms, the weight change and the run-level
scalar history.

Figures are matplotlib Figure objects saved to files, never pyplot: no global backend or figure registry is
touched, so importing this module changes nothing in the process.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure


def _figure(**kwargs):
    """(figure, axes) like pyplot.subplots, without pyplot."""
    fig = Figure(figsize=kwargs.pop("figsize"))
    return fig, fig.subplots(**kwargs)


def _save(fig, path: Path, title: str = "") -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _layer_colors(n: int):
    return colormaps["viridis"](np.linspace(0, 0.95, n))


def _names(trace: dict, n: int) -> list[str]:
    """The modules' paths (the trace's `modules`), or their numbers in a trace without them."""
    names = trace.get("modules")
    return [str(m) for m in names] if names is not None and len(names) == n else [f"{i:02d}" for i in range(n)]


def _module_axis(ax, names: list[str]) -> None:
    """Module names as the y tick labels of a modules x steps heatmap, where they fit."""
    if len(names) <= 40:
        ax.set_yticks(range(len(names)), names, fontsize=7 if len(names) > 12 else 8)


def gradient_flow(trace: dict, path: Path, title: str = "") -> Path:
    """Heatmap of ||dL/ds|| per module (rows, input side at the bottom) over steps, log colour scale."""
    bp = trace["backprop_norm"].T  # [L, T]
    finite = bp[np.isfinite(bp) & (bp > 0)]
    fig, ax = _figure(figsize=(9, 4.5))
    if finite.size:
        steps = trace["steps"]
        im = ax.imshow(np.where(bp > 0, bp, np.nan), aspect="auto", origin="lower", interpolation="nearest",
                       norm=LogNorm(vmin=finite.min(), vmax=finite.max()), cmap="magma",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, bp.shape[0] - 0.5))
        fig.colorbar(im, ax=ax, label="backprop_norm  ||dL/ds||")
    ax.set(xlabel="step", ylabel="module (input side at the bottom)", title=title or "gradient flow")
    _module_axis(ax, _names(trace, bp.shape[0]))
    return _save(fig, path)


def layer_curves(trace: dict, path: Path, stats: tuple[str, ...], log: bool = True, title: str = "") -> Path:
    """One panel per statistic, one line per layer."""
    fig, axes = _figure(nrows=1, ncols=len(stats), figsize=(5.2 * len(stats), 4), squeeze=False)
    steps = trace["steps"]
    n_layers = trace[stats[0]].shape[1]
    names = _names(trace, n_layers)
    for ax, stat in zip(axes[0], stats):
        for layer, color in zip(range(n_layers), _layer_colors(n_layers)):
            ax.plot(steps, trace[stat][:, layer], color=color, lw=1, label=names[layer])
        ax.set(xlabel="step", title=stat)
        if log:
            ax.set_yscale("log")
    # beside the last panel: loc="best" searches every line for a free spot, a cost per figure
    axes[0][-1].legend(fontsize=7, ncol=1 if n_layers <= 12 else 2, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path, title)


def training_curves(history: dict[str, list[tuple[int, float]]], path: Path, title: str = "") -> Path:
    """Loss and accuracy, train and validation."""
    fig, axes = _figure(nrows=1, ncols=2, figsize=(10, 4))
    for ax, what in zip(axes, ("loss", "acc")):
        for split, style in (("train", "-"), ("val", "o-")):
            pts = history.get(f"{split}/{what}", [])
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, style, ms=3, label=split)
        ax.set(xlabel="step", title=what)
        ax.legend(loc="upper right" if what == "loss" else "lower right")  # where falling loss / rising acc are not
    return _save(fig, path, title)


def theory_overlay(chi1: list[float], trace: dict, path: Path, title: str = "") -> Path:
    """Mean-field chi1 per hidden layer next to the measured (||dL/ds_l|| / ||dL/ds_l+1||)^2 at step 0, and
    the signal each layer receives relative to the output layer, predicted (product of sqrt chi1) and measured."""
    from src.analysis.theory import linear_columns

    names, columns = linear_columns(trace)
    bp = columns[0].astype(np.float64)
    layers = np.arange(len(chi1))
    with np.errstate(divide="ignore", invalid="ignore"):
        measured = (bp[:-1] / bp[1:]) ** 2
        rel = bp / bp[-1]
    predicted_rel = np.append(np.cumprod(np.sqrt(chi1)[::-1])[::-1], 1.0)
    fig, axes = _figure(nrows=1, ncols=2, figsize=(11, 4))
    axes[0].plot(layers, chi1, "o-", label="theory chi1 (mean field)")
    axes[0].plot(layers, measured, "s--", label="measured, step 0")
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set(xlabel="hidden layer l", yscale="log", title="per-layer factor ||dL/ds_l||^2 / ||dL/ds_l+1||^2")
    axes[1].plot(np.arange(len(bp)), predicted_rel, "o-", label="theory")
    axes[1].plot(np.arange(len(bp)), rel, "s--", label="measured, step 0")
    axes[1].set(xlabel="layer (output last)", yscale="log", title="signal relative to the output layer")
    if len(names) <= 16:
        axes[1].set_xticks(range(len(names)), names, rotation=45, fontsize=7)
    for ax in axes:
        ax.legend()
    return _save(fig, path, title)


MAX_PANELS = 16  # histogram panels per figure; a bigger model shows evenly spaced modules
HISTOGRAM_TITLES = {"grad": "weight gradient dL/dW", "backprop": "back-propagated signal dL/ds",
                    "act": "activation output"}


def histogram_heatmap(hist: dict, quantity: str, path: Path, title: str = "") -> Path:
    """One panel per layer (input layer at the bottom): the fraction of the layer's entries in each log10|x|
    bin (rows) at each recorded step (columns); exact zeros and NaN/Inf are counted apart, in the panel title."""
    h, edges = hist[quantity], hist["edges"]
    steps, layers = h["steps"], h["layers"]
    total = h["counts"].sum(axis=2) + h["zeros"] + h["nonfinite"]  # [T, L]
    frac = h["counts"] / np.maximum(total, 1)[..., None]
    shown = np.unique(np.linspace(0, len(layers) - 1, min(len(layers), MAX_PANELS)).round().astype(int))
    if len(shown) < len(layers):  # a big model: evenly spaced modules, input side to output side
        title = f"{title} ({len(shown)} of {len(layers)} modules)"
        layers, total, frac = layers[shown], total[:, shown], frac[:, shown]
        h = {**h, "zeros": h["zeros"][:, shown], "nonfinite": h["nonfinite"][:, shown],
             "modules": [h["modules"][i] for i in shown] if "modules" in h else None}
    fig, axes = _figure(nrows=len(layers), ncols=1, figsize=(9, 1.3 * len(layers) + 1), sharex=True,
                        squeeze=False)
    for row, j in enumerate(layers[::-1]):
        ax, k = axes[row][0], len(layers) - 1 - row
        im = ax.imshow(frac[:, k, :].T, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis",
                       vmin=0, vmax=1, extent=(steps[0] - 0.5, steps[-1] + 0.5, edges[0], edges[-1]))
        zeros = h["zeros"][:, k].sum() / max(total[:, k].sum(), 1)
        nonfinite = int(h["nonfinite"][:, k].sum())
        ax.set_ylabel(h["modules"][k] if h.get("modules") else f"{j:02d}", fontsize=8)
        ax.text(1.01, 0.5, f"zeros {zeros:.0%}\nNaN/Inf {nonfinite}", transform=ax.transAxes, fontsize=7, va="center")
    axes[-1][0].set_xlabel("step")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="fraction of entries per bin", pad=0.12)
    fig.suptitle(f"{title}: log10|{HISTOGRAM_TITLES[quantity]}|" if title else f"log10|{HISTOGRAM_TITLES[quantity]}|")
    fig.savefig(path, dpi=110)
    return path


def time_flow(time_trace: dict[str, dict], path: Path, title: str = "") -> Path:
    """One heatmap per recurrent module: ||dL/dh_t|| over time steps t (rows, the first at the bottom) at
    each step it was measured (columns), log colour scale. Exact zeros (a float32 signal that underflowed) are
    drawn in their own colour, never dropped."""
    fig, axes = _figure(nrows=len(time_trace), ncols=1, figsize=(9, 3.2 * len(time_trace) + 0.6), squeeze=False)
    cmap = colormaps["magma"].with_extremes(bad="#3b8bd9")  # NaN: used below for the exact zeros
    for ax, (module, t) in zip(axes[:, 0], time_trace.items()):
        norms, steps = t["norms"].T, t["steps"]  # [T, S]
        positive = norms[np.isfinite(norms) & (norms > 0)]
        span = (steps[0] - 0.5, steps[-1] + 0.5) if len(steps) > 1 else (steps[0] - 0.5, steps[0] + 0.5)
        if positive.size:
            im = ax.imshow(np.where(norms > 0, norms, np.nan), aspect="auto", origin="lower", interpolation="nearest",
                           norm=LogNorm(vmin=positive.min(), vmax=positive.max()), cmap=cmap,
                           extent=(*span, 0.5, norms.shape[0] + 0.5))
            fig.colorbar(im, ax=ax, label="||dL/dh_t||")
        zeros = int((norms == 0).sum())
        note = f"; blue: exactly 0 ({zeros} cells, float32 underflow)" if zeros else ""
        ax.set(xlabel="step", ylabel="time step t", title=f"{module}: signal through time{note}")
    return _save(fig, path, title)


def draw_all(trace: dict | None, history: dict, out_dir: Path, title: str, chi1: list[float] | None = None,
             hist: dict | None = None, change: tuple | None = None, time_trace: dict | None = None) -> list[Path]:
    """All figures of a run; `chi1` (the mean-field prediction per hidden layer) adds theory.png, `hist`
    (src.stats.histograms.read_histograms) one hist_<quantity>.png per quantity, `change` (steps, mean |dW|
    per module, names) weight_change.png, `time_trace` (src.stats.trace.read_time_trace) time_flow.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [training_curves(history, out_dir / "curves.png", title)]
    if trace is not None and len(trace["steps"]):
        paths += [
            gradient_flow(trace, out_dir / "gradient_flow.png", title),
            layer_curves(trace, out_dir / "layer_norms.png", ("grad_norm", "backprop_norm"), True, title),
            layer_curves(trace, out_dir / "saturation.png", ("act_saturation",), False, title),
        ]
        if chi1 and trace["steps"][0] == 0:
            paths.append(theory_overlay(chi1, trace, out_dir / "theory.png", title))
    for q in ("grad", "backprop", "act"):
        if hist is not None and q in hist:
            paths.append(histogram_heatmap(hist, q, out_dir / f"hist_{q}.png", title))
    if change is not None:
        paths.append(weight_change(*change, out_dir / "weight_change.png", title))
    if time_trace:
        paths.append(time_flow(time_trace, out_dir / "time_flow.png", title))
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
    names = _names(trace, n_layers)
    rows = []
    for e, f, l in zip(epochs, first, last):
        for layer in range(n_layers):
            rows.append([int(e), names[layer]] + [float(trace[s][l if s.startswith("weight") else f, layer])
                                                  for s in EPOCH_STATS])
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w") as f:
        f.write("epoch,module," + ",".join(EPOCH_STATS) + "\n")
        f.writelines(",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in r) + "\n" for r in rows)
    if png_path is None:
        return [csv_path]
    png_path.parent.mkdir(parents=True, exist_ok=True)
    table = np.array([r[2:] for r in rows]).reshape(len(epochs), n_layers, len(EPOCH_STATS))
    fig, axes = _figure(nrows=2, ncols=2, figsize=(11, 7), sharex=True)
    for ax, j, stat in zip(axes.flat, range(len(EPOCH_STATS)), EPOCH_STATS):
        for layer, color in zip(range(n_layers), _layer_colors(n_layers)):
            ax.plot(epochs, np.abs(table[:, layer, j]) if stat == "grad_std" else table[:, layer, j],
                    color=color, lw=1, label=names[layer])
        ax.set(title=stat, xlabel="epoch")
        if stat == "grad_std":
            ax.set_yscale("log")
    axes[0][1].legend(fontsize=7, ncol=2)
    return [csv_path, _save(fig, png_path, title)]


def weight_change(steps, mean_abs, names: list[str], path: Path, title: str = "") -> Path:
    """Seed 000's figure: each module's mean |ΔW| per step [steps, modules], log scale."""
    values = np.asarray(mean_abs)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = _figure(figsize=(9, 4))
    for layer, color in zip(range(values.shape[1]), _layer_colors(values.shape[1])):
        ax.plot(steps, values[:, layer], color=color, lw=0.8, label=names[layer])
    ax.set(xlabel="step", ylabel="mean |ΔW|", yscale="log", title=title or "weight change per step")
    ax.legend(fontsize=7)
    return _save(fig, path)


def jacobian_spectrum(sv: np.ndarray, path: Path, title: str = "") -> Path:
    """The singular values sigma of the Jacobian dh_L/dh_1 at initialisation [inputs, width]
    (src.analysis.jacobian), pooled over the inputs: a histogram over log-spaced bins, sigma = 1 marked."""
    from src.analysis.jacobian import FLOOR, histogram, metrics, spread

    edges, frac = histogram(sv)
    m = metrics(sv)
    floored = int((sv < FLOOR * m["jacobian/max_sv"]).sum())
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = _figure(figsize=(7, 4))
    ax.stairs(frac, 10.0 ** edges, fill=True, color=_layer_colors(1)[0], alpha=0.8)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(xscale="log", xlabel="singular value σ", ylabel="fraction of singular values",
           title=title or "input-output Jacobian at initialisation")
    ax.text(0.02, 0.97, f"{sv.shape[0]} inputs × {sv.shape[1]} σ\nmean σ² {m['jacobian/mean_sq_sv']:.3g}\n"
            f"max σ {m['jacobian/max_sv']:.3g}\nmax σ² / mean σ² {spread(sv):.3g}"
            + (f"\n{floored} σ < {FLOOR:g} max σ: in the first bin" if floored else ""),
            transform=ax.transAxes, va="top", fontsize=8, bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
    return _save(fig, path)
