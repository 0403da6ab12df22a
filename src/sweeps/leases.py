"""Who runs which trial: a worker claims a queued trial (WAITING -> RUNNING, which the storage lets exactly
one worker do), renews a lease on it while it runs, and tells its outcome; any worker fails a trial whose
lease expired and queues its point again within the retry budget.

Optuna's own heartbeat only runs inside `study.optimize()` and only on RDB storages, so the lease here is a
trial system attribute refreshed by the worker, which works on every storage (journal file, Redis, RDB).
"""
from __future__ import annotations

import math
import os
import socket
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from src.sweeps.space import SweepConfigError
from src.sweeps.storage import storage_of, transition, transition_lock

HEARTBEAT = "gradflow:heartbeat"  # trial system attribute: unix time of the worker's last sign of life
WORKER = "gradflow:worker"        # trial system attribute: host:pid of the worker that claimed it


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


def requeue(study: optuna.Study, failed: FrozenTrial, policy: Policy) -> None:
    """Queue the failed trial's point again, as a new trial that records which one it retries, unless it has
    had its `max_retries` already. Optuna's retry callback does exactly this (it is experimental, hence the
    filter); it was written for stale heartbeats, and serves as well for a trial that raised."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=policy.max_retries)(study, failed)


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
            storage_of(study).set_trial_user_attr(t._trial_id, "error", "worker stopped heart-beating "
                                               f"({t.system_attrs.get(WORKER, '?')}): lease expired")
            if not transition(study, t._trial_id, TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:
            continue
        frozen = storage_of(study).get_trial(t._trial_id)
        on_failed(frozen)
        requeue(study, frozen, policy)
        failed.append(t.number)
    return failed


def claim(study: optuna.Study, grid: bool) -> optuna.Trial | None:
    """A queued trial, moved to RUNNING by this worker alone; for a sampler study with an empty queue, a new
    trial from the sampler. None for a grid with nothing queued."""
    if grid:
        for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            try:
                if transition(study, t._trial_id, TrialState.RUNNING):
                    trial = optuna.Trial(study, t._trial_id)
                    break
            except UpdateFinishedTrialError:
                continue
        else:
            return None
    else:
        with transition_lock(study):
            trial = study.ask()  # pops a queued (retried) trial first, else samples a new one
    storage_of(study).set_trial_system_attr(trial._trial_id, WORKER, f"{socket.gethostname()}:{os.getpid()}")
    beat(study, trial._trial_id)
    if trial.user_attrs.get("error"):  # a retry inherits its predecessor's user attributes; the error is not its own
        trial.set_user_attr("error", "")
    return trial


def beat(study: optuna.Study, trial_id: int) -> bool:
    """Renew the lease; False if the trial was meanwhile failed by another worker (this one was presumed
    dead), in which case its result must be dropped."""
    try:
        storage_of(study).set_trial_system_attr(trial_id, HEARTBEAT, time.time())
        return True
    except UpdateFinishedTrialError:
        return False


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
    current = storage_of(study).get_trial(trial._trial_id).state
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
        requeue(study, frozen, policy)
    return TrialState.FAIL
