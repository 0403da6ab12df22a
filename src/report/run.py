"""A run's report.html: the verdict and its reason on top, then the gradient flow, the per-module statistics
(with a module selector), activation saturation, loss and accuracy, the theory overlay, the signal through
time, the histograms and the config. Long runs are thinned to a fixed number of columns per chart, so the page
stays a few hundred KB whatever the number of steps; every value shown is a recorded one, never an average. With
stats.jacobian, the Jacobian's singular values at initialisation (a histogram) follow the theory."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from src.report.page import chart as _chart
from src.report.page import document, esc, fmt, numbers, rows, table

MAX_COLUMNS = 500   # recorded steps per heatmap row
MAX_POINTS = 300    # points per line
MAX_PANELS = 16     # histogram panels per quantity; a bigger model shows evenly spaced modules
CURVES = (("backprop_norm", True), ("grad_norm", True), ("update_ratio", True), ("act_std", True),
          ("act_mean", False), ("grad_zero_frac", False))
HISTOGRAMS = {"grad": "weight gradient dL/dW", "backprop": "back-propagated signal dL/ds", "act": "activation"}
HEADLINE = ("val/acc", "val/loss", "train/loss", "backprop_ratio", "backprop_time_ratio", "time/fit_s")


def thin(n: int, limit: int) -> np.ndarray:
    """Indices of at most `limit` evenly strided items of n, the last one always kept."""
    idx = np.arange(0, n, max(1, -(-n // limit)))
    return idx if n == 0 or idx[-1] == n - 1 else np.append(idx, n - 1)


def write(path: Path, title: str, verdict, metrics: dict[str, float], trace: dict | None, history: dict,
          chi1: list[float] | None = None, hist: dict | None = None, time_trace: dict | None = None,
          config: str = "", jacobian: np.ndarray | None = None) -> Path:
    """Write the report of one run to `path`. `verdict` is src.analysis.verdict.Verdict; `jacobian` the singular
    values at initialisation [inputs, width] (src.analysis.jacobian)."""
    data: dict = {"heatmaps": [], "charts": [], "layers": []}
    sections = [_header(title, verdict, metrics)]
    if trace is not None and len(trace["steps"]):
        sections += [_trace(trace, data), _saturation(trace, data)]
    sections.append(_training(history, data))
    if chi1 and trace is not None and len(trace["steps"]) and trace["steps"][0] == 0:
        sections.append(_theory(chi1, trace, data))
    if jacobian is not None and jacobian.size:
        sections.append(_jacobian(jacobian, data))
    if time_trace:
        sections.append(_through_time(time_trace, data))
    if hist:
        sections.append(_histograms(hist, data))
    if config:
        sections.append(f"<h2>Config</h2><pre>{esc(config)}</pre>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document(f"{title}: {verdict.verdict}", "".join(sections), data))
    return path


def _header(title: str, verdict, metrics: dict[str, float]) -> str:
    shown = [(k, metrics[k]) for k in HEADLINE if k in metrics]
    return (f"<h1>{esc(title)}</h1><div class='verdict {esc(verdict.verdict)}'><b>{esc(verdict.verdict)}</b>"
            f"{esc(verdict.reason)}</div>" + table([k for k, _ in shown], [[fmt(v) for _, v in shown]]))


def _heatmap(into: str, title: str, names, x, values: np.ndarray, label: str, log: bool, cmap: str,
             xlabel: str = "step", height: int | None = None) -> dict:
    """values: [len(names), len(x)], names[0] drawn at the bottom; `height` in CSS pixels (default: by rows)."""
    return {"height": height, "into": into, "title": title, "rows": [str(n) for n in names], "x": [int(s) for s in x],
            "values": rows(values), "label": label, "log": log, "cmap": cmap, "xlabel": xlabel}


def _trace(trace: dict, data: dict) -> str:
    steps, names = trace["steps"], [str(m) for m in trace["modules"]]
    cols, pts = thin(len(steps), MAX_COLUMNS), thin(len(steps), MAX_POINTS)
    data["layers"] = names
    data["heatmaps"].append(_heatmap("flow", "backprop_norm ||dL/ds|| per module (input side at the bottom)",
                                     names, steps[cols], trace["backprop_norm"][cols].T, "||dL/ds||", True,
                                     "magma"))
    for stat, log in CURVES:
        if stat in trace:
            data["charts"].append(_chart("layers", stat, steps[pts],
                                         [(n, trace[stat][pts, j]) for j, n in enumerate(names)], log, "layers"))
    note = "" if len(pts) == len(steps) else f" (one point in {pts[1] - pts[0]} of the {len(steps)} recorded steps)"
    return ("<h2>Gradient flow</h2><p class='muted'>Hover a cell for its value. A row that darkens towards the "
            "bottom is a signal that vanishes on its way to the input; exact zeros are drawn blue.</p>"
            "<div id='flow'></div><h2>Per-module statistics</h2>"
            f"<p class='muted'>Hover a chart for every module's value at that step{esc(note)}.</p>"
            "<div id='selector'></div><div id='layers' class='charts'></div>")


def _saturation(trace: dict, data: dict) -> str:
    if "act_saturation" not in trace or np.isnan(trace["act_saturation"]).all():
        return ""
    steps, names = trace["steps"], [str(m) for m in trace["modules"]]
    cols = thin(len(steps), MAX_COLUMNS)
    data["heatmaps"].append(_heatmap("saturation", "act_saturation: fraction of units with f'(s) below the "
                                     "threshold", names, steps[cols], trace["act_saturation"][cols].T,
                                     "saturated fraction", False, "viridis"))
    return "<h2>Activation saturation</h2><div id='saturation'></div>"


def _training(history: dict, data: dict) -> str:
    for what in ("loss", "acc"):
        pts = {split: history.get(f"{split}/{what}", []) for split in ("train", "val")}
        steps = sorted({s for p in pts.values() for s, _ in p})
        if not steps:
            continue
        at = {s: i for i, s in enumerate(steps)}
        series = []
        for split, p in pts.items():
            y = np.full(len(steps), np.nan)
            for s, v in p:
                y[at[s]] = v
            if p:
                series.append((split, y))
        keep = thin(len(steps), 2 * MAX_POINTS)
        keep = np.union1d(keep, [at[s] for s, _ in pts["val"]]).astype(int)  # every validation point
        data["charts"].append(_chart("training", what, np.asarray(steps)[keep], [(n, y[keep]) for n, y in series],
                                     False, span=True, points=("val",)))
    return "<h2>Loss and accuracy</h2><div id='training' class='charts'></div>"


def _theory(chi1: list[float], trace: dict, data: dict) -> str:
    from src.analysis.theory import linear_columns, measured_chi1

    names, columns = linear_columns(trace)
    if columns is None or len(names) != len(chi1) + 1:
        return ""
    bp = columns[0].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = bp / bp[-1]
    predicted = np.append(np.cumprod(np.sqrt(chi1)[::-1])[::-1], 1.0)
    data["charts"] += [
        _chart("theory", "per-layer factor ||dL/ds_l||² / ||dL/ds_l+1||²", np.arange(len(chi1)),
               [("theory χ1 (mean field)", np.asarray(chi1)), ("measured, step 0", measured_chi1(bp))], True,
               xlabel="hidden layer"),
        _chart("theory", "signal relative to the output layer", np.arange(len(bp)),
               [("theory", predicted), ("measured, step 0", rel)], True, xlabel="layer (output last)"),
    ]
    return ("<h2>Theory</h2><p class='muted'>Mean-field prediction at initialisation next to the measurement; "
            f"layers: {esc(', '.join(names))}.</p><div id='theory' class='charts'></div>")


def _jacobian(sv: np.ndarray, data: dict) -> str:
    from src.analysis.jacobian import histogram, metrics, spread

    edges, frac = histogram(sv)
    m = metrics(sv)
    data["charts"].append(_chart("jacobian", "fraction of the singular values σ per bin", (edges[:-1] + edges[1:]) / 2,
                                 [("σ of dh_L/dh_1", frac)], False, xlabel="log10 σ"))
    return ("<h2>Jacobian spectrum at initialisation</h2><p class='muted'>The singular values σ of the Jacobian of the "
            f"last hidden layer with respect to the first at step 0, {sv.shape[0]} inputs × {sv.shape[1]} "
            "(Pennington et al. 2017): all of them near σ = 1 (log10 σ = 0) is dynamical isometry.</p>"
            + table(["mean σ²", "max σ", "min σ", "max σ² / mean σ²"],
                    [[fmt(m["jacobian/mean_sq_sv"]), fmt(m["jacobian/max_sv"]), fmt(float(np.min(sv))),
                      fmt(spread(sv))]])
            + "<div id='jacobian' class='charts'></div>")


def _through_time(time_trace: dict, data: dict) -> str:
    for module, t in time_trace.items():
        norms, steps = t["norms"], t["steps"]  # [S, T]
        cols = thin(len(steps), MAX_COLUMNS)
        data["heatmaps"].append(_heatmap("time", f"{module}: ||dL/dh_t|| per time step t (t=0 at the bottom)",
                                         [f"t={i}" for i in range(norms.shape[1])], steps[cols],
                                         norms[cols].T, "||dL/dh_t||", True, "magma"))
    return ("<h2>Signal through time</h2><p class='muted'>Blue cells are exactly 0: a float32 signal that "
            "underflowed, kept rather than dropped.</p><div id='time'></div>")


def _histograms(hist: dict, data: dict) -> str:
    edges = hist["edges"]
    bins = [f"{lo:g}…{hi:g}" for lo, hi in zip(edges[:-1], edges[1:])]
    parts = []
    for q, what in HISTOGRAMS.items():
        if q not in hist:
            continue
        h = hist[q]
        total = h["counts"].sum(axis=2) + h["zeros"] + h["nonfinite"]  # [T, L]
        frac = h["counts"] / np.maximum(total, 1)[..., None]
        shown = np.unique(np.linspace(0, len(h["layers"]) - 1, min(len(h["layers"]), MAX_PANELS)).round().astype(int))
        for k in shown[::-1]:  # the output side first, as in the gradient flow read top-down
            zeros = h["zeros"][:, k].sum() / max(total[:, k].sum(), 1)
            data["heatmaps"].append(_heatmap(
                f"hist_{q}", f"{h['modules'][k]}: zeros {zeros:.0%}, NaN/Inf {int(h['nonfinite'][:, k].sum())}",
                bins, h["steps"], frac[:, k, :].T, "fraction of entries", False, "viridis", height=180))
        parts.append(f"<details><summary>log10|{esc(what)}|</summary><div id='hist_{q}' class='charts'></div>"
                     "</details>")
    return ("<h2>Histograms</h2><p class='muted'>Per module, the fraction of entries in each log10|x| bin "
            "(rows) at each recorded step.</p>" + "".join(parts))
