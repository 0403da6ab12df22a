"""The sweep report: one row per grid point (or trial), heatmaps of the objective and of the initial
back-propagation ratio over the swept axes, as CSV + HTML + PNG and as text for the terminal."""
from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from matplotlib.figure import Figure
from optuna.trial import TrialState

from src.sweeps.study import counts, params_of

# Rows and columns of the heatmaps when these are swept (the product's main study); the rest are facets.
PREFERRED_AXES = ("activation", "init")


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """Every trial: its point, state, objective, verdict, initial backprop_ratio, retries and error."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({
            "trial": t.number, **params_of(t), "state": t.state.name, "objective": t.value,
            "verdict": t.user_attrs.get("verdict", ""),
            "backprop_ratio_init": t.user_attrs.get("backprop_ratio_init", math.nan),
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start else math.nan,
            "retry_of": t.system_attrs.get("failed_trial", ""),
            "error": (t.user_attrs.get("error") or "")[:200],
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id", ""),
        })
    return pd.DataFrame(rows)


def points_frame(df: pd.DataFrame, params: list[str]) -> pd.DataFrame:
    """One row per point: its COMPLETE trial if any, else its latest attempt; with the attempt count."""
    if df.empty:
        return df
    order = {"COMPLETE": 0, "RUNNING": 1, "WAITING": 2, "PRUNED": 3, "FAIL": 4}
    df = df.assign(_rank=df["state"].map(order), attempts=df.groupby(params, dropna=False)["trial"]
                   .transform("count"))
    best = df.sort_values(["_rank", "trial"], ascending=[True, False]).groupby(params, dropna=False).head(1)
    return best.drop(columns="_rank").sort_values(params).reset_index(drop=True)


def write(study: optuna.Study, out_dir: Path, metric: str) -> tuple[list[Path], str]:
    """Write report.csv, report.html and the heatmaps into out_dir; return the paths and a text table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    df = trials_frame(study)
    params = [c for c in df.columns if c not in _NON_PARAMS]
    points = points_frame(df, params) if params else df
    shown = points.drop(columns=["mlflow_run_id"], errors="ignore").rename(columns={"objective": metric})
    csv = out_dir / "report.csv"
    shown.to_csv(csv, index=False)
    figures = [_heatmap(points, params, col, title, out_dir / f"{name}.png")
               for col, title, name in (("objective", metric, "objective"),
                                        ("backprop_ratio_init", "log10 backprop_ratio at step 0",
                                         "backprop_ratio"))]
    figures = [f for f in figures if f is not None]
    page = out_dir / "report.html"
    page.write_text(_html(study, shown, figures, metric))
    text = f"study {study.study_name}: {len(points)} points, {len(df)} trials\n" + shown.drop(
        columns=["error"]).to_string(index=False, float_format=lambda v: f"{v:.4g}")
    return [csv, page, *figures], text


_NON_PARAMS = {"trial", "state", "objective", "verdict", "backprop_ratio_init", "seconds", "retry_of", "error",
               "mlflow_run_id"}


def _heatmap(points: pd.DataFrame, params: list[str], column: str, title: str, path: Path) -> Path | None:
    """Rows x columns of the two main axes, one panel per value of the remaining ones."""
    if points.empty or len(params) < 1 or points[column].isna().all():
        return None
    axes = [p for p in PREFERRED_AXES if p in params] or params[:2]
    rows, cols = axes[0], axes[1] if len(axes) > 1 else None
    facets = [p for p in params if p not in axes]
    groups = list(points.groupby(facets, dropna=False)) if facets else [((), points)]
    values = points[column].astype(float)
    if column == "backprop_ratio_init":
        values = np.log10(values.where(values > 0))
    vmin, vmax = np.nanmin(values), np.nanmax(values)
    fig = Figure(figsize=(3.2 * len(groups) + 1, 3.2))  # no pyplot: nothing global changes
    axs = fig.subplots(1, len(groups), squeeze=False)
    for ax, (key, g) in zip(axs[0], groups):
        v = values.loc[g.index]
        table = pd.DataFrame({"r": g[rows].astype(str), "c": g[cols].astype(str) if cols else "",
                              "v": v}).pivot_table(index="r", columns="c", values="v", aggfunc="first")
        im = ax.imshow(table.to_numpy(dtype=float), vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_xticks(range(table.shape[1]), table.columns, rotation=30)
        ax.set_yticks(range(table.shape[0]), table.index)
        for (i, j), x in np.ndenumerate(table.to_numpy(dtype=float)):
            ax.text(j, i, "—" if np.isnan(x) else f"{x:.2g}", ha="center", va="center", color="w", fontsize=8)
        key = key if isinstance(key, tuple) else (key,)
        ax.set_title(", ".join(f"{f}={k}" for f, k in zip(facets, key)) or title, fontsize=9)
        ax.set_xlabel(cols or "")
        ax.set_ylabel(rows)
    fig.colorbar(im, ax=axs[0].tolist(), label=title)
    fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _html(study: optuna.Study, shown: pd.DataFrame, figures: list[Path], metric: str) -> str:
    imgs = "".join(f'<p><img src="{f.name}" alt="{f.stem}"></p>' for f in figures)
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(study.study_name)}</title>"
            f"<h1>Study {html.escape(study.study_name)}</h1><p>objective: {html.escape(metric)} "
            f"({study.direction.name.lower()})</p>{imgs}"
            + shown.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}"))


def status_text(study: optuna.Study) -> str:
    """The progress table `make sweep-status` prints: counts per state, then every trial."""
    c = counts(study)
    df = trials_frame(study)
    head = f"study {study.study_name}: " + ", ".join(f"{k.lower()} {v}" for k, v in c.items() if v)
    if df.empty:
        return head + "\n(no trials yet)"
    body = df.drop(columns=["mlflow_run_id"]).to_string(index=False, float_format=lambda v: f"{v:.4g}")
    best = ""
    if c[TrialState.COMPLETE.name]:
        best = f"\nbest: trial {study.best_trial.number} {study.best_trial.params} value {study.best_value:.4g}"
    return f"{head}\n{body}{best}"
