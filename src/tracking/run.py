"""TrackedRun: one MLflow run, created on enter and FINISHED / FAILED / KILLED (Ctrl-C) on exit, never left
RUNNING. At its end the backlog, then the artifacts, then the final status are sent, each retried until one
deadline, `tracking.server_timeout` seconds after training ended; what is still unsent then (the final status
included) goes to the spool file, and the command that replays it is printed."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from src.tracking.env import PARENT_RUN_ENV, RUN_ID_ENV
from src.tracking.retry import first_line, retrying
from src.tracking.spool import upload
from src.tracking.store import TrackingUnavailable, client, ensure_experiment
from src.tracking.urls import redact
from src.tracking.writer import AsyncRunWriter


class TrackedRun:
    def __init__(self, uri: str, experiment: str, run_name: str, params: dict, tags: dict | None = None,
                 spool_dir: str | Path | None = None, server_timeout: float = 120.0):
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.params, self.tags, self.spool_dir = params, dict(tags or {}), spool_dir
        self.server_timeout = server_timeout
        self._artifacts: list[tuple[str, str | None]] = []

    def __enter__(self) -> "TrackedRun":
        started = time.monotonic()
        deadline = started + self.server_timeout
        parent = os.environ.get(PARENT_RUN_ENV)
        if parent:
            self.tags["mlflow.parentRunId"] = parent
        try:
            self.client = client(self.uri)
            self.run_id = os.environ.get(RUN_ID_ENV)  # a sweep trial: the worker created the run, so it
            if self.run_id is None:                    # can close it if this process dies
                exp_id = retrying(lambda: ensure_experiment(self.client, self.experiment, self.uri),
                                  "reaching the tracking store", deadline)
                self.run_id = retrying(lambda: self.client.create_run(exp_id, run_name=self.run_name,
                                                                      tags=self.tags),
                                       "creating the run", deadline).info.run_id
            else:
                exp_id = retrying(lambda: self.client.get_run(self.run_id).info.experiment_id,
                                  "reaching the tracking store", deadline)
            self.experiment_id = exp_id
        except Exception as e:
            waited = f" (tried for {time.monotonic() - started:.0f} s)" if time.monotonic() >= deadline else ""
            raise TrackingUnavailable(f"could not create a run in {redact(self.uri)}{waited}: "
                                      f"{redact(first_line(e))}") from None
        self.writer = AsyncRunWriter(self.client, self.run_id, spool_dir=self.spool_dir)
        if os.environ.get(RUN_ID_ENV):
            self.writer.set_tags(self.tags)
        self.writer.log_params(self.params)
        return self

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, under artifact_path when the run ends (after the
        metrics, within the same deadline; spooled for replay if the server cannot take it)."""
        self._artifacts.append((str(Path(path).resolve()), artifact_path))

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "FINISHED" if exc_type is None else "KILLED" if exc_type is KeyboardInterrupt else "FAILED"
        if exc is not None:
            self.writer.set_tags({"error": redact(f"{exc_type.__name__}: {exc}")[:5000]})
        deadline = time.monotonic() + self.server_timeout
        self.writer.close(self.server_timeout)
        offline = self.writer.offline
        for local, artifact_path in self._artifacts:
            if offline or not upload(self.client, self.run_id, local, artifact_path, deadline):
                offline = offline or time.monotonic() >= deadline
                self.writer.spool({"artifacts": [[local, artifact_path]]})
        end_time = int(time.time() * 1000)
        try:
            if offline:
                raise TimeoutError("the tracking server did not answer before the deadline")
            retrying(lambda: self.client.set_terminated(self.run_id, status, end_time),
                     f"marking the run {status}", deadline)
        except Exception as e:  # noqa: BLE001 - the status is spooled with the rest, replay sets it
            print(f"mlflow: could not mark run {self.run_id} {status}: {redact(first_line(e))}", file=sys.stderr)
            self.writer.spool({"status": status, "end_time": end_time})
        self.writer.print_replay_command()
