"""AsyncRunWriter: metrics, params and tags of one run, sent without ever making the training thread wait.

Lightning's MLFlowLogger sends one synchronous request per `log_metrics` call; per-layer statistics every
step would make training several times slower. Here every write is queued and a background thread merges the
queue into `log_batch` requests (at most MLflow's limits each), retrying while the server is unreachable and
spooling to a local file what it still cannot send (src.tracking.spool replays it).
"""
from __future__ import annotations

import json
import queue
import sys
import threading
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from src.tracking.retry import backoff, first_line, is_permanent
from src.tracking.sink import Sink, SinkDied
from src.tracking.urls import redact

MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100  # MLflow's log_batch limits per request
# The writer holds a batch open this long after its first value: MLflow's CPU cost per value falls several
# fold from batches of tens to batches of thousands, and that CPU is taken from the training thread (the GIL)
# or from a sibling sweep worker. The UI lags by at most this much.
LINGER_S = 1.0
# At most this many values wait in memory (a few hundred bytes each): past it, the training thread waits for
# the writer to catch up, so a run that logs faster than its store takes values does not grow without limit.
MAX_BACKLOG = 200_000


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
                print(f"mlflow: no writer process ({first_line(e)}); sending from a thread", file=sys.stderr)
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

    def send_now(self, metrics: list, params: list, tags: list, deadline: float | None = None) -> None:
        """Send on the caller's thread (replay has no training thread to spare), retrying until `deadline`
        (time.monotonic()); what is still unsent then is spooled."""
        if deadline is not None:
            self._deadline = deadline
        self._send(metrics, params, tags)

    @property
    def offline(self) -> bool:
        """The deadline passed with the server unreachable: what comes now is spooled without trying."""
        return self._offline

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
        started = time.monotonic()
        for delay in backoff(0.2):
            try:
                self._log_batch(m, p, t)
                return True
            except Exception as e:  # noqa: BLE001 - any transport failure: retry, then spool
                limit = started + self.retry_seconds
                if self._deadline is not None:
                    limit = min(limit, self._deadline)
                # past the bound the caller waits on us: spool now rather than retry for retry_seconds
                if time.monotonic() + delay > limit or is_permanent(e) or self.backlog > self.max_backlog:
                    self._offline = self._deadline is not None and not is_permanent(e)
                    print(f"mlflow: could not send {len(m) + len(p) + len(t)} values: "
                          f"{redact(first_line(e))}", file=sys.stderr)
                    return False
                time.sleep(delay)

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
