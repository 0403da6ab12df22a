"""Reliability against real servers and real training processes: a tracking server that goes away for a
while or for good, a loss that becomes NaN, and a server that lets nobody in without a password."""
from __future__ import annotations

import base64
import json
import math
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from src.train import train
from tests.conftest import ROOT, runs_of

STEPS = 300
BASE = ["trainer.log_every_n_steps=1", "stats.log_every_n_steps=50",
        "model.depth=4", "model.width=32", "trainer.enable_progress_bar=false", "tracking.plots=false"]


def start_training(uri: str, folder: Path, *overrides: str, env: dict | None = None,
                   steps: int = STEPS) -> subprocess.Popen:
    """`python -m src.train` as a user runs it; stdout/stderr go to files in folder (read by `finish`)."""
    folder.mkdir(parents=True, exist_ok=True)
    out, err = open(folder / "stdout", "w"), open(folder / "stderr", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "src.train", *BASE, f"trainer.max_steps={steps}", f"hydra.run.dir={folder / 'run'}",
         *overrides],
        cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": uri, **(env or {})}, stdout=out, stderr=err)
    out.close(), err.close()
    return proc


def finish(proc: subprocess.Popen, folder: Path, timeout: float = 600) -> tuple[int, str, str]:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, (folder / "stdout").read_text(), (folder / "stderr").read_text()


def wait_for_first_losses(url: str, proc: subprocess.Popen, timeout: float = 300):
    """Until the training process has delivered some train/loss points to the server."""
    client, deadline = MlflowClient(url), time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        _, runs = runs_of(url)
        if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
            return
        time.sleep(0.5)
    raise AssertionError(f"no train/loss reached the server (training exit code {proc.poll()})")


def nonfinite(value: float) -> bool:
    """NaN, or infinity as MLflow stores it (the largest float)."""
    return not math.isfinite(value) or abs(value) == sys.float_info.max


def loss_steps(url: str, run_id: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(url).get_metric_history(run_id, "train/loss"))


@pytest.mark.slow
def test_server_outage_during_a_run_loses_nothing(server_factory, tmp_path):
    server = server_factory()
    proc = start_training(server.url, tmp_path / "train", "tracking.server_timeout=600")
    wait_for_first_losses(server.url, proc)
    assert proc.poll() is None, "training ended before the outage: nothing tested"
    server.kill()  # SIGKILL to the server's process group: a crash, not a shutdown
    time.sleep(10)
    server.start()  # same port, same store
    code, out, err = finish(proc, tmp_path / "train")
    assert code == 0, err[-3000:]
    assert "Traceback" not in err and "replay" not in err
    client, [run] = runs_of(server.url)
    assert run.info.status == "FINISHED"
    assert loss_steps(server.url, run.info.run_id) == list(range(STEPS))  # every point, no gap, no duplicate
    grad = client.get_metric_history(run.info.run_id, "grad_norm/layer_00")
    assert sorted(m.step for m in grad) == list(range(0, STEPS, 50))
    assert {"trace", "hydra"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not list((tmp_path / "train" / "run").glob("mlflow-spool-*.jsonl"))


@pytest.mark.slow
def test_server_that_never_returns_spools_and_the_printed_command_replays_it(server_factory, tmp_path):
    server = server_factory()
    proc = start_training(server.url, tmp_path / "train", "tracking.server_timeout=5")
    wait_for_first_losses(server.url, proc)
    server.kill()
    code, out, err = finish(proc, tmp_path / "train")
    assert code == 0, err[-3000:]  # training finished although the server is gone
    assert "Traceback" not in err
    command = re.search(r"^  (python -m src\.tracking replay (\S+))$", err, re.M)
    assert command, err[-3000:]
    spool = Path(command.group(2))
    assert spool.parent == tmp_path / "train" / "run" and spool.exists()
    records = [json.loads(line) for line in spool.read_text().splitlines()]
    assert records[-1]["status"] == "FINISHED" and any(r.get("artifacts") for r in records)

    server.start()  # the store comes back (here: the same server; the run lives in its store)
    client, [run] = runs_of(server.url)
    assert run.info.status == "RUNNING"  # the server was gone when the run ended: nobody could set it
    assert len(loss_steps(server.url, run.info.run_id)) < STEPS

    replay = subprocess.run([sys.executable, *command.group(1).split()[1:]], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "MLFLOW_TRACKING_URI": server.url})
    assert replay.returncode == 0, replay.stderr[-3000:]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert loss_steps(server.url, run.info.run_id) == list(range(STEPS))
    assert {"trace", "hydra"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.data.params["model.depth"] == "4"


@pytest.mark.slow
def test_a_nonfinite_loss_stops_the_run_cleanly_and_the_sweep_goes_on(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run(
        [sys.executable, "-m", "src.train", "-m", "optimizer.lr=1e8,0.1", "activation=relu", "init=he",
         "trainer.max_steps=60", "trainer.log_every_n_steps=1", "model.depth=4", "model.width=32",
         "trainer.enable_progress_bar=false", "tracking.plots=false", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopping: non-finite train/loss" in proc.stderr
    client, runs = runs_of(uri)
    assert len(runs) == 3 and all(run.info.status == "FINISHED" for run in runs)  # parent and both trials
    by_lr = {float(r.data.params["optimizer.lr"]): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    exploded, healthy = by_lr[1e8], by_lr[0.1]
    reason = exploded.data.tags["stop_reason"]
    step = int(re.fullmatch(r"non-finite train/loss \((nan|inf|-inf)\) at step (\d+)", reason).group(2))
    losses = sorted(client.get_metric_history(exploded.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in losses] == list(range(step + 1)) and step + 1 < 60  # stopped at that step
    assert nonfinite(losses[-1].value) and not any(nonfinite(m.value) for m in losses[:-1])
    assert "stop_reason" not in healthy.data.tags
    assert len(client.get_metric_history(healthy.info.run_id, "train/loss")) == 60


def test_the_guard_can_be_turned_off(compose_cfg, tracking_uri):
    train(compose_cfg(["optimizer.lr=1e8", "activation=relu", "init=he", "model.depth=4", "model.width=32",
                       "trainer.max_steps=20", "trainer.log_every_n_steps=1", "callbacks.nonfinite_guard=null",
                       "trainer.enable_progress_bar=false", "tracking.plots=false", "stats=off"]))
    client, [run] = runs_of(tracking_uri)
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(losses) == 20 and nonfinite(losses[-1].value)  # all 20 steps taken
    assert run.info.status == "FINISHED" and "stop_reason" not in run.data.tags


def _post(url: str, path: str, body: dict, auth: str | None = None, host: str | None = None) -> int:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    if host:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_basic_auth_server_refuses_strangers_and_no_password_leaks(server_factory, tmp_path):
    password = "pw-" + secrets.token_hex(12)
    ini = (ROOT / "deploy/mlflow/basic_auth.ini").read_text()  # the file the compose server uses
    ini = re.sub(r"^database_uri = .*$", f"database_uri = sqlite:///{tmp_path / 'auth.db'}", ini, flags=re.M)
    (tmp_path / "basic_auth.ini").write_text(ini)
    server = server_factory(args=["--app-name", "basic-auth", "--allowed-hosts", "127.0.0.1:*"], env={
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"), "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)})
    create = "/api/2.0/mlflow/experiments/create"
    assert _post(server.url, create, {"name": "anonymous"}) == 401
    assert _post(server.url, create, {"name": "guessed"}, auth="admin:admin") == 401
    assert _post(server.url, create, {"name": "admin's"}, auth=f"admin:{password}") == 200
    assert _post(server.url, create, {"name": "rebound"}, auth=f"admin:{password}", host="evil.example:5000") == 403

    # a training run without credentials: refused at once, with a short message and no run
    no_creds = {"MLFLOW_TRACKING_USERNAME": "", "MLFLOW_TRACKING_PASSWORD": ""}
    code, out, err = finish(start_training(server.url, tmp_path / "anon", env=no_creds), tmp_path / "anon")
    assert code == 3 and "tracking error" in err and "Traceback" not in err

    # the password in $MLFLOW_TRACKING_PASSWORD, or in the URL of $MLFLOW_TRACKING_URI: runs, never shown
    with_env = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
    in_url = server.url.replace("http://", f"http://admin:{password}@")
    runs = [(start_training(server.url, tmp_path / "env", "tracking.run_name=env", env=with_env, steps=30), "env"),
            (start_training(in_url, tmp_path / "url", "tracking.run_name=url", env=no_creds, steps=30), "url")]
    for proc, name in runs:
        code, out, err = finish(proc, tmp_path / name)
        assert code == 0, err[-3000:]
        assert password not in out + err
    assert f"admin:***@127.0.0.1:{server.port}/#/experiments/" in (tmp_path / "url" / "stdout").read_text()

    client = MlflowClient(in_url)
    exp = client.get_experiment_by_name("gradflow")
    for run in client.search_runs([exp.experiment_id]):
        assert run.info.status == "FINISHED" and len(run.data.params) > 20
        assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if password in v]

    # and a password in the config itself, which is saved with every run, is refused before any run
    code, out, err = finish(start_training(server.url, tmp_path / "cfg", f"tracking.uri={in_url}", env=with_env),
                            tmp_path / "cfg")
    assert code == 2 and "MLFLOW_TRACKING_PASSWORD" in err and password not in out + err
    assert len(client.search_runs([exp.experiment_id])) == 2
