"""The storage a study lives in, shared by every worker: `journal:<file>` (default), `redis://...`, an RDB
(`sqlite:///...`, `postgresql://...`), or `grpc://host:port`, Optuna's storage proxy in front of one; the locks that make creating a schema and changing a trial's state
safe when many workers do it at once."""
from __future__ import annotations

import re
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import optuna
from filelock import FileLock
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalRedisBackend, JournalStorage

from src.sweeps.space import SweepConfigError
from src.tracking.urls import redact, sqlite_path

DEFAULT_STORAGE = "journal:sweeps/optuna.journal"
SCHEMA_LOCK_ID = 0x6772616466  # any constant shared by all workers ("gradf")
# One connection kept per process, one more while a call overlaps: a worker talks to its study from one
# thread, so N workers hold about N connections, not SQLAlchemy's default of up to 15 each (docs/cluster.md has
# the arithmetic). pool_pre_ping: a worker that idles while a trial runs must not reuse a dropped connection.
ENGINE = {"pool_pre_ping": True, "pool_size": 1, "max_overflow": 1}
PROXY_WAIT_S = 120
RDB_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg2", "postgresql+psycopg", "mysql", "mysql+pymysql")


def open_storage(url: str | None) -> optuna.storages.BaseStorage:
    """`journal:<file>` (default; several processes on one machine, or a shared filesystem), `redis://...`
    (journal on Redis), or an SQLAlchemy URL (`sqlite:///...`, `postgresql://...`: a cluster)."""
    url = url or DEFAULT_STORAGE
    if url.startswith(("postgresql://", "postgres://")):  # psycopg 3, the driver we install, also where an
        url = "postgresql+psycopg://" + url.split("://", 1)[1]  # older SQLAlchemy would pick psycopg2
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):]).expanduser()
        if not path.name:
            raise SweepConfigError(f"hydra.sweeper.storage={url}: journal:<file> needs a file name")
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if scheme == "grpc":  # Optuna's gRPC proxy (python -m src.sweeps proxy) in front of the database
        host, _, port = url.split("://", 1)[1].rstrip("/").partition(":")
        try:
            from optuna.storages import GrpcStorageProxy
        except ImportError:
            raise SweepConfigError(f"hydra.sweeper.storage={url}: the gRPC proxy needs grpcio: "
                                   "pip install -e '.[grpc]'") from None
        with warnings.catch_warnings():  # "experimental" on every worker's stderr says nothing a user can act on
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            proxy = GrpcStorageProxy(host=host, port=int(port or 13000))
        # Workers and the proxy are often started together (one SLURM job, one compose up): wait for it to
        # listen rather than fail the first call with "connection refused".
        try:
            proxy.wait_server_ready(timeout=PROXY_WAIT_S)
        except ConnectionError:
            raise SweepConfigError(f"hydra.sweeper.storage={url}: no storage proxy answered in {PROXY_WAIT_S} s "
                                   "(start one with: python -m src.sweeps proxy)") from None
        return proxy
    if scheme == "redis":
        try:
            return JournalStorage(JournalRedisBackend(url))
        except ImportError:  # Optuna imports the client only here
            raise SweepConfigError(f"hydra.sweeper.storage={redact(url)}: a Redis storage needs the redis package: "
                                   "pip install -e '.[redis]'") from None
    if scheme in RDB_SCHEMES:
        lock = nullcontext()
        # Workers that create the schema of a new database at once collide on its version table.
        db = sqlite_path(url)
        if db is not None:
            lock = FileLock(f"{db}.lock", timeout=300)
        elif scheme.startswith("postgresql"):
            lock = _pg_advisory_lock(url)
        try:
            with lock:
                storage = RDBStorage(url, engine_kwargs=ENGINE)
        except Exception as e:  # noqa: BLE001 - SQLAlchemy/driver errors carry the URL with its password
            raise SweepConfigError(f"hydra.sweeper.storage={redact(url)}: cannot open the storage: "
                                   f"{redact(str(e)).splitlines()[0]}") from None
        if db is not None:
            # SQLite ignores SELECT ... FOR UPDATE, so two workers can both move one WAITING trial to RUNNING
            # (seen: 13 runs of a 12-point grid with 4 workers). State changes are serialised by a file lock.
            storage._gradflow_transition_lock = FileLock(f"{db}.claims.lock", timeout=300)
        return storage
    raise SweepConfigError(
        f"hydra.sweeper.storage={redact(url)}: expected journal:<file>, redis://host:port, sqlite:///<file>, "
        "postgresql://user@host/db or grpc://host:port (the proxy)")


@contextmanager
def _pg_advisory_lock(url: str):
    """PostgreSQL's session advisory lock, held while the schema is created or checked."""
    import psycopg

    with psycopg.connect(re.sub(r"^postgresql\+\w+://", "postgresql://", url), autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK_ID,))
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK_ID,))


def serve_proxy(url: str, host: str, port: int) -> None:
    """Optuna's gRPC storage proxy on host:port in front of the storage `url`, until interrupted: workers given
    grpc://host:port share the proxy's connections instead of holding their own (docs/cluster.md)."""
    if sqlite_path(url) is not None:  # claims on SQLite are serialised by our file lock, which the proxy skips
        raise SweepConfigError(f"hydra.sweeper.storage={url}: the proxy is for PostgreSQL or a journal, not SQLite")
    try:
        from optuna.storages import run_grpc_proxy_server
    except ImportError:
        raise SweepConfigError("the gRPC proxy needs grpcio: pip install -e '.[grpc]'") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        run_grpc_proxy_server(open_storage(url), host=host, port=port)


def describe_storage(url: str | None) -> str:
    return redact(url or DEFAULT_STORAGE)


def storage_of(study: optuna.Study):
    """The study's storage object. Optuna exposes no public way to move one given WAITING trial to RUNNING
    (ask() may create a new trial instead) or to renew a lease outside optimize(); the storage API it uses
    itself does both atomically."""
    return study._storage


def transition_lock(study: optuna.Study):
    """The lock that serialises trial state changes where the database cannot (SQLite), else a no-op."""
    storage = storage_of(study)  # Optuna wraps an RDBStorage in a cache layer that keeps it as `_backend`
    return getattr(storage, "_gradflow_transition_lock", None) or getattr(
        getattr(storage, "_backend", None), "_gradflow_transition_lock", None) or nullcontext()


def transition(study: optuna.Study, trial_id: int, state) -> bool:
    """Move a trial to `state` if it is still where the caller saw it; True for exactly one caller."""
    with transition_lock(study):
        return storage_of(study).set_trial_state_values(trial_id, state)
