"""The MLflow transport: where runs go, and a writer that never makes the training thread wait.

Lightning's MLFlowLogger sends one synchronous request per `log_metrics` call (0.3-8 ms each); per-layer
statistics every step would make training several times slower. Here every write is queued and a
background thread merges the queue into `log_batch` requests (<= 1000 metrics each), retrying while the
server is unreachable and spooling to a local file what it still cannot send when the run ends.

Every end-of-run call (metric backlog, artifacts, final status) retries until one deadline,
`tracking.server_timeout` seconds after training ends; what is still unsent then (final status included)
goes to the spool file, and `python -m src.tracking replay <file>` sends it later.
"""
from __future__ import annotations

import atexit
import json
import os
import queue
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

from src.sink import Sink, SinkDied
from src.urls import redact, sqlite_path  # noqa: F401 - redact is part of this module's API

PARENT_RUN_ENV = "GRADFLOW_PARENT_RUN_ID"
RUN_ID_ENV = "GRADFLOW_RUN_ID"  # set by the sweep worker: the run it created for this trial, to adopt
SWEEP_KEYS_ENV = "GRADFLOW_SWEEP_KEYS"
# The MLflow UI opens experiments of this kind on the runs table, not on the GenAI traces overview.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100  # MLflow's log_batch limits per request
# The writer holds a batch open this long after its first value: MLflow's cost per value falls 2.5x from
# 80-value to 2000-value batches (0.23 -> 0.09 ms of CPU on SQLite, measured here), and that CPU is taken
# from the training thread (the GIL) or from a sibling sweep worker. The UI lags by at most this much.
LINGER_S = 1.0
# At most this many values wait in memory (~220 bytes each): past it, the training thread waits for the
# writer to catch up, so a run that logs faster than its store takes values does not grow without limit.
MAX_BACKLOG = 200_000

# Retries here are ours, bounded by a deadline. MLflow's own defaults (7 retries, backoff factor 2, 120 s
# timeout) hold one call for about 4 minutes against a stopped server, so a run's end would wait many
# minutes before it could spool. Users who set these variables keep their values.
# MLflow's own "View run at <url>" line would print a password given in the URL; ours is redacted.
for _var, _value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                     ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30"), ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")):
    os.environ.setdefault(_var, _value)


class TrackingUnavailable(RuntimeError):
    """The tracking store could not be reached in time to create the run."""


def resolve_uri(uri: str | None = None) -> str:
    """$MLFLOW_TRACKING_URI, else the configured uri, else the embedded store mlflow.db in the cwd."""
    chosen = os.environ.get("MLFLOW_TRACKING_URI") or uri
    return chosen or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def client(uri: str) -> MlflowClient:
    """An MlflowClient; for a SQLite store, created under a file lock beside the database. Creating the
    client creates or migrates the schema, and processes that do that at once on a new file all fail and
    leave it half-migrated (seen with 4 parallel runs). Later clients find the schema in place."""
    db = sqlite_path(uri)
    if db is None:
        return MlflowClient(uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock", timeout=300):
        return MlflowClient(uri)


def retrying(call, what: str, deadline: float):
    """call() until it succeeds or time.monotonic() passes deadline (then the last error is raised).
    A refusal the server understood (bad value, unknown run, not allowed) is raised at once."""
    delay = 0.5
    while True:
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - any transport failure: retry until the deadline
            if _is_permanent(e) or time.monotonic() + delay > deadline:
                raise
            print(f"mlflow: {what} failed ({redact(_first_line(e))}); retrying", file=sys.stderr)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    db, location = sqlite_path(uri), None
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
    """Queues metrics/params/tags for one run and sends them in log_batch requests from a thread; on Linux
    the requests themselves run in a forked process (src.sink), so MLflow's Python code never holds the
    training process's GIL. At most max_backlog values wait: past that, the caller waits for the writer."""

    def __init__(self, client: MlflowClient, run_id: str, spool_dir: str | Path | None = None,
                 retry_seconds: float = 600.0, linger: float = LINGER_S, process: bool = True,
                 max_backlog: int = MAX_BACKLOG):
        self.client, self.run_id, self.linger, self.max_backlog = client, run_id, linger, max_backlog
        self._sink: Sink | None = None
        if process and sys.platform == "linux":  # forked before this object starts its thread
            try:
                self._sink = Sink(client.tracking_uri)
            except Exception as e:  # noqa: BLE001 - e.g. inside a daemonic process: send from the thread
                print(f"mlflow: no writer process ({_first_line(e)}); sending from a thread", file=sys.stderr)
        self.spool_dir = Path(spool_dir) if spool_dir else Path.cwd()
        self.retry_seconds = retry_seconds
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        # values handed over and values sent or spooled; their difference is the backlog. `_done` is written
        # by the writer thread only; `_added` by any thread that logs (callers may log from several), under
        # `_add_lock`, since `+=` from two threads could lose updates
        self._added = self._done = 0
        self._add_lock = threading.Lock()
        self._waited = False
        self._deadline: float | None = None
        self._offline = False  # the deadline passed with the server unreachable: spool without trying
        self._spool_lock = threading.Lock()
        self.sent = 0
        self.spooled_to: Path | None = None
        self._thread = threading.Thread(target=self._loop, name="mlflow-writer", daemon=True)
        self._thread.start()

    # called from the training thread: O(1), never blocks on the network (only on a backlog past max_backlog)
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self._put("m", [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()])

    def log_params(self, params: dict[str, object]) -> None:
        self._put("p", [Param(k, str(v)[:6000]) for k, v in params.items()])

    def set_tags(self, tags: dict[str, object]) -> None:
        self._put("t", [RunTag(k, str(v)) for k, v in tags.items()])

    def _put(self, kind: str, values: list) -> None:
        if self.backlog > self.max_backlog and self._thread.is_alive():
            self._wait_for_backlog()
        with self._add_lock:
            self._added += len(values)
        self._q.put((kind, values))

    @property
    def backlog(self) -> int:
        """Values handed over and not yet sent or spooled."""
        return max(self._added - self._done, 0)

    def _wait_for_backlog(self) -> None:
        """Wait until half the bound is sent: memory stays bounded when values come faster than the
        store takes them (a slow server, or a cadence too dense for this machine)."""
        if not self._waited:
            self._waited = True
            print(f"mlflow: {self.backlog} values wait to be sent; training waits for the writer to catch up "
                  "(log fewer: e.g. a larger stats.log_every_n_steps)", file=sys.stderr)
        while self.backlog > self.max_backlog // 2 and self._thread.is_alive():
            time.sleep(0.01)

    def _loop(self) -> None:
        stop = False
        while not stop:
            batch = {"m": [], "p": [], "t": []}
            item, until = self._q.get(), time.monotonic() + self.linger
            while True:  # merge what arrives within `linger` of the first item into the same requests
                kind, payload = item
                if kind == "stop":
                    stop, until = True, 0.0  # take what is already queued, wait for nothing more
                else:
                    batch[kind].extend(payload)
                if len(batch["m"]) >= MAX_METRICS and not stop:
                    break
                try:
                    item = self._q.get(timeout=max(0.0, until - time.monotonic()))
                except queue.Empty:
                    break
            self._send(batch["m"], batch["p"], batch["t"])

    def _send(self, metrics: list, params: list, tags: list) -> None:
        while metrics or params or tags:
            m, p, t = metrics[:MAX_METRICS], params[:MAX_PARAMS], tags[:MAX_TAGS]
            if self._offline or not self._send_one(m, p, t):
                self._spool(metrics, params, tags)
                return
            metrics, params, tags = metrics[len(m):], params[len(p):], tags[len(t):]
            n = len(m) + len(p) + len(t)
            self._done += n
            self.sent += n

    def _send_one(self, m, p, t) -> bool:
        delay, started = 0.2, time.monotonic()
        while True:
            try:
                self._log_batch(m, p, t)
                return True
            except Exception as e:  # noqa: BLE001 - any transport failure: retry, then spool
                limit = started + self.retry_seconds
                if self._deadline is not None:
                    limit = min(limit, self._deadline)
                # past the bound the caller waits on us: spool now rather than retry for retry_seconds
                if time.monotonic() + delay > limit or _is_permanent(e) or self.backlog > self.max_backlog:
                    self._offline = self._deadline is not None and not _is_permanent(e)
                    print(f"mlflow: could not send {len(m) + len(p) + len(t)} values: "
                          f"{redact(_first_line(e))}", file=sys.stderr)
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _log_batch(self, m, p, t) -> None:
        if self._sink is not None:
            try:
                return self._sink.log_batch(self.run_id, m, p, t)
            except SinkDied as e:
                print(f"mlflow: {e}; sending from the training process from now on", file=sys.stderr)
                self._sink = None
        self.client.log_batch(self.run_id, metrics=m, params=p, tags=t, synchronous=True)

    def _spool(self, metrics, params, tags) -> None:
        self.spool({"metrics": [[x.key, x.value, x.timestamp, x.step] for x in metrics],
                    "params": {x.key: x.value for x in params}, "tags": {x.key: x.value for x in tags}})
        self._done += len(metrics) + len(params) + len(tags)

    def spool(self, record: dict) -> None:
        """Append one record for `replay`: metrics/params/tags, artifacts [[local, artifact_path]],
        or the final status (and end_time) of the run."""
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        path = self.spool_dir / f"mlflow-spool-{self.run_id}.jsonl"
        with self._spool_lock, path.open("a") as f:
            f.write(json.dumps({"run_id": self.run_id, **record}) + "\n")
        self.spooled_to = path

    def close(self, timeout: float = 120.0) -> None:
        """Send the backlog (printing progress while it is large), then stop the thread; what cannot be
        sent within `timeout` seconds is spooled."""
        self._deadline = time.monotonic() + timeout
        self._q.put(("stop", None))
        last = 0.0
        while self._thread.is_alive():
            self._thread.join(0.5)
            if self._thread.is_alive() and time.monotonic() - last > 2.0:
                print(f"mlflow: sending backlog, {self.backlog} values left ...", file=sys.stderr)
                last = time.monotonic()
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def print_replay_command(self) -> None:
        if self.spooled_to is not None:
            print(f"mlflow: some of run {self.run_id} could not be sent; replay it with:\n"
                  f"  python -m src.tracking replay {self.spooled_to}", file=sys.stderr)


def _is_permanent(e: Exception) -> bool:
    """A request the server understood and refused (bad value, unknown run, no permission): retrying
    cannot help."""
    return isinstance(e, MlflowException) and e.error_code in (
        "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "UNAUTHENTICATED", "PERMISSION_DENIED")


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
        w._deadline = time.monotonic() + timeout
        w._send([Metric(*m) for m in rec.get("metrics", [])],
                [Param(k, v) for k, v in rec.get("params", {}).items()],
                [RunTag(k, v) for k, v in rec.get("tags", {}).items()])
    for rec in records:  # artifacts and status after every value, so a FINISHED run is complete
        w, deadline = writers[rec["run_id"]], time.monotonic() + timeout
        for local, artifact_path in rec.get("artifacts", []):
            if _upload(store, rec["run_id"], local, artifact_path, deadline):
                n += 1
            else:
                w.spool({"artifacts": [[local, artifact_path]]})
        if "status" in rec:
            try:
                retrying(lambda: store.set_terminated(rec["run_id"], rec["status"], rec.get("end_time")),
                         "setting the run status", deadline)
            except Exception as e:  # noqa: BLE001
                print(f"mlflow: could not mark run {rec['run_id']} {rec['status']}: {redact(_first_line(e))}",
                      file=sys.stderr)
                w.spool({"status": rec["status"], "end_time": rec.get("end_time")})
    for w in writers.values():
        w.close(timeout)
        n += w.sent
        w.print_replay_command()
    return n


def _upload(store: MlflowClient, run_id: str, local: str, artifact_path: str | None, deadline: float) -> bool:
    """Upload a file, or a folder's contents, under artifact_path, retrying until deadline."""
    upload = store.log_artifacts if Path(local).is_dir() else store.log_artifact
    try:
        retrying(lambda: upload(run_id, str(local), artifact_path), f"uploading {local}", deadline)
        return True
    except Exception as e:  # noqa: BLE001 - an artifact upload failure must not fail the run
        print(f"mlflow: could not upload {local}: {redact(_first_line(e))}", file=sys.stderr)
        return False


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
                                      f"{redact(_first_line(e))}") from None
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
        offline = self.writer._offline
        for local, artifact_path in self._artifacts:
            if offline or not _upload(self.client, self.run_id, local, artifact_path, deadline):
                offline = offline or time.monotonic() >= deadline
                self.writer.spool({"artifacts": [[local, artifact_path]]})
        end_time = int(time.time() * 1000)
        try:
            if offline:
                raise TimeoutError("the tracking server did not answer before the deadline")
            retrying(lambda: self.client.set_terminated(self.run_id, status, end_time),
                     f"marking the run {status}", deadline)
            if self.uri.startswith(("http://", "https://")):
                print(f"mlflow: run at {redact(self.uri.rstrip('/'))}/#/experiments/{self.experiment_id}"
                      f"/runs/{self.run_id}")
        except Exception as e:  # noqa: BLE001 - the status is spooled with the rest, replay sets it
            print(f"mlflow: could not mark run {self.run_id} {status}: {redact(_first_line(e))}", file=sys.stderr)
            self.writer.spool({"status": status, "end_time": end_time})
        self.writer.print_replay_command()


class MultirunParentRun(Callback):
    """Hydra callback: one parent MLflow run per multirun; jobs find it through $GRADFLOW_PARENT_RUN_ID
    and name their child run by the swept overrides ($GRADFLOW_SWEEP_KEYS)."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.failed = False

    def on_multirun_start(self, config, **kwargs) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        if "gradflow_sweeper" in str(config.hydra.sweeper.get("_target_", "")):
            return  # the sweep engine keeps one parent run per study, shared by its workers

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
            "gradflow.multirun": "true", "gradflow.overrides": redact(" ".join(overrides))[:5000],
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
        try:  # a server that is down right now may be back within a minute
            retrying(lambda: self.client.set_terminated(self.run_id, status), f"marking the multirun {status}",
                     time.monotonic() + 60)
        except Exception as e:  # noqa: BLE001 - the jobs' own runs are complete; say which parent is left
            print(f"mlflow: could not mark multirun {self.run_id} {status}: {redact(_first_line(e))}", file=sys.stderr)
        self.run_id = None
        os.environ.pop(PARENT_RUN_ENV, None)
        os.environ.pop(SWEEP_KEYS_ENV, None)
        atexit.unregister(self._finish)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "replay":
        print(f"replayed {replay(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)} values")
    else:
        sys.exit("usage: python -m src.tracking replay SPOOL_FILE [TRACKING_URI]")
