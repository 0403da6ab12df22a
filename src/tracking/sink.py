"""MLflow's `log_batch` in a process of its own, called like the client's.

MLflow's store code is pure Python (SQLAlchemy for the embedded SQLite store, JSON and HTTP for a server).
Run from a thread of the training process it holds the GIL that the training thread needs again after
every torch op, so a small net's step waits for the writer far longer than the writer computes
(benchmarks/writer.py measures both designs). A forked process has its own GIL; the training process only
pickles plain tuples into a pipe.

The process is forked (no interpreter start-up, no imports) before the writer thread starts, and drops
what it must not share with its parent: the SQLAlchemy connection pools and the HTTP sessions. It exits
on its parent's `close()`, or when the pipe reports that the parent is gone.
"""
from __future__ import annotations

import multiprocessing as mp
import os

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ErrorCode
from mlflow.tracking import MlflowClient


class SinkDied(RuntimeError):
    """The sink process is gone; the caller logs from its own process from now on."""


class Sink:
    def __init__(self, uri: str):
        ctx = mp.get_context("fork")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(uri, child, self._conn), name="mlflow-sink", daemon=True)
        self.process.start()
        child.close()

    def log_batch(self, run_id: str, metrics: list[Metric], params: list[Param], tags: list[RunTag]) -> None:
        """As MlflowClient.log_batch (synchronous); raises the store's error, or SinkDied."""
        try:
            self._conn.send((run_id, [(m.key, m.value, m.timestamp, m.step) for m in metrics],
                             [(p.key, p.value) for p in params], [(t.key, t.value) for t in tags]))
            error = self._conn.recv()
        except (EOFError, OSError) as e:
            raise SinkDied(f"the MLflow sink process ended ({e!r})") from e
        if error is not None:
            message, code = error
            if code not in ErrorCode.keys():
                raise RuntimeError(message)
            raise MlflowException(message, error_code=ErrorCode.Value(code))

    def close(self, timeout: float = 10.0) -> None:
        try:
            self._conn.send(None)
        except OSError:
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._conn.close()


def _serve(uri: str, conn, parent_end) -> None:
    parent_end.close()  # else this process holds the pipe open itself and never sees its parent go
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # its queue and threads belong to the parent
    drop_inherited_connections()
    client = MlflowClient(uri)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if msg is None:
            break
        run_id, metrics, params, tags = msg
        try:
            client.log_batch(run_id, metrics=[Metric(*m) for m in metrics], params=[Param(*p) for p in params],
                             tags=[RunTag(*t) for t in tags], synchronous=True)
            reply = None
        except Exception as e:  # noqa: BLE001 - the parent decides: retry, spool, or give up
            reply = (str(e), getattr(e, "error_code", None) if isinstance(e, MlflowException) else None)
        try:
            conn.send(reply)
        except OSError:
            break
    os._exit(0)  # the parent's atexit handlers are not ours, nor its stdio buffers


def drop_inherited_connections() -> None:
    """A forked child must not use its parent's pooled database connections (SQLAlchemy's rule for fork)
    nor its keep-alive HTTP connections: both would interleave on one socket or file handle."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.utils import request_utils

    for engine in SqlAlchemyStore._engine_map.values():
        engine.dispose(close=False)
    request_utils._cached_get_request_session.cache_clear()
