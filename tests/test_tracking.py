"""The MLflow transport against real stores: batching, retry, spool and replay."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
from mlflow.tracking import MlflowClient

from src.tracking.run import TrackedRun
from src.tracking.spool import replay
from src.tracking.store import TrackingUnavailable, ensure_experiment, resolve_uri
from src.tracking.urls import redact
from src.tracking.writer import AsyncRunWriter
from tests.conftest import ROOT, runs_of


def test_resolve_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_uri("sqlite:///x.db") == "sqlite:///x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_uri("sqlite:///x.db") == "sqlite:///x.db"  # an explicit value wins, as in MLflow
    assert resolve_uri(None) == "http://127.0.0.1:5000"


def test_redact_hides_passwords():
    assert redact("postgresql://bob:s3cret@db:5432/mlflow") == "postgresql://bob:***@db:5432/mlflow"
    assert redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_experiment_is_created_once_with_artifacts_beside_the_store(tracking_uri, tmp_path):
    client = MlflowClient(tracking_uri)
    a = ensure_experiment(client, "e", tracking_uri)
    assert ensure_experiment(client, "e", tracking_uri) == a
    exp = client.get_experiment(a)
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_writer_splits_large_batches_and_delivers_everything(tracking_uri):
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(ensure_experiment(client, "e", tracking_uri)).info.run_id
    w = AsyncRunWriter(client, run_id)
    for step in range(3):  # 3 x 1500 metrics: more than one log_batch request each
        w.log_metrics({f"m/layer_{i:04d}": step + i for i in range(1500)}, step)
    w.log_params({f"p{i}": i for i in range(250)})
    w.close()
    assert w.sent == 3 * 1500 + 250 and w.spooled_to is None
    hist = client.get_metric_history(run_id, "m/layer_1499")
    assert [(m.step, m.value) for m in hist] == [(0, 1499.0), (1, 1500.0), (2, 1501.0)]
    assert len(client.get_run(run_id).data.params) == 250


def test_writes_run_in_a_separate_process_and_survive_its_death(tracking_uri, capfd):
    """MLflow's Python code runs in the sink process (its own GIL); if that process dies, the writer sends
    from the training process and nothing is lost."""
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(ensure_experiment(client, "e", tracking_uri)).info.run_id
    w = AsyncRunWriter(client, run_id, linger=0.0)
    sink = w._sink.process
    assert sink.is_alive() and sink.pid != os.getpid()
    w.log_metrics({"a": 1.0}, 0)
    deadline = time.monotonic() + 30
    while w.sent < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert w.sent == 1  # delivered by the sink
    os.kill(sink.pid, signal.SIGKILL)
    sink.join(10)
    w.log_metrics({"a": 2.0}, 1)
    w.close()
    assert "sending from the training process" in capfd.readouterr().err
    assert [m.value for m in client.get_metric_history(run_id, "a")] == [1.0, 2.0]
    assert w.sent == 2 and w.spooled_to is None


def test_the_backlog_is_bounded_and_nothing_is_lost(tracking_uri, capfd):
    """Values that come faster than the store takes them make the caller wait past max_backlog; every
    value still arrives."""
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(ensure_experiment(client, "e", tracking_uri)).info.run_id
    w = AsyncRunWriter(client, run_id, linger=0.3, max_backlog=50)  # holds each batch 0.3 s
    seen = []
    for step in range(20):  # 200 values handed over far faster than one batch per 0.3 s
        w.log_metrics({f"m{i}": float(step) for i in range(10)}, step)
        seen.append(w.backlog)
    w.close()
    assert max(seen) <= 50 + 10  # one call's values past the bound, never more
    assert "training waits for the writer" in capfd.readouterr().err
    assert w.sent == 200 and w.spooled_to is None
    assert [m.step for m in client.get_metric_history(run_id, "m9")] == list(range(20))


def test_a_backlog_past_the_bound_is_spooled_while_the_server_is_down(tracking_uri, tmp_path, monkeypatch):
    """With the server down and the bound reached, the writer spools instead of retrying for
    retry_seconds: training goes on, memory stays bounded, replay delivers everything."""
    store = MlflowClient(tracking_uri)
    run_id = store.create_run(ensure_experiment(store, "e", tracking_uri)).info.run_id
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    dead = MlflowClient("http://127.0.0.1:9")  # nothing listens on the discard port
    w = AsyncRunWriter(dead, run_id, spool_dir=tmp_path, retry_seconds=600.0, linger=0.0, max_backlog=50)
    t0 = time.monotonic()
    for step in range(20):
        w.log_metrics({f"m{i}": float(step) for i in range(10)}, step)
    assert time.monotonic() - t0 < 60  # not 600 s of retries
    w.close(timeout=5)
    assert w.spooled_to is not None
    assert replay(w.spooled_to, tracking_uri) == 200
    assert [m.step for m in store.get_metric_history(run_id, "m9")] == list(range(20))


def test_an_error_of_the_store_crosses_the_process_boundary_as_mlflows(tracking_uri, tmp_path):
    """A refusal (here: an unknown run) is MLflow's permanent error in the writer too: spooled at once, not
    retried for retry_seconds. The spool holds the value as it was logged; replaying it meets the same refusal
    and spools it again, whole, under replay-failed/."""
    client = MlflowClient(tracking_uri)
    ensure_experiment(client, "e", tracking_uri)
    w = AsyncRunWriter(client, "0" * 32, spool_dir=tmp_path, retry_seconds=600.0)
    t0 = time.monotonic()
    w.log_metrics({"a": 1.0}, 7)
    w.close(timeout=60)
    assert time.monotonic() - t0 < 30
    [record] = [json.loads(line) for line in w.spooled_to.read_text().splitlines()]
    assert record["run_id"] == "0" * 32 and [m[0:2] + m[3:] for m in record["metrics"]] == [["a", 1.0, 7]]
    assert replay(w.spooled_to, tracking_uri) == 0
    [again] = list((tmp_path / "replay-failed").glob("mlflow-spool-*.jsonl"))
    assert [json.loads(line)["metrics"] for line in again.read_text().splitlines()] == [record["metrics"]]


def test_unreachable_server_spools_and_replay_delivers(tracking_uri, tmp_path, monkeypatch):
    store = MlflowClient(tracking_uri)
    run_id = store.create_run(ensure_experiment(store, "e", tracking_uri)).info.run_id
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    dead = MlflowClient("http://127.0.0.1:9")  # nothing listens on the discard port
    w = AsyncRunWriter(dead, run_id, spool_dir=tmp_path / "spool", retry_seconds=1.0)
    w.log_metrics({"train/loss": 0.5}, 0)
    w.log_metrics({"train/loss": 0.25}, 1)
    w.close(timeout=5)
    assert w.spooled_to is not None and w.spooled_to.exists()
    assert replay(w.spooled_to, tracking_uri) == 2
    assert [m.value for m in store.get_metric_history(run_id, "train/loss")] == [0.5, 0.25]


@pytest.mark.parametrize("exc,status", [(None, "FINISHED"), (RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_tracked_run_never_stays_running(tracking_uri, exc, status):
    run = None
    try:
        with TrackedRun(tracking_uri, "e", "r", params={"a": 1}) as run:
            run.writer.log_metrics({"x": 1.0}, 0)
            if exc:
                raise exc("boom")
    except (RuntimeError, KeyboardInterrupt):
        pass
    got = MlflowClient(tracking_uri).get_run(run.run_id)
    assert got.info.status == status
    assert got.data.metrics == {"x": 1.0} and got.data.params == {"a": "1"}
    if exc:
        assert "boom" in got.data.tags["error"]


def test_a_run_that_cannot_be_created_says_so_in_one_line(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = "http://bob:s3cret@127.0.0.1:9"  # nothing listens on the discard port
    with pytest.raises(TrackingUnavailable, match=r"could not create a run in http://bob:\*\*\*@127.0.0.1:9") as e:
        with TrackedRun(uri, "e", "r", params={}, server_timeout=1):
            pass
    assert "s3cret" not in str(e.value)


def test_redact_finds_urls_inside_messages():
    msg = "API request to http://bob:s3cret@host:5000/api/2.0/x failed; retry http://amy:pw@h/"
    assert redact(msg) == "API request to http://bob:***@host:5000/api/2.0/x failed; retry http://amy:***@h/"


def test_an_explicit_tracking_uri_wins_over_the_environment(tracking_uri, compose_cfg, tmp_path):
    from src.train import train

    explicit = f"sqlite:///{tmp_path / 'explicit.db'}"  # tracking_uri is $MLFLOW_TRACKING_URI here
    train(compose_cfg(["trainer.max_steps=2", "trainer.enable_progress_bar=false", "model.depth=2",
                       f"tracking.uri={explicit}"]))
    assert len(runs_of(explicit)[1]) == 1 and runs_of(tracking_uri)[1] == []


def test_an_explicit_sweep_storage_wins_over_the_environment(monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.setenv("GRADFLOW_SWEEP_STORAGE", "journal:from-env.journal")
    for overrides, want in (([], "journal:from-env.journal"),
                            (["hydra.sweeper.storage=journal:explicit.journal"], "journal:explicit.journal")):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=["hparams_search=grid", *overrides], return_hydra_config=True)
        assert cfg.hydra.sweeper.storage == want
