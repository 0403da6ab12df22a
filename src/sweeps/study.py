"""The study a sweep shares: created once, its grid queued once across all workers (an atomic create_study
of a short-lived marker study elects the worker that queues), failed points queued again on request, and its progress.
Optuna's GridSampler instead samples points at random and repeats some near the end of a grid."""
from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import optuna
from optuna.exceptions import DuplicatedStudyError
from optuna.trial import FrozenTrial, TrialState

from src.sweeps.space import SweepConfigError, longest_first, point_key
from src.sweeps.storage import storage_of

SETTLE_S = 5.0  # requeue_failed waits this long after a failure for the worker's own retry to be queued


def load_or_create(storage, name: str, direction: str, sampler=None, pruner=None) -> optuna.Study:
    if direction not in ("minimize", "maximize"):
        raise SweepConfigError(f"hydra.sweeper.direction={direction}: expected minimize or maximize")
    study = optuna.create_study(storage=storage, study_name=name, direction=direction, sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise SweepConfigError(f"study {name!r} already exists with direction {study.direction.name.lower()};"
                               f" use another hydra.sweeper.study_name")
    return study


@contextmanager
def elected(study: optuna.Study, role: str):
    """Yields True in exactly one of the processes that enter this with the same study and role, ever.

    Creating a study with a given name is atomic in every Optuna storage, so the creator of a marker study
    `<study>::<role>` wins. When the winner's block has ended without error, its win is recorded in the
    study's system attributes (which optuna-dashboard does not list) and the marker is deleted, so the study
    list shows only users' studies. A caller that finds the record has lost, and so has one that created the
    marker after a winner deleted it (it finds the record once it holds the marker). A winner that dies in its
    block leaves the marker, which keeps the others out until a person deletes it."""
    storage = storage_of(study)
    study_id = storage.get_study_id_from_name(study.study_name)
    record, marker = f"gradflow.elected:{role}", f"{study.study_name}::{role}"
    if storage.get_study_system_attrs(study_id).get(record):
        yield False
        return
    try:
        optuna.create_study(storage=storage, study_name=marker)
    except DuplicatedStudyError:
        yield False
        return
    won = not storage.get_study_system_attrs(study_id).get(record)
    yield won
    if won:
        storage.set_study_system_attr(study_id, record, True)
    optuna.delete_study(study_name=marker, storage=storage)


def enqueue_grid(study: optuna.Study, points: list[dict[str, Any]], wait: float = 60.0) -> int:
    """Put every grid point in the study's queue once across all workers; return how many were added.
    The elected worker enqueues the points the study has not seen and then marks the grid done; the others
    wait for that mark. Points already in the study (queued, running, finished) are never added again."""
    digest = hashlib.sha1("\n".join(map(point_key, points)).encode()).hexdigest()[:12]
    done_key = f"grid:{digest}"
    if study.user_attrs.get(done_key):
        return 0
    with elected(study, f"grid-{digest}") as won:
        if won:
            seen = {point_key(params_of(t)) for t in study.get_trials(deepcopy=False)}
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
        params = params_of(t)
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
    with elected(study, f"requeue-{digest}") as won:
        if not won:
            return []
        points = [params_of(t) for t in todo]
        for p in points:
            study.enqueue_trial(p)
        return points


def params_of(t: FrozenTrial) -> dict[str, Any]:
    return t.params or t.system_attrs.get("fixed_params", {})


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
        k = point_key(params_of(t))
        if k not in best or rank[t.state] > rank[best[k]]:
            best[k] = t.state
    states = [best.get(point_key(p)) for p in points]
    return {"points": len(points), "complete": states.count(TrialState.COMPLETE),
            "pending": sum(s in (TrialState.RUNNING, TrialState.WAITING) for s in states),
            "failed": sum(s in (TrialState.FAIL, TrialState.PRUNED) for s in states),
            "missing": states.count(None)}


def budget_left(study: optuna.Study, n_trials: int) -> int:
    """Trials a sampler study may still start: finished and running ones count; queued retries do not."""
    c = counts(study)
    return n_trials - (c["COMPLETE"] + c["PRUNED"] + c["RUNNING"] + c["FAIL"] - c["WAITING"])
