"""One sweep worker's loop: until the grid is empty (and nothing it could retry is still running) or the trial
budget is spent, fail expired leases, claim a trial, run it, tell the result. No coordinator: every worker
of a study runs this same loop against the shared storage."""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from src.sweeps.leases import Outcome, Policy, claim, fail_stale, finish
from src.sweeps.study import budget_left


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


def log(msg: str) -> None:
    print(f"[sweep {os.getpid()}] {msg}", file=sys.stderr, flush=True)
