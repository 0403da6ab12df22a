"""The sweep engine: one Optuna study shared by any number of workers, no coordinator, no batch barrier.

Each worker is a loop: fail the trials whose worker stopped heart-beating, claim a trial, run it, tell the
result. Grid points are enqueued once per grid (an atomic create_study of a marker study elects the worker
that enqueues) and claimed through the storage's WAITING -> RUNNING transition, which succeeds for exactly
one worker; Optuna's GridSampler instead samples points at random and repeats some near the end of a grid.
Optuna's own heartbeat only runs inside `study.optimize()` and only on RDB storages, so the lease here is a
trial system attribute refreshed by the worker, which works on every storage (journal file, Redis, RDB).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import socket
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import optuna
from filelock import FileLock
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.exceptions import DuplicatedStudyError, UpdateFinishedTrialError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalRedisBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from src.urls import redact, sqlite_path


HEARTBEAT = "gradflow:heartbeat"  # trial system attribute: unix time of the worker's last sign of life
WORKER = "gradflow:worker"        # trial system attribute: host:pid of the worker that claimed it
DEFAULT_STORAGE = "journal:sweeps/optuna.journal"
SETTLE_S = 5.0  # requeue_failed waits this long after a failure for the worker's own retry to be queued
SCHEMA_LOCK_ID = 0x6772616466  # any constant shared by all workers ("gradf")
RDB_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg2", "postgresql+psycopg", "mysql", "mysql+pymysql")
optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress line replaces Optuna's per-trial log


class SweepConfigError(ValueError):
    """A sweep that cannot start as configured (bad space, storage or sampler)."""


# ---------------------------------------------------------------------------------------------- search space
def parse_space(config_params: dict[str, Any] | None, arguments: list[str]
                ) -> tuple[dict[str, BaseDistribution], list[str]]:
    """The search space and the fixed overrides of a sweep.

    `config_params` is `hydra.sweeper.params` (key -> `choice(...)`, `range(...)`, `interval(...)`,
    `tag(log, interval(...))` or `a,b,c`); `arguments` are the command line's overrides. A sweep override on
    the command line replaces the config's space for that key; a plain `key=value` there fixes the key.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    space_overrides = {}
    for key, expr in (config_params or {}).items():
        (o,) = parser.parse_overrides([f"{key}={expr}"])
        space_overrides[o.get_key_element()] = o
    fixed = []
    for o in parser.parse_overrides(arguments):
        if o.is_sweep_override():
            space_overrides[o.get_key_element()] = o
        else:
            space_overrides.pop(o.get_key_element(), None)
            fixed.append(o.input_line)
    return {k: _distribution(k, o) for k, o in space_overrides.items()}, fixed


def _distribution(key: str, o) -> BaseDistribution:
    """Hydra's sweep grammar as Optuna distributions. `range(a, b, s)` follows Hydra's (and Python's) rule:
    b is excluded, so `range(2, 5)` is 2, 3, 4 (the hydra-optuna-sweeper plugin includes b). `interval(a, b)`
    is continuous with both ends included; tags `log` and `int` make it log-scaled and/or integer."""
    from hydra.core.override_parser.types import Transformer

    if not o.is_sweep_override():  # a fixed value inside hydra.sweeper.params
        return CategoricalDistribution([o.value()])
    if o.is_choice_sweep() or (o.is_range_sweep() and o.value().shuffle):
        return CategoricalDistribution(list(o.sweep_iterator(transformer=Transformer.encode)))
    if o.is_range_sweep():
        values = list(o.sweep_iterator(transformer=Transformer.identity))
        if not values:
            raise SweepConfigError(f"{key}={o.input_line.split('=', 1)[1]}: an empty range")
        r = o.value()
        if all(isinstance(v, int) for v in (r.start, r.stop, r.step)):
            return IntDistribution(values[0], values[-1], step=r.step) if r.step > 0 else \
                CategoricalDistribution(values)
        return CategoricalDistribution(values)
    if o.is_interval_sweep():  # Hydra parses interval ends as floats; `tag(int, interval(1, 8))` for ints
        v = o.value()
        log = "log" in v.tags
        if "int" in v.tags:
            return IntDistribution(int(v.start), int(v.end), log=log)
        return FloatDistribution(float(v.start), float(v.end), log=log)
    raise SweepConfigError(f"{o.input_line}: only choice, range and interval sweeps are supported")


def grid_points(space: dict[str, BaseDistribution]) -> list[dict[str, Any]]:
    """Every combination, in a fixed order. Continuous intervals cannot be gridded: say so."""
    axes = {}
    for key, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            axes[key] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            axes[key] = list(range(dist.low, dist.high + 1, dist.step))
        else:
            raise SweepConfigError(
                f"{key}: a grid needs a finite list of values, got {dist}; use choice(...) or range(...), "
                "or a sampler such as TPE (hparams_search=tpe) for intervals")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


# Keys whose larger values make a trial take longer. Workers claim queued points in queue order, so the grid
# is queued longest first (the LPT rule): short points fill in at the end and the workers finish together,
# instead of one worker running the last deep net while the others idle.
COST_KEYS = ("model.depth", "model.width", "trainer.max_epochs", "trainer.max_steps")


def longest_first(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points by decreasing product of their COST_KEYS values (grid order among equals)."""
    def cost(p: dict[str, Any]) -> float:
        c = 1.0
        for k in COST_KEYS:
            v = p.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                c *= v
        return c

    return sorted(points, key=cost, reverse=True)  # sorted() is stable: grid order among equal costs


def point_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def as_overrides(params: dict[str, Any]) -> list[str]:
    return [f"{k}={v}" for k, v in params.items()]


# --------------------------------------------------------------------------------------------------- storage
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
    if scheme == "redis":
        return JournalStorage(JournalRedisBackend(url))
    if scheme in RDB_SCHEMES:
        lock = nullcontext()
        # Workers that create the schema of a new database at once collide on its version table.
        db = sqlite_path(url)
        if db is not None:
            lock = FileLock(f"{db}.lock", timeout=300)
        elif scheme.startswith("postgresql"):
            lock = _pg_advisory_lock(url)
        try:  # pool_pre_ping: a worker that idles while a trial runs must not reuse a dropped connection
            with lock:
                storage = RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except Exception as e:  # noqa: BLE001 - SQLAlchemy/driver errors carry the URL with its password
            raise SweepConfigError(f"hydra.sweeper.storage={redact(url)}: cannot open the storage: "
                                   f"{redact(str(e)).splitlines()[0]}") from None
        if db is not None:
            # SQLite ignores SELECT ... FOR UPDATE, so two workers can both move one WAITING trial to RUNNING
            # (seen: 13 runs of a 12-point grid with 4 workers). State changes are serialised by a file lock.
            storage._gradflow_transition_lock = FileLock(f"{db}.claims.lock", timeout=300)
        return storage
    raise SweepConfigError(
        f"hydra.sweeper.storage={redact(url)}: expected journal:<file>, redis://host:port, sqlite:///<file> "
        "or postgresql://user@host/db")


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


def describe_storage(url: str | None) -> str:
    return redact(url or DEFAULT_STORAGE)



# ---------------------------------------------------------------------------------------------- the study
@dataclass
class Policy:
    max_retries: int = 2             # re-runs of a point whose trial raised or whose worker died
    heartbeat_interval: float = 10.0  # seconds between lease renewals while a trial runs
    grace_period: float = 60.0        # a RUNNING trial silent this long belongs to a dead worker
    poll_interval: float = 0.5        # how often an idle grid worker looks for re-queued points

    def __post_init__(self):
        if self.max_retries < 0 or self.heartbeat_interval <= 0 or self.grace_period <= self.heartbeat_interval:
            raise SweepConfigError(
                f"need max_retries >= 0, heartbeat_interval > 0 and grace_period > heartbeat_interval; "
                f"got {self.max_retries}, {self.heartbeat_interval}, {self.grace_period}")


def load_or_create(storage, name: str, direction: str, sampler=None, pruner=None) -> optuna.Study:
    if direction not in ("minimize", "maximize"):
        raise SweepConfigError(f"hydra.sweeper.direction={direction}: expected minimize or maximize")
    study = optuna.create_study(storage=storage, study_name=name, direction=direction, sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise SweepConfigError(f"study {name!r} already exists with direction {study.direction.name.lower()};"
                               f" use another hydra.sweeper.study_name")
    return study


def elect(study: optuna.Study, role: str) -> bool:
    """True in exactly one of the processes that call this with the same study and role: creating a study
    with a given name is atomic in every Optuna storage, so the marker study's creator wins."""
    try:
        optuna.create_study(storage=_storage(study), study_name=f"{study.study_name}::{role}")
        return True
    except DuplicatedStudyError:
        return False


def enqueue_grid(study: optuna.Study, points: list[dict[str, Any]], wait: float = 60.0) -> int:
    """Put every grid point in the study's queue once across all workers; return how many were added.
    The elected worker enqueues the points the study has not seen and then marks the grid done; the others
    wait for that mark. Points already in the study (queued, running, finished) are never added again."""
    digest = hashlib.sha1("\n".join(map(point_key, points)).encode()).hexdigest()[:12]
    done_key = f"grid:{digest}"
    if study.user_attrs.get(done_key):
        return 0
    if elect(study, f"grid-{digest}"):
        seen = {point_key(_params(t)) for t in study.get_trials(deepcopy=False)}
        added = 0
        for p in longest_first(points):
            if point_key(p) not in seen:
                study.enqueue_trial(p)
                added += 1
        study.set_user_attr(done_key, len(points))
        return added
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if study.user_attrs.get(done_key):
            return 0
        time.sleep(0.2)
    raise RuntimeError(f"the worker elected to enqueue grid {digest} of study {study.study_name!r} did not "
                       f"finish within {wait:.0f} s; if it died, delete the marker study "
                       f"'{study.study_name}::grid-{digest}' and start again")


def requeue_failed(study: optuna.Study, settle: float | None = None) -> list[dict[str, Any]]:
    """Queue once more, with a fresh retry budget, every point whose trials all ended FAIL (retries spent, a
    NaN objective, a failure that is not retried); pruned, finished, running and queued points are left as
    they are. Returns the points queued. When several processes call this at once, one of them queues.
    A worker re-queues a point it may retry right after failing it (after closing its MLflow run): failures
    younger than `settle` seconds (SETTLE_S) are waited for first, so that such a point is not queued twice."""
    settle = SETTLE_S if settle is None else settle
    latest: dict[str, FrozenTrial] = {}
    settled = set()
    for t in study.get_trials(deepcopy=False):
        params = _params(t)
        if not params:  # a sampled trial that failed before its parameters were drawn: nothing to repeat
            continue
        key = point_key(params)
        if t.state != TrialState.FAIL:
            settled.add(key)
        elif key not in latest or t.number > latest[key].number:
            latest[key] = t
    todo = sorted((t for k, t in latest.items() if k not in settled), key=lambda t: t.number)
    if not todo:
        return []
    young = max((t.datetime_complete for t in todo if t.datetime_complete), default=None)
    wait = settle - (datetime.now() - young).total_seconds() if young else 0.0
    if wait > 0:
        time.sleep(wait)
        return requeue_failed(study, settle=0.0)
    # the newest failed trial of each point names this request: a second caller with the same view loses the
    # election; after these fail again, their new trials make a new name
    digest = hashlib.sha1(",".join(str(t.number) for t in todo).encode()).hexdigest()[:12]
    if not elect(study, f"requeue-{digest}"):
        return []
    points = [_params(t) for t in todo]
    for p in points:
        study.enqueue_trial(p)
    return points


def _storage(study: optuna.Study):
    # Optuna exposes no public way to move one given WAITING trial to RUNNING (ask() may create a new trial
    # instead) or to renew a lease outside optimize(); the storage API it uses itself does both atomically.
    return study._storage


def _requeue(study: optuna.Study, failed: FrozenTrial, policy: Policy) -> None:
    """Queue the failed trial's point again, as a new trial that records which one it retries, unless it has
    had its `max_retries` already. Optuna's retry callback does exactly this (it is experimental, hence the
    filter); it was written for stale heartbeats, and serves as well for a trial that raised."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=policy.max_retries)(study, failed)


def _transition_lock(study: optuna.Study):
    storage = _storage(study)  # Optuna wraps an RDBStorage in a cache layer that keeps it as `_backend`
    return getattr(storage, "_gradflow_transition_lock", None) or getattr(
        getattr(storage, "_backend", None), "_gradflow_transition_lock", None) or nullcontext()


def _transition(study: optuna.Study, trial_id: int, state: TrialState) -> bool:
    """Move a trial to `state` if it is still where the caller saw it; True for exactly one caller."""
    with _transition_lock(study):
        return _storage(study).set_trial_state_values(trial_id, state)


def _params(t: FrozenTrial) -> dict[str, Any]:
    return t.params or t.system_attrs.get("fixed_params", {})


def fail_stale(study: optuna.Study, policy: Policy, on_failed: Callable[[FrozenTrial], None] = lambda t: None
               ) -> list[int]:
    """Fail the RUNNING trials whose lease expired and re-queue them within the retry budget. Exactly one
    worker wins each RUNNING -> FAIL transition (the storage refuses to finish a finished trial)."""
    now, failed = time.time(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = t.datetime_start.timestamp() if t.datetime_start else now
        if now - max(float(t.system_attrs.get(HEARTBEAT, 0.0)), started) <= policy.grace_period:
            continue
        try:
            _storage(study).set_trial_user_attr(t._trial_id, "error", "worker stopped heart-beating "
                                               f"({t.system_attrs.get(WORKER, '?')}): lease expired")
            if not _transition(study, t._trial_id, TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:
            continue
        frozen = _storage(study).get_trial(t._trial_id)
        on_failed(frozen)
        _requeue(study, frozen, policy)
        failed.append(t.number)
    return failed


def claim(study: optuna.Study, grid: bool) -> optuna.Trial | None:
    """A queued trial, moved to RUNNING by this worker alone; for a sampler study with an empty queue, a new
    trial from the sampler. None for a grid with nothing queued."""
    if grid:
        for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            try:
                if _transition(study, t._trial_id, TrialState.RUNNING):
                    trial = optuna.Trial(study, t._trial_id)
                    break
            except UpdateFinishedTrialError:
                continue
        else:
            return None
    else:
        with _transition_lock(study):
            trial = study.ask()  # pops a queued (retried) trial first, else samples a new one
    _storage(study).set_trial_system_attr(trial._trial_id, WORKER, f"{socket.gethostname()}:{os.getpid()}")
    beat(study, trial._trial_id)
    if trial.user_attrs.get("error"):  # a retry inherits its predecessor's user attributes; the error is not its own
        trial.set_user_attr("error", "")
    return trial


def beat(study: optuna.Study, trial_id: int) -> bool:
    """Renew the lease; False if the trial was meanwhile failed by another worker (this one was presumed
    dead), in which case its result must be dropped."""
    try:
        _storage(study).set_trial_system_attr(trial_id, HEARTBEAT, time.time())
        return True
    except UpdateFinishedTrialError:
        return False


def suggest(trial: optuna.Trial, space: dict[str, BaseDistribution]) -> dict[str, Any]:
    """Ask the trial for every parameter (a queued trial answers with its fixed point)."""
    out = {}
    for k, d in space.items():
        if isinstance(d, CategoricalDistribution):
            out[k] = trial.suggest_categorical(k, d.choices)
        elif isinstance(d, IntDistribution):
            out[k] = trial.suggest_int(k, d.low, d.high, step=d.step, log=d.log)
        else:
            out[k] = trial.suggest_float(k, d.low, d.high, step=d.step, log=d.log)
    return out


def counts(study: optuna.Study) -> dict[str, int]:
    c = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        c[t.state.name] += 1
    return c


def grid_status(study: optuna.Study, points: list[dict[str, Any]]) -> dict[str, int]:
    """Per grid point, its best state: how many are COMPLETE, still to do (queued/running), or given up."""
    best: dict[str, TrialState] = {}
    rank = {TrialState.COMPLETE: 4, TrialState.RUNNING: 3, TrialState.WAITING: 2, TrialState.PRUNED: 1,
            TrialState.FAIL: 0}
    for t in study.get_trials(deepcopy=False):
        k = point_key(_params(t))
        if k not in best or rank[t.state] > rank[best[k]]:
            best[k] = t.state
    states = [best.get(point_key(p)) for p in points]
    return {"points": len(points), "complete": states.count(TrialState.COMPLETE),
            "pending": sum(s in (TrialState.RUNNING, TrialState.WAITING) for s in states),
            "failed": sum(s in (TrialState.FAIL, TrialState.PRUNED) for s in states),
            "missing": states.count(None)}


@dataclass
class Outcome:
    """What running one trial produced. `value` None with `error` set: the trial raised or its process died."""
    value: float | None = None
    error: str | None = None
    pruned: bool = False
    retry: bool = True  # False for deterministic failures (NaN objective, missing metric)


def finish(study: optuna.Study, trial: optuna.Trial, outcome: Outcome, policy: Policy) -> TrialState:
    """Tell the storage; re-queue a failed point within the retry budget. NaN objectives are recorded as
    FAIL with the value kept in user attrs (Optuna refuses NaN values), never retried."""
    current = _storage(study).get_trial(trial._trial_id).state
    if current.is_finished():  # another worker failed it (lease expired) and re-queued it already
        return current
    if outcome.error:
        trial.set_user_attr("error", outcome.error[-2000:])
    if outcome.pruned:
        return study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True).state
    if outcome.value is not None and math.isfinite(outcome.value):
        return study.tell(trial, outcome.value, skip_if_finished=True).state
    if outcome.value is not None:
        trial.set_user_attr("objective", str(outcome.value))
        trial.set_user_attr("error", f"objective is {outcome.value}")
        outcome.retry = False
    frozen = study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    if outcome.retry:
        _requeue(study, frozen, policy)
    return TrialState.FAIL


def work(study: optuna.Study, space: dict[str, BaseDistribution], policy: Policy, grid: bool,
         run: Callable[[optuna.Trial, dict[str, Any]], Outcome], n_trials: int | None = None,
         on_stale: Callable[[FrozenTrial], None] = lambda t: None,
         on_done: Callable[[int, dict, TrialState, Outcome, float], None] = lambda *a: None) -> int:
    """One worker: until the grid is empty (and nothing it could retry is still running) or the trial budget
    is spent, fail expired leases, claim a trial, run it, tell the result. Returns the trials it ran."""
    ran = 0
    while True:
        for n in fail_stale(study, policy, on_failed=on_stale):
            log(f"trial {n}: its worker stopped heart-beating; failed and re-queued within "
                f"{policy.max_retries} retries")
        if not grid and n_trials and budget_left(study, n_trials) <= 0:
            return ran
        trial = claim(study, grid)
        if trial is None:
            if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                time.sleep(policy.poll_interval)  # another worker's point may come back as a retry
                continue
            return ran
        params = suggest(trial, space)
        t0 = time.time()
        try:
            outcome = run(trial, params)
        except KeyboardInterrupt:  # stopping a worker re-queues its point, so the next run of the sweep does it
            finish(study, trial, Outcome(error="interrupted (Ctrl-C)"), policy)
            raise
        except Exception as e:  # noqa: BLE001 - one broken trial must not stop the worker
            outcome = Outcome(error=f"{type(e).__name__}: {e}")
        state = finish(study, trial, outcome, policy)
        ran += 1
        on_done(trial.number, params, state, outcome, time.time() - t0)


def budget_left(study: optuna.Study, n_trials: int) -> int:
    """Trials a sampler study may still start: finished and running ones count; queued retries do not."""
    c = counts(study)
    return n_trials - (c["COMPLETE"] + c["PRUNED"] + c["RUNNING"] + c["FAIL"] - c["WAITING"])


def log(msg: str) -> None:
    print(f"[sweep {os.getpid()}] {msg}", file=sys.stderr, flush=True)
