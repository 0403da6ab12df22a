"""Running a preset's study (`python -m src.train -m experiment=<preset> ...`, one MLflow parent run with a
child per cell) and reading its runs back from MLflow."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from src.reproduce.columns import Row
from src.reproduce.studies import STUDIES

LOAD_TAG = "gradflow.load_average"  # kept on the parent run, so a later --reread can still state it


@dataclass
class StudyRun:
    rows: list[Row]      # one per child run, in start order
    wall: float          # seconds from the parent run's start to its end
    command: list[str]   # the command line, as a reader would type it
    load: float = math.nan  # the machine's mean 1-minute load average while it ran (NaN: unknown)


def run_study(preset: str, quick: bool, extra: list[str], uri: str) -> StudyRun:
    """Run the study and read its runs back."""
    study = STUDIES[preset]
    sweep_dir = tempfile.mkdtemp(prefix=f"gradflow-{preset}-")
    args = [sys.executable, "-m", "src.train", "-m", f"experiment={preset}", "trainer.enable_progress_bar=false",
            f"hydra.sweep.dir={sweep_dir}", *(study.quick if quick else []), *extra]
    # one intra-op thread unless told otherwise: these nets are too small to gain from more, and on a
    # shared machine extra threads spin waiting for cores
    env = {"OMP_NUM_THREADS": "1", **os.environ, "MLFLOW_TRACKING_URI": uri}
    print("running:", " ".join(args[1:]), flush=True)
    job = subprocess.Popen(args, env=env)
    load = []  # timings on a shared machine need the load they were taken under
    while job.poll() is None:
        load.append(os.getloadavg()[0])
        time.sleep(2)
    if job.returncode:
        raise subprocess.CalledProcessError(job.returncode, args)
    shown = ["python", "-m", "src.train", "-m", f"experiment={preset}", *(study.quick if quick else []), *extra]
    return read_study(preset, uri, shown, load=sum(load) / max(1, len(load)))


def latest_study(preset: str, uri: str, quick: bool, extra: list[str] = ()) -> StudyRun:
    """The preset's latest multirun in the store (--reread): a quick one if `quick`, else a full one, run with
    exactly the `extra` overrides (seed=1 picks the seed-1 study; none picks one run without extras)."""
    quick_args = STUDIES[preset].quick
    return read_study(preset, uri, None, must_have=[*(quick_args if quick else []), *extra],
                      must_lack=[] if quick else quick_args, exactly=[f"experiment={preset}", *quick_args, *extra])


def read_study(preset: str, uri: str, shown: list[str] | None, must_have: list[str] = (),
               must_lack: list[str] = (), load: float | None = None, exactly: list[str] | None = None) -> StudyRun:
    """The latest multirun of the preset (with all of `must_have` and not all of `must_lack` among its
    overrides; with `exactly`, no override outside it but the progress bar's) and its child runs. `load`
    given: recorded on the parent run; else read from it."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(preset)
    parents = client.search_runs([exp.experiment_id], "tags.`gradflow.multirun` = 'true'",
                                 order_by=["attributes.start_time DESC"])

    def given(p) -> set[str]:
        return set(p.data.tags.get("gradflow.overrides", "").split())

    def extras(p) -> set[str]:
        return given(p) - set(exactly or ()) - {"trainer.enable_progress_bar=false"}

    parent = next(p for p in parents if set(must_have) <= given(p) and not (must_lack and set(must_lack) <= given(p))
                  and (exactly is None or not extras(p)))
    if load is not None:
        client.set_tag(parent.info.run_id, LOAD_TAG, f"{load:.2f}")
    else:
        load = float(parent.data.tags.get(LOAD_TAG, "nan"))
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    rows = []
    for c in children:
        cache: dict[str, list] = {}

        def history(key, run_id=c.info.run_id, cache=cache):
            if key not in cache:
                cache[key] = [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key),
                                                                  key=lambda m: m.step)]
            return cache[key]
        rows.append({"name": c.info.run_name, "params": c.data.params, "tags": c.data.tags,
                     "metrics": c.data.metrics, "history": history, "status": c.info.status})
    wall = (parent.info.end_time - parent.info.start_time) / 1000 if parent.info.end_time else float("nan")
    if shown is None:  # re-read: the command as the parent run recorded it
        shown = ["python", "-m", "src.train", "-m", *(o for o in parent.data.tags.get("gradflow.overrides", "").split()
                                                      if o != "trainer.enable_progress_bar=false")]
    return StudyRun(rows, wall, shown, load)
