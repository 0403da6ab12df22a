"""Tier (f): training against a real MLflow tracking server, including one that answers slowly."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from src.train import train
from tests.conftest import SlowProxy, runs_of
from src.tracking.store import client, ensure_experiment
from src.tracking.writer import AsyncRunWriter

STEPS = 40
CFG = [f"trainer.max_steps={STEPS}", "trainer.max_epochs=1", "trainer.log_every_n_steps=1", "stats.log_every_n_steps=1",
       "trainer.enable_progress_bar=false", "model.depth=3", "model.width=16", "tracking.plots=false"]


@pytest.mark.slow
def test_train_against_a_real_server(mlflow_server, monkeypatch, compose_cfg):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    train(compose_cfg(CFG))
    client, [run] = runs_of(mlflow_server)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == STEPS
    assert "trace" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_slow_server_loses_nothing(mlflow_server, monkeypatch, compose_cfg):
    port = int(mlflow_server.rsplit(":", 1)[1])
    proxy = SlowProxy(port, delay=0.5)  # every request waits 0.5 s: the backlog outlasts the training
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{proxy.port}")
        train(compose_cfg(CFG))
    finally:
        proxy.close()
    client, [run] = runs_of(mlflow_server)
    assert run.info.status == "FINISHED"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in loss) == list(range(STEPS))  # no gaps
    grad = client.get_metric_history(run.info.run_id, "grad_norm/layer_00")
    assert sorted(m.step for m in grad) == list(range(STEPS))


@pytest.mark.slow
def test_closing_waits_for_the_backlog_with_a_progress_line(mlflow_server, capfd):
    port = int(mlflow_server.rsplit(":", 1)[1])
    proxy = SlowProxy(port, delay=1.0)
    try:
        slow = client(f"http://127.0.0.1:{proxy.port}")
        run_id = slow.create_run(ensure_experiment(slow, "e", mlflow_server)).info.run_id
        writer = AsyncRunWriter(slow, run_id)
        for step in range(3):  # 3000 values: at least three 1000-metric requests, each held 1 s
            writer.log_metrics({f"m/layer_{i:04d}": float(i) for i in range(1000)}, step)
        writer.close()
    finally:
        proxy.close()
    assert writer.sent == 3000 and writer.spooled_to is None
    assert "sending backlog" in capfd.readouterr().err
    hist = MlflowClient(mlflow_server).get_metric_history(run_id, "m/layer_0999")
    assert [m.step for m in hist] == [0, 1, 2]


def _count_metric(db, key: str) -> int:
    """A read-only peek at the store (an MLflow client here could race the child's schema migration)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return con.execute("SELECT count(*) FROM metrics WHERE key = ?", (key,)).fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_ctrl_c_marks_the_run_killed_and_keeps_what_was_recorded(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "src.train", "trainer.max_epochs=500", "trainer.enable_progress_bar=false",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until training has logged something
            time.sleep(1)
            if _count_metric(tmp_path / "mlflow.db", "train/loss"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and "marked KILLED" in err
    client, [run] = runs_of(uri)
    assert run.info.status == "KILLED"
    assert client.get_metric_history(run.info.run_id, "train/loss")
    assert "trace" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_train_against_a_server_on_postgresql(server_factory, postgres_url, monkeypatch, compose_cfg):
    server = server_factory(backend=postgres_url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    train(compose_cfg(CFG + ["tracking.experiment=on-postgres"]))
    client, [run] = runs_of(server.url, "on-postgres")
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "grad_norm/layer_00", "backprop_norm/layer_02", "update_ratio/layer_03"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(STEPS)), key
    assert run.data.params["model.depth"] == "3"
    assert "trace" in {a.path for a in client.list_artifacts(run.info.run_id)}
    import psycopg  # the runs really are in PostgreSQL, not in a file beside the server

    with psycopg.connect(postgres_url) as con:
        row = con.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,)).fetchone()
    assert row == ("FINISHED",)
