"""MultirunParentRun: the Hydra callback that gives a multirun (`python -m src.train -m ...`) one parent MLflow
run; every job finds it through $GRADFLOW_PARENT_RUN_ID and names its nested child run by the swept
overrides ($GRADFLOW_SWEEP_KEYS)."""
from __future__ import annotations

import atexit
import os
import sys
import time

from hydra.experimental.callback import Callback

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
        name = "multirun " + " ".join(swept or overrides)
        self.run_id = self.client.create_run(self.exp_id, run_name=name[:250], tags={
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
            self._print_children()
        self._finish("FAILED" if self.failed else "FINISHED")

    def _print_children(self) -> None:
        """The children's table: name, verdict, headline metrics; and where to look."""
        try:
            runs = self.client.search_runs([self.exp_id], f"tags.mlflow.parentRunId = '{self.run_id}'",
                                           order_by=["attributes.start_time ASC"])
        except Exception as e:  # noqa: BLE001 - the runs are in the store; only this summary is lost
            print(f"mlflow: could not read the children back: {redact(first_line(e))}", file=sys.stderr)
            return
        print("\n" + children_table(runs))
        try:
            view.share(self.client, self.exp_id)  # the children's metric keys into the curated view
        except Exception as e:  # noqa: BLE001 - the UI's own view still works
            print(f"mlflow: could not write the curated view: {redact(first_line(e))}", file=sys.stderr)
        print(f"look: {run_page(self.uri, self.exp_id)}")

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
