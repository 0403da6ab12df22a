"""The Hydra side of a sweep: `python -m src.train -m hparams_search=grid` makes this process a worker.

A worker validates every point, joins the study (creating it, its MLflow parent run and its grid queue
once), forks `hydra.sweeper.workers - 1` sibling workers, then claims and runs trials (src.sweeps.trial)
until none are left; the last worker to finish writes the report.
"""
from __future__ import annotations

import copy
import functools
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict
from optuna.trial import TrialState

from src.config import validate
from src.sweeps import leases, loop, report, space, storage, study as studies
from src.sweeps.trial import close_mlflow_run, run_trial
from src.tracking.sink import drop_inherited_connections
from src.tracking.store import client, ensure_experiment, resolve_uri

GRID_SAMPLER = "optuna.samplers.GridSampler"


@dataclass
class Sweep:
    """What the workers of one command share; each worker holds its own study and MLflow client."""
    sw: Any                      # the GradflowSweeper: its settings, Hydra's launcher and config
    study: optuna.Study
    mlflow: Any
    space: dict
    fixed: list[str]
    points: list[dict]           # the grid's points ([] for a sampler)
    policy: leases.Policy
    metric: str
    parent_id: str = ""
    experiment_id: str = ""
    durations: list[float] = field(default_factory=list)

    @property
    def grid(self) -> bool:
        return bool(self.points)


def instantiate(node):
    """A sampler or pruner from its `_target_` node; None for none."""
    if not node:
        return None
    from hydra.utils import instantiate as build

    return build(node)


def run(sw, arguments: list[str]) -> None:
    """Body of GradflowSweeper.sweep()."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress line replaces Optuna's per-trial log
    cfg = sw.config
    metric = cfg.get("optimized_metric")
    if not metric:
        die("optimized_metric is not set: name the metric the sweep optimises, e.g. optimized_metric=val/acc")
    is_grid = (sw.sampler or {}).get("_target_") == GRID_SAMPLER
    try:
        swept, fixed = space.parse_space(sw.params, [a for a in arguments if not a.startswith("hydra.")])
        fixed = trial_devices(sw, fixed)
        points = space.grid_points(swept) if is_grid else []
        validate_points(sw, fixed, points or [{}])
        policy = leases.Policy(sw.max_retries, sw.heartbeat_interval, sw.grace_period)
        sampler = None if is_grid else instantiate(sw.sampler)
        study = studies.load_or_create(storage.open_storage(sw.storage), sw.study_name, sw.direction, sampler,
                                       instantiate(sw.pruner))
    except (space.SweepConfigError, validate.ConfigError) as e:
        die(str(e))
    where = storage.describe_storage(sw.storage)
    uri = resolve_uri(cfg.tracking.uri)
    if sw.storage and "://" in sw.storage and sw.storage.split("://")[1] == uri.split("://")[-1]:
        die(f"hydra.sweeper.storage and the MLflow tracking URI are the same database ({where}); give each "
            "its own (both keep their schema version in a table named alembic_version)")
    sweep = Sweep(sw, study, client(uri), swept, fixed, points, policy, metric)
    sweep.parent_id, sweep.experiment_id = parent_run(sweep, uri, where)
    if is_grid:
        added = studies.enqueue_grid(study, points)
        loop.log(f"study {sw.study_name!r} in {where}: grid of {len(points)} points ({added} newly queued) over "
                 f"{', '.join(swept)}; MLflow parent run {sweep.parent_id}")
    else:
        loop.log(f"study {sw.study_name!r} in {where}: {type(sampler).__name__}, {sw.n_trials} trials over "
                 f"{', '.join(swept)}; MLflow parent run {sweep.parent_id}")
    siblings = start_siblings(sweep)
    try:
        work(sweep)
    except KeyboardInterrupt:
        loop.log("interrupted: the running point is queued again; rerun the same command to resume")
        for p in siblings:  # they got the same Ctrl-C from the terminal; give them time to re-queue theirs
            p.join(60)
        sys.exit(130)
    for p in siblings:
        p.join()
    finish_study(sweep)
    all_failed(sweep.study)


def work(sweep: Sweep) -> None:
    def close_dead(t):
        close_mlflow_run(sweep.mlflow, t.user_attrs.get("mlflow_run_id"), "KILLED")

    def done(number, params, state, outcome, seconds):
        sweep.durations.append(seconds)
        progress(sweep, number, params, state, outcome, seconds)

    loop.work(sweep.study, sweep.space, sweep.policy, sweep.grid, lambda t, p: run_trial(sweep, t, p),
              n_trials=sweep.sw.n_trials, on_stale=close_dead, on_done=done)


def validate_points(sw, fixed: list[str], points: list[dict]) -> None:
    """Validate every grid point (or the fixed part of a sampled space) before any trial or MLflow run
    exists: a typo fails the sweep in seconds, not at trial 37. Each problem is said once.

    Hydra composes the first point of each choice of config groups (activation=..., init=...) in full; the
    other points of that choice differ from it only in plain values (model.depth=...), which are set on a copy
    the way Hydra sets them (its own parser, OmegaConf.update): one composition per choice, not per point."""
    loader, parser = sw.hydra_context.config_loader, OverridesParser.create()
    is_group = functools.cache(lambda key: not key.replace(".", "").replace("_", "").isalnum()
                               or loader.repository.group_exists(key.replace(".", "/")))
    problems, composed = [], {}
    for p in points:
        choice = tuple((k, str(v)) for k, v in p.items() if is_group(k))
        if choice not in composed:  # the first point of this choice: as Hydra composes it
            try:
                cfg = composed[choice] = loader.load_sweep_config(sw.config, fixed + space.as_overrides(p))
            except Exception as e:  # noqa: BLE001 - Hydra's own message names the bad option and the others
                problems.append(str(e).split("\nConfig search path")[0].strip())
                composed[choice] = None
                continue
            with open_dict(cfg):
                del cfg["hydra"]  # Hydra's own node needs a job to resolve; the task config is what we check
        elif composed[choice] is None:  # its composition failed: that problem is already said
            continue
        else:
            cfg = copy.deepcopy(composed[choice])
            for k, v in p.items():
                if not is_group(k):
                    OmegaConf.update(cfg, k, parser.parse_override(f"{k}={v}").value(), merge=True)
        problems += validate.problems(cfg)
    if problems:
        raise validate.ConfigError("\n".join(dict.fromkeys(problems)))


def parent_run(sweep: Sweep, uri: str, where: str) -> tuple[str, str]:
    """One MLflow parent run per study, created by the first worker; later workers and resumes reuse it.
    Returns its id and its experiment's, where the trials' runs go."""
    study, key = sweep.study, "mlflow_parent_run_id"
    exp_id = ensure_experiment(sweep.mlflow, sweep.sw.config.tracking.experiment, uri)
    with studies.elected(study, "mlflow-parent") as won:
        if won:
            run_id = sweep.mlflow.create_run(exp_id, run_name=f"study {study.study_name}", tags={
                "study_name": study.study_name, "gradflow.sweep": "true", "optuna.storage": where}).info.run_id
            study.set_user_attr(key, run_id)
            return run_id, exp_id
    deadline = time.monotonic() + 60
    while (run_id := study.user_attrs.get(key)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"study {study.study_name!r}: no MLflow parent run was recorded")
        time.sleep(0.2)
    sweep.mlflow.update_run(run_id, status="RUNNING")  # a resumed study is running again
    return run_id, exp_id


def per_trial(sw) -> int:
    return int(sw.gpus_per_trial or 1)


def trial_devices(sw, fixed: list[str]) -> list[str]:
    """The fixed overrides with `trainer.devices=k` when each trial trains on k GPUs (one process per GPU, one
    MLflow run: src.tracking.ranks); one GPU per trial needs nothing."""
    k = per_trial(sw)
    if k < 1:
        raise space.SweepConfigError(f"hydra.sweeper.gpus_per_trial={k}: it must be 1 or more")
    if k == 1:
        return fixed
    gpu_slots([str(g) for g in (sw.gpus or [])], k)  # enough GPUs listed for one trial
    given = [a for a in fixed if a.split("=")[0].lstrip("+") == "trainer.devices"]
    if given and given[-1].split("=", 1)[1] != str(k):
        raise space.SweepConfigError(f"hydra.sweeper.gpus_per_trial={k} but {given[-1]}: a trial trains on the "
                                     f"GPUs it is given; leave trainer.devices out (it becomes {k})")
    return fixed if given else fixed + [f"trainer.devices={k}"]


def gpu_slots(gpus: list[str], k: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES of the workers when each trial trains on k GPUs: the listed GPUs in groups of k
    (worker i takes group i mod the number of groups); GPUs past the last full group are left idle."""
    if k > 1 and len(gpus) < k:
        raise space.SweepConfigError(f"hydra.sweeper.gpus_per_trial={k} needs at least {k} GPUs listed in "
                                     f"hydra.sweeper.gpus (got {gpus or 'none'}), e.g. hydra.sweeper.gpus=[0,1]")
    return [",".join(gpus[j:j + k]) for j in range(0, len(gpus) - k + 1, k)]


def start_siblings(sweep: Sweep) -> list:
    """workers > 1: workers - 1 more workers of the same study, forked from this one once it has joined the
    study (a fork costs milliseconds; a fresh interpreter would import torch again)."""
    sw = sweep.sw
    gpus = gpu_slots([str(g) for g in (sw.gpus or [])], per_trial(sw))
    fork = mp.get_context("fork")
    procs = [fork.Process(target=_sibling, args=(sweep, gpus[i % len(gpus)] if gpus else None), daemon=False)
             for i in range(1, int(sw.workers or 1))]
    for p in procs:
        p.start()
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[0]
    if procs:
        loop.log(f"started {len(procs)} more worker(s): pids {[p.pid for p in procs]}")
    return procs


def _sibling(sweep: Sweep, gpu: str | None) -> None:
    """A forked worker: its own storage and tracking connections, then the same loop."""
    drop_inherited_connections()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    sw = sweep.sw
    sampler = None if sweep.grid else instantiate(sw.sampler)
    own = replace(sweep, durations=[], mlflow=client(resolve_uri(sw.config.tracking.uri)),
                  study=studies.load_or_create(storage.open_storage(sw.storage), sw.study_name, sw.direction,
                                               sampler, instantiate(sw.pruner)))
    try:
        work(own)
    except KeyboardInterrupt:
        os._exit(130)
    os._exit(0)  # the worker's atexit handlers belong to the worker


def progress(sweep: Sweep, number, params, state, outcome, seconds) -> None:
    study = sweep.study
    c = studies.counts(study)
    if sweep.grid:
        g = studies.grid_status(study, sweep.points)
        done, total, left = g["complete"] + g["failed"], g["points"], g["pending"] + g["missing"]
    else:
        total = sweep.sw.n_trials or 0
        done = c["COMPLETE"] + c["PRUNED"] + c["FAIL"] - c["WAITING"]
        left = max(0, total - done)
    workers = max(1, len({t.system_attrs.get(leases.WORKER) for t in
                          study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}))
    mean = sum(sweep.durations) / len(sweep.durations)
    value = f"{sweep.metric}={outcome.value:.4g}" if outcome.value is not None else (outcome.error or "")
    eta = left * mean / workers
    loop.log(f"trial {number} {state.name} in {seconds:.1f}s ({','.join(space.as_overrides(params))}: "
             f"{value[:120]}) | {done}/{total or '?'} done, {c['RUNNING']} running, {c['FAIL']} failed"
             f" | ETA {int(eta // 60)}m{int(eta % 60):02d}s")


def finish_study(sweep: Sweep) -> None:
    """The last worker out writes the report and closes the parent run; the others leave it to that one."""
    study = sweep.study
    c = studies.counts(study)
    if c["RUNNING"] or c["WAITING"] or (sweep.grid and studies.grid_status(study, sweep.points)["missing"]):
        return
    try:
        paths, text = report.write(study, Path(str(sweep.sw.config.hydra.sweep.dir)) / "report", sweep.metric,
                                   resolve_uri(sweep.sw.config.tracking.uri), sweep.experiment_id)
        for p in paths:
            sweep.mlflow.log_artifact(sweep.parent_id, str(p), "report")
        print(text)
    except Exception as e:  # noqa: BLE001 - the trials are safe in the storage; the report can be redone
        loop.log(f"could not write the report ({e}); `make sweep-report` retries it")
    status = "FINISHED" if c["COMPLETE"] else "FAILED"
    sweep.mlflow.set_terminated(sweep.parent_id, status)
    loop.log(f"study {study.study_name!r} done: {c['COMPLETE']} complete, {c['FAIL']} failed, "
             f"{c['PRUNED']} pruned; parent run {status}")


def all_failed(study) -> None:
    """Exit 1, with the first failure's reason, when the study has ended and none of its trials succeeded:
    a sweep that produced nothing must not look like one that worked."""
    c = studies.counts(study)
    if c["COMPLETE"] or c["PRUNED"] or c["RUNNING"] or c["WAITING"] or not c["FAIL"]:
        return
    first = min(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)), key=lambda t: t.number)
    print(f"sweep failed: every trial of study {study.study_name!r} failed; the first, trial {first.number} "
          f"({','.join(space.as_overrides(first.params))}): {first.user_attrs.get('error', 'no error recorded')}",
          file=sys.stderr)
    sys.exit(1)


def die(msg: str) -> None:
    print("sweep config error:\n  " + msg.replace("\n", "\n  "), file=sys.stderr)
    sys.exit(2)
