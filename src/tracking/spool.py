"""Replaying a run's spool file: what a run could not send before its deadline (values, artifact paths, the
final status) is appended to mlflow-spool-<run_id>.jsonl in the run's folder, one JSON record a line, and
`python -m src.tracking replay <file>` sends it once the server is back."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from src.tracking.retry import first_line, retrying
from src.tracking.store import client, resolve_uri
from src.tracking.urls import redact
from src.tracking.writer import AsyncRunWriter


def replay(spool: str | Path, uri: str | None = None, timeout: float = 120.0) -> int:
    """Send a spool file's records to the tracking store (values, then artifacts, then the final
    status); returns the number of values and artifacts sent. What fails again is spooled anew under
    replay-failed/ beside the file."""
    store, n = client(resolve_uri(uri)), 0
    records = [json.loads(line) for line in Path(spool).read_text().splitlines() if line.strip()]
    writers: dict[str, AsyncRunWriter] = {}
    for rec in records:
        run_id = rec["run_id"]
        w = writers.setdefault(run_id, AsyncRunWriter(store, run_id, spool_dir=Path(spool).parent / "replay-failed",
                                                      process=False))  # no training thread to spare
        w.send_now([Metric(*m) for m in rec.get("metrics", [])],
                   [Param(k, v) for k, v in rec.get("params", {}).items()],
                   [RunTag(k, v) for k, v in rec.get("tags", {}).items()], deadline=time.monotonic() + timeout)
    for rec in records:  # artifacts and status after every value, so a FINISHED run is complete
        w, deadline = writers[rec["run_id"]], time.monotonic() + timeout
        for local, artifact_path in rec.get("artifacts", []):
            if upload(store, rec["run_id"], local, artifact_path, deadline):
                n += 1
            else:
                w.spool({"artifacts": [[local, artifact_path]]})
        if "status" in rec:
            try:
                retrying(lambda: store.set_terminated(rec["run_id"], rec["status"], rec.get("end_time")),
                         "setting the run status", deadline)
            except Exception as e:  # noqa: BLE001
                print(f"mlflow: could not mark run {rec['run_id']} {rec['status']}: {redact(first_line(e))}",
                      file=sys.stderr)
                w.spool({"status": rec["status"], "end_time": rec.get("end_time")})
    for w in writers.values():
        w.close(timeout)
        n += w.sent
        w.print_replay_command()
    return n


def upload(store: MlflowClient, run_id: str, local: str, artifact_path: str | None, deadline: float) -> bool:
    """Upload a file, or a folder's contents, under artifact_path, retrying until deadline."""
    upload = store.log_artifacts if Path(local).is_dir() else store.log_artifact
    try:
        retrying(lambda: upload(run_id, str(local), artifact_path), f"uploading {local}", deadline)
        return True
    except Exception as e:  # noqa: BLE001 - an artifact upload failure must not fail the run
        print(f"mlflow: could not upload {local}: {redact(first_line(e))}", file=sys.stderr)
        return False
