"""Where runs go: the tracking URI, a client for it, and the experiment a run belongs to."""
from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from src.tracking.urls import sqlite_path

# The MLflow UI opens experiments of this kind on the runs table, not on the GenAI traces overview.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}

# Retries are ours, bounded by a deadline (src.tracking.retry). MLflow's own defaults (7 retries, backoff
# factor 2, 120 s timeout) hold one call for minutes against a stopped server, so a run's end would wait far
# longer than tracking.server_timeout before it could spool. MLflow's own "View run at <url>" line would print
# a password given in the URL; ours is redacted. Users who set these variables keep their values.
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


class TrackingUnavailable(RuntimeError):
    """The tracking store could not be reached in time to create the run."""


def resolve_uri(uri: str | None = None) -> str:
    """The uri given (tracking.uri), else $MLFLOW_TRACKING_URI, else the embedded store mlflow.db in the cwd: an
    explicit value wins over the environment, as in MLflow's own mlflow.set_tracking_uri."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def client(uri: str) -> MlflowClient:
    """An MlflowClient, with this project's HTTP retry defaults in the environment MLflow reads them from;
    for a SQLite store, created under a file lock beside the database. Creating the client creates or
    migrates the schema, and processes that do that at once on a new file all fail and leave it
    half-migrated. Later clients find the schema in place."""
    for var, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(var, value)
    db = sqlite_path(uri)
    if db is None:
        return MlflowClient(uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock", timeout=300):
        return MlflowClient(uri)


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The experiment's id, created (with artifacts beside a SQLite file, not in the cwd) if it is new."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    db, location = sqlite_path(uri), None
    if db is not None:
        location = (db.parent / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except MlflowException:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
