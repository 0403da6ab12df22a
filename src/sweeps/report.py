"""The sweep report: one row per grid point (or trial), heatmaps of the objective and of the initial
back-propagation ratio over the swept axes (src.report.sweep), as CSV + HTML and as text for the terminal."""
from __future__ import annotations

import math
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from src.report import sweep as sweep_page
from src.report.views import SPECTRUM
from src.sweeps.study import counts, params_of


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
            **{k: t.user_attrs.get(k, math.nan) for k in SPECTRUM},
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


def write(study: optuna.Study, out_dir: Path, metric: str, uri: str = "",
          experiment_id: str = "") -> tuple[list[Path], str]:
    """Write report.csv and report.html into out_dir; return their paths and a text table. With the tracking
    `uri` and the trials' `experiment_id`, the page links every point to its MLflow run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    df = trials_frame(study)
    params = [c for c in df.columns if c not in _NON_PARAMS]
    points = points_frame(df, params) if params else df.assign(attempts=1)
    unused = [k for k in SPECTRUM if k in points and points[k].isna().all()]  # the Jacobian was not on
    shown = points.drop(columns=["mlflow_run_id", *unused], errors="ignore").rename(columns={"objective": metric})
    csv = out_dir / "report.csv"
    shown.to_csv(csv, index=False)
    context = next((t.user_attrs["context"] for t in study.get_trials(deepcopy=False) if "context" in t.user_attrs),
                   {})
    page = sweep_page.write(out_dir / "report.html", f"Study {study.study_name}", points, params, metric,
                            study.direction.name.lower(), uri, experiment_id, context)
    text = f"study {study.study_name}: {len(points)} points, {len(df)} trials\n" + shown.drop(
        columns=["error"], errors="ignore").to_string(index=False, float_format=lambda v: f"{v:.4g}")
    return [csv, page], text


_NON_PARAMS = {"trial", "state", "objective", "verdict", "backprop_ratio_init", "seconds", "retry_of", "error",
               "mlflow_run_id", *SPECTRUM}


def status_text(study: optuna.Study) -> str:
    """The progress table `make sweep-status` prints: counts per state, then every trial."""
    c = counts(study)
    df = trials_frame(study)
    head = f"study {study.study_name}: " + ", ".join(f"{k.lower()} {v}" for k, v in c.items() if v)
    if df.empty:
        return head + "\n(no trials yet)"
    unused = [k for k in SPECTRUM if k in df and df[k].isna().all()]
    body = df.drop(columns=["mlflow_run_id", *unused]).to_string(index=False, float_format=lambda v: f"{v:.4g}")
    best = ""
    if c[TrialState.COMPLETE.name]:
        best = f"\nbest: trial {study.best_trial.number} {study.best_trial.params} value {study.best_value:.4g}"
    return f"{head}\n{body}{best}"
