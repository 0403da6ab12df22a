"""A sweep's report.html: a summary line, heatmaps of the objective and of the initial back-propagation ratio
over the swept axes as HTML tables (one small table per value of the other axes, all on one colour scale, each
cell linking to its MLflow run), then a sortable table of every point. Tables rather than pictures: labels
cannot overlap, every value is text, and the page stays a few tens of KB."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from src.report import views
from src.report.page import document, esc, fmt, table
from src.tracking.urls import page_route, ui_base

# Rows and columns of the heatmaps when these are swept (the product's main study); the rest are facets.
PREFERRED_AXES = ("activation", "init")
# A sampled space (TPE) has one facet per trial: past this many, the table of points says it better.
MAX_FACETS = 12
SUCCESS = ("COMPLETE", "FINISHED")  # an Optuna trial's, an MLflow run's


def write(path: Path, title: str, points: pd.DataFrame, params: list[str], metric: str, direction: str,
          uri: str = "", experiment_id: str = "", context: dict | None = None) -> Path:
    """Write the report of a sweep to `path`. `points`: one row per point, with its params and the columns
    state, objective, verdict, backprop_ratio_init, seconds, attempts, error, mlflow_run_id. With the tracking
    `uri` and the runs' `experiment_id`, every point with a run links to the run's page in the MLflow UI."""
    def link(run_id: str, text: str) -> str:
        if not (run_id and uri and experiment_id):
            return text
        route = page_route(experiment_id, run_id)  # report.js points it at the MLflow that shows the page
        return f"<a href='{esc(ui_base(uri) + route)}' data-route='{esc(route)}'>{text}</a>"

    points = points.sort_values(params, ignore_index=True) if params else points
    body, data = _summary(title, points, params, metric, direction, link), {}
    if not points.empty:
        body += (views.phase(points, params, context or {}, metric, link) + views.spectrum(points, params, data)
                 + _heatmaps(points, params, "objective", metric, False, "viridis", link)
                 + _heatmaps(points, params, "backprop_ratio_init", "backprop_ratio at step 0", True, "magma", link)
                 + _points(points, params, metric, link))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document(title, body, data))
    return path


def _summary(title: str, points: pd.DataFrame, params: list[str], metric: str, direction: str, link) -> str:
    head = f"<h1>{esc(title)}</h1><p>objective {esc(metric)} ({esc(direction)})"
    if points.empty:
        return head + ": no trials yet</p>"
    head += f" · {len(points)} points, {int(points['attempts'].sum())} trials"
    done = points[points["objective"].notna()]
    if done.empty:
        return head + f" · none has a value of {esc(metric)}</p>"
    best = done.loc[done["objective"].idxmax() if direction == "maximize" else done["objective"].idxmin()]
    return (head + f" · best {link(best['mlflow_run_id'], esc(_point(best, params)))}: {esc(metric)} "
            f"<b>{fmt(best['objective'])}</b> ({esc(best['verdict'] or 'no verdict')})</p>")


def _point(p, params: list[str]) -> str:
    return ", ".join(f"{k}={p[k]}" for k in params)


def _values(column: pd.Series) -> list:
    return list(pd.unique(column.sort_values()))


def _heatmaps(points: pd.DataFrame, params: list[str], column: str, label: str, log: bool, cmap: str,
              link) -> str:
    """Rows x columns of the two main axes (the preferred ones first), one table per value of the others."""
    values = points[column].astype(float)
    shown = values[values > 0] if log else values  # a log scale has no place for 0
    axes = ([p for p in PREFERRED_AXES if p in params] + [p for p in params if p not in PREFERRED_AXES])[:2]
    facets = [p for p in params if p not in axes]
    groups = list(points.groupby(facets, dropna=False)) if facets else [((), points)]
    if not axes or shown.isna().all() or len(groups) > MAX_FACETS:
        return ""
    rows, cols = axes[0], axes[1] if len(axes) > 1 else None
    row_values, col_values = _values(points[rows]), _values(points[cols]) if cols else [None]
    scale = (f"data-cmap='{cmap}' data-log='{str(log).lower()}' data-lo='{float(shown.min())!r}' "
             f"data-hi='{float(shown.max())!r}'")

    def cell(p) -> str:
        if p is None:
            return "<td data-v=''>–</td>"
        v = float(p[column])
        ok = math.isfinite(v)
        tip = f"{_point(p, params)}\n{label} {fmt(v)}\nverdict {p['verdict'] or '–'} ({p['state']})"
        text = fmt(v) if ok else "–" if p["state"] in SUCCESS else esc(p["state"].lower())
        return f"<td data-v='{repr(v) if ok else ''}' title='{esc(tip)}'>{link(p['mlflow_run_id'], text)}</td>"

    tables = []
    for key, group in groups:
        at = {(p[rows], p[cols] if cols else None): p for p in group.to_dict("records")}
        key = key if isinstance(key, tuple) else (key,)
        head = "".join(f"<th>{esc(c)}</th>" for c in col_values) if cols else f"<th>{esc(label)}</th>"
        body = "".join(f"<tr><th>{esc(r)}</th>" + "".join(cell(at.get((r, c))) for c in col_values) + "</tr>"
                       for r in row_values)
        caption = f"<figcaption>{esc(_point(dict(zip(facets, key)), facets))}</figcaption>" if facets else ""
        tables.append(f"<figure>{caption}<table class='heat' {scale}><thead><tr><th></th>{head}</tr></thead>"
                      f"<tbody>{body}</tbody></table></figure>")
    where = (f"rows {esc(rows)}" + (f", columns {esc(cols)}" if cols else "")
             + (f", one table per {esc(', '.join(facets))}" if facets else ""))
    return (f"<h2>{esc(label)}</h2><p class='muted'>{where}; one colour scale{' (log)' if log else ''}. "
            f"Hover a cell for its point and verdict; click it for its MLflow run.</p>"
            f"<div class='scalebar' {scale}></div><div class='charts'>{''.join(tables)}</div>")


def _points(points: pd.DataFrame, params: list[str], metric: str, link) -> str:
    header = [*params, "state", metric, "verdict", "backprop_ratio at step 0", "seconds", "attempts", "error",
              "MLflow run"]
    body = [[*(esc(p[k]) for k in params), esc(p["state"]), (fmt(p["objective"]), p["objective"]),
             esc(p["verdict"]), (fmt(p["backprop_ratio_init"]), p["backprop_ratio_init"]),
             (fmt(p["seconds"]), p["seconds"]), p["attempts"], esc(p["error"]),
             (link(p["mlflow_run_id"], esc(p["mlflow_run_id"][:8])) if p["mlflow_run_id"] else "–",
              p["mlflow_run_id"])]
            for p in points.to_dict("records")]
    return "<h2>Points</h2><p class='muted'>Click a header to sort.</p>" + table(header, body, "sortable")
