"""`python -m src.train -m hparams_search=grid` end to end: real workers (separate processes), real Lightning
runs, a real Optuna storage (journal file; PostgreSQL when reachable) and a real MLflow store. One worker is
killed with SIGKILL, with its trial process, in the middle of a trial, as on node loss."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import ROOT, free_port, runs_of
from tests.pg import fresh_database
from src.sweeps.leases import WORKER
from src.sweeps.space import point_key
from src.sweeps.storage import open_storage

pytestmark = pytest.mark.slow

GRID = ["activation=sigmoid,relu", "init=xavier,he", "model.depth=1,2"]  # 2 x 2 x 2 = 8 points
TINY = ["trainer.max_epochs=1", "+trainer.limit_train_batches=8", "+trainer.limit_val_batches=2",
        "model.width=16", "tracking.plots=false"]


def _worker(tmp: Path, storage: str, uri: str, study: str, log: str, extra=()) -> subprocess.Popen:
    args = [sys.executable, "-m", "src.train", "-m", "hparams_search=grid", *GRID, *TINY,
            f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_name={study}",
            "hydra.sweeper.heartbeat_interval=0.5", "hydra.sweeper.grace_period=4",
            f"hydra.sweep.dir={tmp / 'sweeps'}", *extra]
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PYTHONUNBUFFERED="1")
    # Its own process group, so that killing "the node" kills the worker and its trial process together.
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=open(tmp / log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_running_trial_of(proc: subprocess.Popen, study: optuna.Study, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.system_attrs.get(WORKER, "").endswith(f":{proc.pid}") and "mlflow_run_id" in t.user_attrs:
                return t.number
        assert proc.poll() is None, "the worker ended before it ran a trial (see its log in tmp_path)"
        time.sleep(0.1)
    raise TimeoutError("no trial started")


def _run_scenario(tmp: Path, storage: str, uri: str) -> None:
    study_name = "e2e"
    a = _worker(tmp, storage, uri, study_name, "a.log")
    try:
        study = _load(storage, study_name)
        victim = _wait_running_trial_of(a, study)
        b = _worker(tmp, storage, uri, study_name, "b.log")
        os.killpg(a.pid, signal.SIGKILL)  # the worker and its forked trial process, mid-trial
        a.wait(30)
        c = _worker(tmp, storage, uri, study_name, "c.log")  # a replacement node joins later
        for p, log in ((b, "b.log"), (c, "c.log")):
            assert p.wait(600) == 0, (tmp / log).read_text()[-3000:]
    finally:
        for p in (a, locals().get("b"), locals().get("c")):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)

    trials = _load(storage, study_name).get_trials()
    assert optuna.get_all_study_names(open_storage(storage)) == [study_name]  # no bookkeeping study left in view
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    points = sorted(point_key(t.params) for t in complete)
    assert len(complete) == 8 and len(set(points)) == 8, [(t.number, t.state, t.params) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    killed = trials[victim]
    assert killed.state == TrialState.FAIL and "lease expired" in killed.user_attrs["error"]
    assert any(t.system_attrs.get("failed_trial") == victim and t.state == TrialState.COMPLETE for t in trials)

    client, runs = runs_of(uri)
    children = [r for r in runs if r.data.tags.get("study_name") == study_name and "trial_number" in r.data.tags]
    parents = [r for r in runs if r.data.tags.get("gradflow.sweep") == "true"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert not [r for r in children if r.info.status == "RUNNING"]
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(int(r.data.tags["trial_number"]) for r in finished) == sorted(t.number for t in complete)
    assert all("val/acc" in r.data.metrics and "grad_norm/layer_00" in r.data.metrics for r in finished)
    victim_run = next(r for r in children if r.data.tags["trial_number"] == str(victim))
    assert victim_run.info.status in ("KILLED", "FAILED")
    report = {f.path for f in client.list_artifacts(parents[0].info.run_id, "report")}
    assert report == {"report/report.csv", "report/report.html"}
    page = Path(client.download_artifacts(parents[0].info.run_id, "report/report.html")).read_text()
    assert all(f"/runs/{r.info.run_id}?" in page for r in finished)  # every point links to its run


def _load(storage: str, name: str, timeout: float = 120) -> optuna.Study:
    deadline = time.monotonic() + timeout
    while True:  # the first worker creates the study
        try:
            return optuna.load_study(study_name=name, storage=open_storage(storage))
        except KeyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_two_workers_on_a_journal_file_run_an_8_point_grid_exactly_once_despite_a_kill_9(tmp_path):
    _run_scenario(tmp_path, f"journal:{tmp_path}/optuna.journal", f"sqlite:///{tmp_path}/mlflow.db")


def test_the_same_on_postgresql_for_optuna_and_mlflow(tmp_path):
    # Two databases: MLflow and Optuna both keep their schema version in a table named alembic_version.
    with fresh_database("gradflow_optuna") as storage, fresh_database("gradflow_mlflow") as uri:
        _run_scenario(tmp_path, storage, uri)


@pytest.mark.parametrize("depths", ["0,2", "2,0"])
def test_a_typo_in_the_grid_fails_before_any_trial_or_run(tmp_path, depths):
    """A bad group option and a bad value, the latter on the first point of its activation and (2,0) on a
    point that is not composed by Hydra but derived from the first."""
    storage, uri = f"journal:{tmp_path}/o.journal", f"sqlite:///{tmp_path}/mlflow.db"
    out = subprocess.run([sys.executable, "-m", "src.train", "-m", "hparams_search=grid", "activation=sigmoid,relux",
                          f"model.depth={depths}", f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={tmp_path}/s"],
                         cwd=ROOT, env=dict(os.environ, MLFLOW_TRACKING_URI=uri), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "relux" in out.stderr and "model.depth=0" in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.count("model.depth=0") == 1  # said once, though two points have it
    assert not Path(f"{tmp_path}/o.journal").exists() and not runs_of(uri)[1]


def _small_grid_args(tmp: Path, storage: str) -> list[str]:
    return ["hparams_search=grid", "activation=sigmoid,relu", "init=xavier", "model.depth=1", *TINY,
            f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=small", f"hydra.sweep.dir={tmp}/sweeps"]


def test_submitit_local_workers_then_status_report_and_dashboard(tmp_path):
    """The cluster recipe with submitit's local executor (the same code path submits to SLURM where sbatch
    exists); then the status and report commands and optuna-dashboard on the same storage."""
    storage, uri = f"journal:{tmp_path}/o.journal", f"sqlite:///{tmp_path}/mlflow.db"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    args = _small_grid_args(tmp_path, storage)
    out = subprocess.run([sys.executable, "-m", "src.sweeps", "submit", "--workers", "2", *args], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "submitted 2 worker job(s) to local" in out.stderr
    study = _load(storage, "small")
    assert sorted(t.params["activation"] for t in study.get_trials() if t.state == TrialState.COMPLETE) == \
        ["relu", "sigmoid"]

    status = subprocess.run([sys.executable, "-m", "src.sweeps", "status", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert status.returncode == 0 and "complete 2" in status.stdout and "best: trial" in status.stdout

    rep = subprocess.run([sys.executable, "-m", "src.sweeps", "report", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert (tmp_path / "sweeps" / "report" / "report.csv").exists()

    port = free_port()
    dash = subprocess.Popen([sys.executable, "-m", "src.sweeps", "dashboard", *args], cwd=ROOT,
                            env=dict(env, DASHBOARD_PORT=str(port)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, body = time.monotonic() + 120, ""
        while time.monotonic() < deadline and "small" not in body:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5).read().decode()
            except OSError:
                time.sleep(0.5)
        assert '"study_name": "small"' in body or '"study_name":"small"' in body
    finally:
        os.killpg(dash.pid, signal.SIGTERM)
        dash.wait(30)


def test_a_sweep_against_a_real_tracking_server(tmp_path, mlflow_server):
    """Two workers, the second forked from the first after it has talked to the server: each process must
    open its own HTTP connections (a shared keep-alive socket would interleave their requests)."""
    storage = f"journal:{tmp_path}/o.journal"
    args = [*_small_grid_args(tmp_path, storage), "hydra.sweeper.workers=2"]
    out = subprocess.run([sys.executable, "-m", "src.train", "-m", *args], cwd=ROOT,
                         env=dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    client, runs = runs_of(mlflow_server)
    children = [r for r in runs if r.data.tags.get("study_name") == "small" and "trial_number" in r.data.tags]
    assert sorted(r.data.params["activation"] for r in children) == ["relu", "sigmoid"]
    assert all(r.info.status == "FINISHED" and "objective" in r.data.tags for r in children)
    parent = next(r for r in runs if r.data.tags.get("gradflow.sweep") == "true")
    assert parent.info.status == "FINISHED"
    assert "report/report.csv" in {f.path for f in client.list_artifacts(parent.info.run_id, "report")}


def test_tpe_with_a_pruner_stops_trials_early_and_records_them_pruned(tmp_path):
    """hparams_search=tpe with a pruner that prunes every trial at its first report (val/acc < 2 always):
    each trial trains one epoch of its three, ends PRUNED in Optuna and FINISHED (tagged) in MLflow."""
    storage, uri = f"journal:{tmp_path}/o.journal", f"sqlite:///{tmp_path}/mlflow.db"
    out = subprocess.run(
        [sys.executable, "-m", "src.train", "-m", "hparams_search=tpe", "hydra.sweeper.n_trials=2",
         "model.depth=range(1,3)", "trainer.max_epochs=3", "+trainer.limit_train_batches=4",
         "+trainer.limit_val_batches=2", "tracking.plots=false",
         "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner", "~hydra.sweeper.pruner.n_startup_trials",
         "+hydra.sweeper.pruner.lower=2.0", "hydra.sweeper.pruner.n_warmup_steps=0",
         f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={tmp_path}/s"],
        cwd=ROOT, env=dict(os.environ, MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    trials = _load(storage, "gradflow-tpe").get_trials()
    assert len(trials) == 2 and {t.state for t in trials} == {TrialState.PRUNED}
    assert all(list(t.intermediate_values) == [0] for t in trials)  # reported once, at epoch 0
    _, runs = runs_of(uri)
    children = [r for r in runs if "trial_number" in r.data.tags]
    assert len(children) == 2
    assert all(r.info.status == "FINISHED" and r.data.tags.get("optuna.pruned") == "true" for r in children)
