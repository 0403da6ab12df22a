"""Views of a sweep report picked from the study's axes: the trainability phase diagram when sigma_w^2 and depth
are swept (with the mean-field theory's depth = 6 xi_c line), and the Jacobian spectrum's spread over depth when
the runs logged it (stats.jacobian)."""
from __future__ import annotations

import math

import pandas as pd

from src.report.page import chart, esc, fmt
from src.stats.names import jacobian_spread

WEIGHT_VAR, DEPTH = "init.weight_var", "model.depth"
CONTEXT = ("activation.name", "init.bias_std")  # the fixed config the theory line needs, from a run's params
SPECTRUM = ("jacobian/max_sv", "jacobian/mean_sq_sv")  # step-0 metrics, kept per point when logged
TRAINS = 0.5  # val/acc: five times chance on a 10-class task; a point at or above it "trains"


def phase(points: pd.DataFrame, params: list[str], context: dict, metric: str, link) -> str:
    """A table of the objective over depth (rows, deepest on top) x sigma_w^2 (columns), the cells beyond the
    theory's line outlined, the line's depth per column in the last row."""
    activation = context.get("activation.name")
    if not ({WEIGHT_VAR, DEPTH} <= set(params)) or len(params) != 2 or not activation:
        return ""
    from src.analysis.phase import correlation_depth, critical_weight_variance

    sb2 = float(context.get("init.bias_std") or 0.0) ** 2
    ws, ds = sorted(points[WEIGHT_VAR].unique()), sorted(points[DEPTH].unique(), reverse=True)
    line = {w: 6 * correlation_depth(activation, float(w), sb2) for w in ws}
    values = points["objective"].astype(float)
    scale = f"data-cmap='viridis' data-log='false' data-lo='{values.min()!r}' data-hi='{values.max()!r}'"
    at = {(p[DEPTH], p[WEIGHT_VAR]): p for p in points.to_dict("records")}

    def cell(d, w) -> str:
        p = at.get((d, w))
        if p is None:
            return "<td data-v=''>–</td>"
        v, beyond = float(p["objective"]), d > line[w]
        tip = f"σ_w²={w}, depth {d}: {metric} {fmt(v)}; theory: {'beyond' if beyond else 'inside'} 6 ξ_c = {fmt(line[w])}"
        return (f"<td class='{'beyond' if beyond else ''}' data-v='{repr(v) if math.isfinite(v) else ''}' "
                f"title='{esc(tip)}'>{link(p['mlflow_run_id'], fmt(v))}</td>")

    head = "".join(f"<th>{esc(w)}</th>" for w in ws)
    body = "".join(f"<tr><th>{esc(d)}</th>" + "".join(cell(d, w) for w in ws) + "</tr>" for d in ds)
    foot = "<tr><th>6 ξ_c</th>" + "".join(f"<td>{fmt(line[w])}</td>" for w in ws) + "</tr>"
    note = ""
    if metric == "val/acc":
        right = [(d <= line[w]) == (float(p["objective"]) >= TRAINS) for (d, w), p in at.items()]
        note = (f" {sum(right)} of {len(right)} points are on the side the theory predicts (trains: {metric} ≥ "
                f"{TRAINS}).")
    try:
        crit = f"critical σ_w² {fmt(critical_weight_variance(activation, sb2))}"
    except ValueError:
        crit = "no critical σ_w²"
    return (f"<h2>Phase diagram</h2><p class='muted'>{esc(metric)} over depth × σ_w² ({esc(activation)}, "
            f"σ_b² = {fmt(sb2)}, {crit}). Outlined cells lie beyond the mean-field theory's trainable depth "
            f"6 ξ_c (Schoenholz et al. 2017), given in the last row.{esc(note)}</p>"
            f"<div class='scalebar' {scale}></div><table class='heat phase' {scale}><thead><tr><th>depth \\ σ_w²"
            f"</th>{head}</tr></thead><tbody>{body}{foot}</tbody></table>")


def spectrum(points: pd.DataFrame, params: list[str], data: dict) -> str:
    """Charts of the Jacobian's max sigma^2 / mean sigma^2 and mean sigma^2 at step 0 over depth, one line per
    value of the other axes."""
    top, msq = SPECTRUM
    if DEPTH not in params or top not in points or points[top].isna().all():
        return ""
    others = [p for p in params if p != DEPTH]
    depths = sorted(points[DEPTH].unique())
    spread, mean = [], []
    for key, group in (points.groupby(others) if others else [((), points)]):
        label = ", ".join(f"{k}={v}" for k, v in zip(others, key if isinstance(key, tuple) else (key,))) or "all"
        by = group.set_index(DEPTH)
        spread.append((label, [jacobian_spread(by[top].get(d, math.nan), by[msq].get(d, math.nan)) for d in depths]))
        mean.append((label, [float(by[msq].get(d, math.nan)) for d in depths]))
    labels = tuple(label for label, _ in spread)
    data.setdefault("charts", []).extend([
        chart("spectrum", "max σ² / mean σ² of the input-output Jacobian (1: isometry)", depths, spread, True,
              xlabel="depth", span=True, points=labels),
        chart("spectrum", "mean σ² (the theory: χ₁^(L−1))", depths, mean, True, xlabel="depth", span=True,
              points=labels)])
    return ("<h2>Jacobian spectrum at initialisation</h2><p class='muted'>The singular values σ of the Jacobian of "
            "the last hidden layer with respect to the first, at step 0 (Pennington et al. 2017): a spread "
            "near 1 at every depth is dynamical isometry.</p><div id='spectrum' class='charts'></div>")
