"""The MLflow transport: where runs go, and a writer that never makes the training thread wait.

Lightning's MLFlowLogger sends one synchronous request per `log_metrics` call (0.3-8 ms each); per-layer
statistics every step would make training several times slower. Here every write is queued and a
background thread merges the queue into `log_batch` requests (<= 1000 metrics each), retrying while the
server is unreachable and spooling to a local file what it still cannot send when the run ends.
"""
from __future__ import annotations

import atexit
import json
import os
import queue
import re
import sys
import threading
import time
from pathlib import Path

from filelock import FileLock
from hydra.experimental.callback import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

PARENT_RUN_ENV = "GRADFLOW_PARENT_RUN_ID"
SWEEP_KEYS_ENV = "GRADFLOW_SWEEP_KEYS"
# The MLflow UI opens experiments of this kind on the runs table, not on the GenAI traces overview.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100  # MLflow's log_batch limits per request


def resolve_uri(uri: str | None = None) -> str:
    """$MLFLOW_TRACKING_URI, else the configured uri, else the embedded store mlflow.db in the cwd."""
    chosen = os.environ.get("MLFLOW_TRACKING_URI") or uri
    return chosen or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def client(uri: str) -> MlflowClient:
    """An MlflowClient; for a SQLite store, created under a file lock beside the database. Creating the
    client creates or migrates the schema, and processes that do that at once on a new file all fail and
    leave it half-migrated (seen with 4 parallel runs). Later clients find the schema in place."""
    db = _sqlite_path(uri)
    if db is None:
        return MlflowClient(uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock", timeout=300):
        return MlflowClient(uri)


def redact(uri: str) -> str:
    """The URI with any password replaced, safe to print or log."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", uri)


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    db, location = _sqlite_path(uri), None
    if db is not None:  # keep artifacts beside the database file, not in the cwd
        location = (db.parent / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except MlflowException:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class AsyncRunWriter:
    """Queues metrics/params/tags for one run and sends them in log_batch requests from a thread."""

    def __init__(self, client: MlflowClient, run_id: str, spool_dir: str | Path | None = None,
                 retry_seconds: float = 600.0):
        self.client, self.run_id = client, run_id
        self.spool_dir = Path(spool_dir) if spool_dir else Path.cwd()
        self.retry_seconds = retry_seconds
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._queued = 0  # metrics+params+tags not yet sent (approximate, for progress lines)
        self._deadline: float | None = None
        self.sent = 0
        self.spooled_to: Path | None = None
        self._thread = threading.Thread(target=self._loop, name="mlflow-writer", daemon=True)
        self._thread.start()

    # called from the training thread: O(1), never blocks on the network
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self._queued += len(metrics)
        self._q.put(("m", [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]))

    def log_params(self, params: dict[str, object]) -> None:
        self._queued += len(params)
        self._q.put(("p", [Param(k, str(v)[:6000]) for k, v in params.items()]))

    def set_tags(self, tags: dict[str, object]) -> None:
        self._queued += len(tags)
        self._q.put(("t", [RunTag(k, str(v)) for k, v in tags.items()]))

    def _loop(self) -> None:
        stop = False
        while not stop:
            items = [self._q.get()]
            while True:  # merge whatever else is waiting into the same requests
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
            batch = {"m": [], "p": [], "t": []}
            for kind, payload in items:
                if kind == "stop":
                    stop = True
                else:
                    batch[kind].extend(payload)
            self._send(batch["m"], batch["p"], batch["t"])

    def _send(self, metrics: list, params: list, tags: list) -> None:
        while metrics or params or tags:
            m, p, t = metrics[:MAX_METRICS], params[:MAX_PARAMS], tags[:MAX_TAGS]
            if not self._send_one(m, p, t):
                self._spool(metrics, params, tags)
                return
            metrics, params, tags = metrics[len(m):], params[len(p):], tags[len(t):]
            n = len(m) + len(p) + len(t)
            self._queued -= n
            self.sent += n

    def _send_one(self, m, p, t) -> bool:
        delay, started = 0.2, time.monotonic()
        while True:
            try:
                self.client.log_batch(self.run_id, metrics=m, params=p, tags=t, synchronous=True)
                return True
            except Exception as e:  # noqa: BLE001 - any transport failure: retry, then spool
                limit = started + self.retry_seconds
                if self._deadline is not None:
                    limit = min(limit, self._deadline)
                if time.monotonic() + delay > limit or _is_permanent(e):
                    print(f"mlflow: could not send {len(m) + len(p) + len(t)} values: {e}", file=sys.stderr)
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _spool(self, metrics, params, tags) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        path = self.spool_dir / f"mlflow-spool-{self.run_id}.jsonl"
        with path.open("a") as f:
            f.write(json.dumps({
                "run_id": self.run_id,
                "metrics": [[x.key, x.value, x.timestamp, x.step] for x in metrics],
                "params": {x.key: x.value for x in params},
                "tags": {x.key: x.value for x in tags},
            }) + "\n")
        self._queued -= len(metrics) + len(params) + len(tags)
        self.spooled_to = path

    def close(self, timeout: float = 120.0) -> None:
        """Send the backlog (printing progress while it is large), then stop the thread."""
        self._deadline = time.monotonic() + timeout
        self._q.put(("stop", None))
        last = 0.0
        while self._thread.is_alive():
            self._thread.join(0.5)
            if self._thread.is_alive() and time.monotonic() - last > 2.0:
                print(f"mlflow: sending backlog, {max(self._queued, 0)} values left ...", file=sys.stderr)
                last = time.monotonic()
        if self.spooled_to is not None:
            print(f"mlflow: some values could not be sent; replay them with:\n"
                  f"  python -m src.tracking replay {self.spooled_to}", file=sys.stderr)


def _is_permanent(e: Exception) -> bool:
    """A request the server understood and refused (bad value, unknown run): retrying cannot help."""
    return isinstance(e, MlflowException) and e.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")


def replay(spool: str | Path, uri: str | None = None) -> int:
    """Send a spool file's records to the tracking store; returns the number of values sent."""
    store, n = client(resolve_uri(uri)), 0
    for line in Path(spool).read_text().splitlines():
        rec = json.loads(line)
        writer = AsyncRunWriter(store, rec["run_id"], spool_dir=Path(spool).parent / "replay-failed")
        writer._send([Metric(*m) for m in rec["metrics"]], [Param(k, v) for k, v in rec["params"].items()],
                     [RunTag(k, v) for k, v in rec["tags"].items()])
        writer.close()
        n += writer.sent
    return n


class MlflowAsyncLogger(Logger):
    """A Lightning logger that hands metrics to an AsyncRunWriter and keeps the run-level scalars
    (train/*, val/*) in memory for the end-of-run plots."""

    def __init__(self, writer: AsyncRunWriter, experiment: str):
        super().__init__()
        self.writer, self._experiment = writer, experiment
        self.history: dict[str, list[tuple[int, float]]] = {}

    @property
    def name(self) -> str:
        return self._experiment

    @property
    def version(self) -> str:
        return self.writer.run_id

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = int(step or 0)
        for k, v in metrics.items():
            if "/layer_" not in k:
                self.history.setdefault(k, []).append((step, float(v)))
        self.writer.log_metrics(metrics, step)

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the resolved Hydra config is logged as params when the run starts


class TrackedRun:
    """One MLflow run: created on enter, FINISHED / FAILED / KILLED (Ctrl-C) on exit, never left RUNNING."""

    def __init__(self, uri: str, experiment: str, run_name: str, params: dict, tags: dict | None = None,
                 spool_dir: str | Path | None = None):
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.params, self.tags, self.spool_dir = params, dict(tags or {}), spool_dir

    def __enter__(self) -> "TrackedRun":
        self.client = client(self.uri)
        exp_id = ensure_experiment(self.client, self.experiment, self.uri)
        parent = os.environ.get(PARENT_RUN_ENV)
        if parent:
            self.tags["mlflow.parentRunId"] = parent
        self.run_id = self.client.create_run(exp_id, run_name=self.run_name, tags=self.tags).info.run_id
        self.writer = AsyncRunWriter(self.client, self.run_id, spool_dir=self.spool_dir)
        self.writer.log_params(self.params)
        return self

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, under artifact_path."""
        upload = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
        try:
            upload(self.run_id, str(path), artifact_path)
        except Exception as e:  # noqa: BLE001 - an artifact upload failure must not fail the run
            print(f"mlflow: could not upload {path}: {e}", file=sys.stderr)

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "FINISHED" if exc_type is None else "KILLED" if exc_type is KeyboardInterrupt else "FAILED"
        if exc is not None:
            self.writer.set_tags({"error": f"{exc_type.__name__}: {exc}"[:5000]})
        self.writer.close()
        for attempt in range(20):
            try:
                self.client.set_terminated(self.run_id, status)
                return
            except Exception as e:  # noqa: BLE001 - server may be briefly down; keep trying a while
                if attempt == 19:
                    print(f"mlflow: could not mark run {self.run_id} {status}: {e}", file=sys.stderr)
                time.sleep(min(0.5 * 2 ** attempt, 5.0))


class MultirunParentRun(Callback):
    """Hydra callback: one parent MLflow run per multirun; jobs find it through $GRADFLOW_PARENT_RUN_ID
    and name their child run by the swept overrides ($GRADFLOW_SWEEP_KEYS)."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.failed = False

    def on_multirun_start(self, config, **kwargs) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

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
        exp_id = ensure_experiment(self.client, config.tracking.experiment, uri)
        name = "multirun " + " ".join(swept or overrides)
        self.run_id = self.client.create_run(exp_id, run_name=name[:250], tags={
            "gradflow.multirun": "true", "gradflow.overrides": " ".join(overrides)[:5000],
        }).info.run_id
        os.environ[PARENT_RUN_ENV] = self.run_id
        os.environ[SWEEP_KEYS_ENV] = ",".join(keys)
        atexit.register(self._finish, "FAILED")  # a sweep that raises never reaches on_multirun_end

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        if self.run_id and job_return.status == JobStatus.FAILED:
            self.failed = True

    def on_multirun_end(self, config, **kwargs) -> None:
        self._finish("FAILED" if self.failed else "FINISHED")

    def _finish(self, status: str) -> None:
        if self.run_id is None:
            return
        self.client.set_terminated(self.run_id, status)
        self.run_id = None
        os.environ.pop(PARENT_RUN_ENV, None)
        os.environ.pop(SWEEP_KEYS_ENV, None)
        atexit.unregister(self._finish)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "replay":
        print(f"replayed {replay(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)} values")
    else:
        sys.exit("usage: python -m src.tracking replay SPOOL_FILE [TRACKING_URI]")
