"""MultirunParentRun: the Hydra callback that gives a multirun (`python -m src.train -m ...`) one parent MLflow
run; every job finds it through $GRADFLOW_PARENT_RUN_ID and names its nested child run by the swept
overrides ($GRADFLOW_SWEEP_KEYS). When the jobs are done, the parent gets the children's table, and the sweep
report (report.html, src.report.sweep) over them in the sweep dir and as its artifact."""
from __future__ import annotations

import atexit
import math
import os
import re
import sys
import time
from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback

from src.report import sweep as sweep_page
from src.report.views import CONTEXT, SPECTRUM
from src.tracking import view
from src.tracking.env import PARENT_RUN_ENV, SWEEP_KEYS_ENV
from src.tracking.retry import first_line, retrying
from src.tracking.store import client, ensure_experiment, resolve_uri
from src.tracking.urls import redact, run_page


class MultirunParentRun(Callback):
    def __init__(self) -> None:
        self.run_id: str | None = None
        self.failed = False

    def on_multirun_start(self, config, **kwargs) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        if "gradflow_sweeper" in str(config.hydra.sweeper.get("_target_", "")):
            return  # the sweep engine keeps one parent run per study, shared by its workers

        overrides = list(config.hydra.overrides.task)
        parsed = OverridesParser.create().parse_overrides(overrides)
        swept = [o.input_line for o in parsed if o.is_sweep_override()]
        keys = [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]
        # a preset may declare its sweep in hydra.sweeper.params (`-m experiment=cures`)
        for key, values in dict(config.hydra.sweeper.get("params") or {}).items():
            if key.lstrip("+~") not in keys:  # the command line wins over the preset's sweep
                keys.append(key.lstrip("+~"))
                swept.append(f"{key}={values}")
        uri = resolve_uri(config.tracking.uri)
        self.client = client(uri)
        self.uri, self.exp_id = uri, ensure_experiment(self.client, config.tracking.experiment, uri)
        self.name, self.keys = ("multirun " + " ".join(swept or overrides))[:250], keys
        self.run_id = self.client.create_run(self.exp_id, run_name=self.name, tags={
            "gradflow.multirun": "true", "gradflow.overrides": redact(" ".join(overrides))[:5000],
        }).info.run_id
        os.environ[PARENT_RUN_ENV] = self.run_id
        os.environ[SWEEP_KEYS_ENV] = ",".join(keys)
        atexit.register(self._finish, "FAILED")  # a sweep that raises never reaches on_multirun_end

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        if self.run_id and job_return.status == JobStatus.FAILED:
            self.failed = True

    def on_multirun_end(self, config, **kwargs) -> None:
        if self.run_id:
            runs = self._print_children()
            if runs:
                self._attach_report(runs, Path(str(config.hydra.sweep.dir)) / "report.html")
        self._finish("FAILED" if self.failed else "FINISHED")

    def _print_children(self) -> list:
        """The children's table: name, verdict, headline metrics; and where to look. Returns the children."""
        try:
            runs = self.client.search_runs([self.exp_id], f"tags.mlflow.parentRunId = '{self.run_id}'",
                                           order_by=["attributes.start_time ASC"])
        except Exception as e:  # noqa: BLE001 - the runs are in the store; only this summary is lost
            print(f"mlflow: could not read the children back: {redact(first_line(e))}", file=sys.stderr)
            return []
        print("\n" + children_table(runs))
        try:
            view.share(self.client, self.exp_id)  # the children's metric keys into the curated view
        except Exception as e:  # noqa: BLE001 - the UI's own view still works
            print(f"mlflow: could not write the curated view: {redact(first_line(e))}", file=sys.stderr)
        print(f"look: {run_page(self.uri, self.exp_id)}")
        return runs

    def _attach_report(self, runs, path: Path) -> None:
        """report.html over the children, written to `path` and attached to the parent run."""
        try:
            points = points_frame(self.client, runs, self.keys)
            context = {k: runs[0].data.params.get(k) for k in CONTEXT} if runs else {}
            sweep_page.write(path, self.name, points, self.keys, METRIC, "maximize", self.uri, self.exp_id, context)
            self.client.log_artifact(self.run_id, str(path))
        except Exception as e:  # noqa: BLE001 - the runs and their table are complete; only the page is lost
            print(f"mlflow: could not attach the multirun's report: {redact(first_line(e))}", file=sys.stderr)

    def _finish(self, status: str) -> None:
        if self.run_id is None:
            return
        try:  # a server that is down right now may be back within a minute
            retrying(lambda: self.client.set_terminated(self.run_id, status), f"marking the multirun {status}",
                     time.monotonic() + 60)
        except Exception as e:  # noqa: BLE001 - the jobs' own runs are complete; say which parent is left
            print(f"mlflow: could not mark multirun {self.run_id} {status}: {redact(first_line(e))}", file=sys.stderr)
        self.run_id = None
        os.environ.pop(PARENT_RUN_ENV, None)
        os.environ.pop(SWEEP_KEYS_ENV, None)
        atexit.unregister(self._finish)


HEADLINE = ("val/acc", "val/loss", "backprop_ratio", "backprop_time_ratio")
METRIC = "val/acc"  # the report's objective, as the sweeps' (hparams_search) optimized_metric


def points_frame(client, runs, keys: list[str]) -> pd.DataFrame:
    """The children as the sweep report's points (src.report.sweep.write), one per run; a column of swept values
    that are all numbers holds numbers, so that depth 10 sorts after depth 2."""
    points = pd.DataFrame([{
        **swept_values(r, keys), "state": r.info.status, "objective": r.data.metrics.get(METRIC, math.nan),
        "verdict": r.data.tags.get("verdict", ""), "backprop_ratio_init": initial_backprop_ratio(client, r),
        "seconds": (r.info.end_time - r.info.start_time) / 1000 if r.info.end_time else math.nan,
        "attempts": 1, "error": r.data.tags.get("error", "")[:200], "mlflow_run_id": r.info.run_id,
        **{k: r.data.metrics.get(k, math.nan) for k in SPECTRUM},
    } for r in runs])
    for k in keys:
        try:
            points[k] = pd.to_numeric(points[k])
        except (ValueError, TypeError):
            pass  # a column with words (activation=relu) stays text
    return points


def swept_values(run, keys: list[str]) -> dict[str, str | None]:
    """The run's value of each swept key: its param (the resolved config, and the option of the main groups),
    else its override in the run's name (`model=cnn,cure=clip`: groups that log no param of their own)."""
    alternatives = "|".join(map(re.escape, keys))
    named = dict(o.split("=", 1) for o in re.split(rf",(?=[+~]*(?:{alternatives})=)", run.info.run_name or "")
                 if "=" in o)
    named = {k.lstrip("+~"): v for k, v in named.items()}
    return {k: run.data.params.get(k, named.get(k)) for k in keys}


def initial_backprop_ratio(client, run) -> float:
    """backprop_ratio at step 0, else (a run whose statistics start later) the last one logged."""
    at_0 = [m.value for m in client.get_metric_history(run.info.run_id, "backprop_ratio") if m.step == 0]
    return at_0[0] if at_0 else run.data.metrics.get("backprop_ratio", math.nan)


def children_table(runs) -> str:
    """A plain-text table of a multirun's child runs: run name, status, verdict and headline metrics."""
    keys = [k for k in HEADLINE if any(k in r.data.metrics for r in runs)]
    rows = [["run", "status", "verdict", *keys]]
    for r in runs:
        m = r.data.metrics
        rows.append([r.info.run_name or r.info.run_id, r.info.status, r.data.tags.get("verdict", "-"),
                     *(f"{m[k]:.3g}" if k in m else "-" for k in keys)])
    widths = [max(len(row[j]) for row in rows) for j in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
