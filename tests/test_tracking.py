"""The MLflow transport against real stores: batching, retry, spool and replay."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from src import tracking


def test_resolve_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.resolve_uri("sqlite:///x.db") == "sqlite:///x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_uri("sqlite:///x.db") == "http://127.0.0.1:5000"


def test_redact_hides_passwords():
    assert tracking.redact("postgresql://bob:s3cret@db:5432/mlflow") == "postgresql://bob:***@db:5432/mlflow"
    assert tracking.redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_experiment_is_created_once_with_artifacts_beside_the_store(tracking_uri, tmp_path):
    client = MlflowClient(tracking_uri)
    a = tracking.ensure_experiment(client, "e", tracking_uri)
    assert tracking.ensure_experiment(client, "e", tracking_uri) == a
    exp = client.get_experiment(a)
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_writer_splits_large_batches_and_delivers_everything(tracking_uri):
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(tracking.ensure_experiment(client, "e", tracking_uri)).info.run_id
    w = tracking.AsyncRunWriter(client, run_id)
    for step in range(3):  # 3 x 1500 metrics: more than one log_batch request each
        w.log_metrics({f"m/layer_{i:04d}": step + i for i in range(1500)}, step)
    w.log_params({f"p{i}": i for i in range(250)})
    w.close()
    assert w.sent == 3 * 1500 + 250 and w.spooled_to is None
    hist = client.get_metric_history(run_id, "m/layer_1499")
    assert [(m.step, m.value) for m in hist] == [(0, 1499.0), (1, 1500.0), (2, 1501.0)]
    assert len(client.get_run(run_id).data.params) == 250


def test_unreachable_server_spools_and_replay_delivers(tracking_uri, tmp_path, monkeypatch):
    store = MlflowClient(tracking_uri)
    run_id = store.create_run(tracking.ensure_experiment(store, "e", tracking_uri)).info.run_id
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    dead = MlflowClient("http://127.0.0.1:9")  # nothing listens on the discard port
    w = tracking.AsyncRunWriter(dead, run_id, spool_dir=tmp_path / "spool", retry_seconds=1.0)
    w.log_metrics({"train/loss": 0.5}, 0)
    w.log_metrics({"train/loss": 0.25}, 1)
    w.close(timeout=5)
    assert w.spooled_to is not None and w.spooled_to.exists()
    assert tracking.replay(w.spooled_to, tracking_uri) == 2
    assert [m.value for m in store.get_metric_history(run_id, "train/loss")] == [0.5, 0.25]


@pytest.mark.parametrize("exc,status", [(None, "FINISHED"), (RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_tracked_run_never_stays_running(tracking_uri, exc, status):
    run = None
    try:
        with tracking.TrackedRun(tracking_uri, "e", "r", params={"a": 1}) as run:
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
    with pytest.raises(tracking.TrackingUnavailable, match=r"could not create a run in http://bob:\*\*\*@127.0.0.1:9") as e:
        with tracking.TrackedRun(uri, "e", "r", params={}, server_timeout=1):
            pass
    assert "s3cret" not in str(e.value)


def test_redact_finds_urls_inside_messages():
    msg = "API request to http://bob:s3cret@host:5000/api/2.0/x failed; retry http://amy:pw@h/"
    assert tracking.redact(msg) == "API request to http://bob:***@host:5000/api/2.0/x failed; retry http://amy:***@h/"
