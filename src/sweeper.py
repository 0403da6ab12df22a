"""The Hydra side of a sweep: `python -m src.train -m hparams_search=grid` makes this process a worker.

A worker validates every point, joins the study (creating it, its MLflow parent run and its grid queue
once), starts `hydra.sweeper.n_jobs - 1` sibling workers, then claims and runs trials until none are left.
Each trial runs in a forked child (the worker never touches CUDA, so a child's CUDA state dies with it; the
fork reuses the imports, so a trial costs no interpreter start-up) through Hydra's launcher, as its own job
with its own output directory and a nested MLflow run created here so that a dead child's run can be closed.
"""
from __future__ import annotations

import copy
import ctypes
import functools
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict
from optuna.trial import TrialState

from src import report, sweep, tracking, validate
from src.sink import drop_inherited_connections

GRID_SAMPLER = "optuna.samplers.GridSampler"
TRIAL_ENV = "GRADFLOW_TRIAL"  # set in a trial's process (= src.train.TRIAL_ENV): train() adds trial_callbacks()
_ACTIVE: dict[str, Any] = {}  # the running trial, in the forked child only


def run(sw, arguments: list[str]) -> None:
    """Body of GradflowSweeper.sweep(): sw carries the sweeper's settings, Hydra's launcher and config."""
    cfg = sw.config
    metric = cfg.get("optimized_metric")
    if not metric:
        _die("optimized_metric is not set: name the metric the sweep optimises, e.g. optimized_metric=val/acc")
    is_grid = (sw.sampler or {}).get("_target_") == GRID_SAMPLER
    try:
        space, fixed = sweep.parse_space(sw.params, [a for a in arguments if not a.startswith("hydra.")])
        points = sweep.grid_points(space) if is_grid else []
        _validate(sw, fixed, points or [{}])
        policy = sweep.Policy(sw.max_retries, sw.heartbeat_interval, sw.grace_period)
        storage = sweep.open_storage(sw.storage)
        sampler = None if is_grid else _instantiate(sw.sampler)
        study = sweep.load_or_create(storage, sw.study_name, sw.direction, sampler, _instantiate(sw.pruner))
    except (sweep.SweepConfigError, validate.ConfigError) as e:
        _die(str(e))
    where = sweep.describe_storage(sw.storage)
    uri = tracking.resolve_uri(cfg.tracking.uri)
    if sw.storage and "://" in sw.storage and sw.storage.split("://")[1] == uri.split("://")[-1]:
        _die(f"hydra.sweeper.storage and the MLflow tracking URI are the same database ({where}); give each "
             "its own (both keep their schema version in a table named alembic_version)")
    mlflow = tracking.client(uri)
    parent_id, experiment_id = _parent_run(study, mlflow, cfg, uri, where)
    if is_grid:
        added = sweep.enqueue_grid(study, points)
        sweep.log(f"study {sw.study_name!r} in {where}: grid of {len(points)} points "
                  f"({added} newly queued) over {', '.join(space)}; MLflow parent run {parent_id}")
    else:
        sweep.log(f"study {sw.study_name!r} in {where}: {type(sampler).__name__}, {sw.n_trials} trials over "
                  f"{', '.join(space)}; MLflow parent run {parent_id}")
    ctx = {"sw": sw, "study": study, "space": space, "fixed": fixed, "policy": policy, "mlflow": mlflow,
           "parent_id": parent_id, "experiment_id": experiment_id, "metric": metric, "grid": is_grid,
           "points": points, "durations": []}
    siblings = _start_siblings(sw, ctx)
    try:
        _work(ctx)
    except KeyboardInterrupt:
        sweep.log("interrupted: the running point is queued again; rerun the same command to resume")
        for p in siblings:  # they got the same Ctrl-C from the terminal; give them time to re-queue theirs
            p.join(60)
        sys.exit(130)
    for p in siblings:
        p.join()
    _finish_study(ctx)


def _work(ctx: dict) -> None:
    def close_dead(t):
        _close_mlflow_run(ctx["mlflow"], t.user_attrs.get("mlflow_run_id"), "KILLED")

    def done(number, params, state, outcome, seconds):
        ctx["durations"].append(seconds)
        _progress(ctx, number, params, state, outcome, seconds)

    sweep.work(ctx["study"], ctx["space"], ctx["policy"], ctx["grid"], lambda t, p: _run_trial(ctx, t, p),
               n_trials=ctx["sw"].n_trials, on_stale=close_dead, on_done=done)


def _run_trial(ctx: dict, trial: optuna.Trial, params: dict) -> sweep.Outcome:
    sw, study = ctx["sw"], ctx["study"]
    name = ",".join(sweep.as_overrides(params))
    run_id = ctx["mlflow"].create_run(ctx["experiment_id"], run_name=name[:250], tags={
        "mlflow.parentRunId": ctx["parent_id"], "study_name": study.study_name,
        "trial_number": str(trial.number), **_retry_tag(trial)}).info.run_id
    trial.set_user_attr("mlflow_run_id", run_id)
    overrides = ctx["fixed"] + sweep.as_overrides(params)
    fork = mp.get_context("fork")
    receive, send = fork.Pipe(duplex=False)
    child = fork.Process(target=_child, args=(send, sw, overrides, trial.number, run_id, ctx["parent_id"],
                                              list(params), study.study_name, trial._trial_id, ctx["metric"]))
    child.start()
    send.close()
    lost = False
    while child.is_alive():
        if not sweep.beat(study, trial._trial_id):
            lost = True  # presumed dead by another worker, and re-queued: this result must not count
            child.terminate()
        child.join(ctx["policy"].heartbeat_interval)
    msg = receive.recv() if receive.poll() else {"error": f"trial process died (exit code {child.exitcode})"}
    if lost:  # the worker that failed this trial has re-queued its point already
        msg = {"error": "lease lost to another worker while running; result dropped", "retry": False}
    _close_mlflow_run(ctx["mlflow"], run_id, "FAILED")  # only if the child could not close it itself
    try:
        if msg.get("pruned"):
            ctx["mlflow"].set_tag(run_id, "optuna.pruned", "true")
        if msg.get("value") is not None:
            ctx["mlflow"].set_tag(run_id, "objective", f"{msg['value']:.6g}")
    except Exception as e:  # noqa: BLE001 - the trial's result is in the storage whatever MLflow says
        sweep.log(f"could not tag MLflow run {run_id}: {e}")
    _copy_run_summary(ctx["mlflow"], run_id, trial)
    return sweep.Outcome(value=msg.get("value"), error=msg.get("error"), pruned=bool(msg.get("pruned")),
                         retry=msg.get("retry", True))


def _child(conn, sw, overrides, number, run_id, parent_id, keys, study_name, trial_id, metric) -> None:
    """Runs in the forked trial process: one Hydra job, result sent back through the pipe."""
    _die_with_parent()
    drop_inherited_connections()
    os.environ.update({tracking.RUN_ID_ENV: run_id, tracking.PARENT_RUN_ENV: parent_id,
                       tracking.SWEEP_KEYS_ENV: ",".join(keys), TRIAL_ENV: str(number)})
    _ACTIVE.update(sw=sw, study_name=study_name, trial_id=trial_id, metric=metric, pruned=False)
    import torch

    torch.set_num_threads(_threads(sw))
    msg: dict[str, Any]
    try:
        from hydra.core.utils import JobStatus

        ret = sw.launcher.launch([overrides], initial_job_idx=number)[0]
        if ret.status == JobStatus.COMPLETED:
            value = ret.return_value
            msg = {"value": None if value is None else float(value), "pruned": _ACTIVE["pruned"]}
            if value is None and not _ACTIVE["pruned"]:
                msg.update(error=f"optimized_metric={metric} is not among the run's metrics", retry=False)
        else:
            e = ret._return_value  # JobReturn.return_value re-raises; the exception itself is what we report
            msg = {"error": "".join(traceback.format_exception_only(type(e), e)).strip()}
    except SystemExit as e:  # main() exits 2 on a config error, 130 on Ctrl-C
        msg = {"error": f"the run exited with code {e.code}", "retry": e.code not in (2, 130)}
    except BaseException as e:  # noqa: BLE001 - whatever happened must reach the worker
        msg = {"error": "".join(traceback.format_exception_only(type(e), e)).strip()}
    conn.send(msg)
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip the worker's atexit handlers, which belong to the worker


def trial_callbacks() -> list:
    """Lightning callbacks for the trial running in this process: report the objective each validation and
    stop early when the study's pruner says so. Empty outside a sweep."""
    if not _ACTIVE or _ACTIVE["sw"].pruner is None:
        return []
    import lightning as L

    sw = _ACTIVE["sw"]
    study = optuna.load_study(study_name=_ACTIVE["study_name"], storage=sweep.open_storage(sw.storage),
                              pruner=_instantiate(sw.pruner))
    trial, metric = optuna.Trial(study, _ACTIVE["trial_id"]), _ACTIVE["metric"]

    class Prune(L.Callback):
        def on_validation_end(self, trainer, pl_module) -> None:
            value = trainer.callback_metrics.get(metric)
            if trainer.sanity_checking or value is None:
                return
            trial.report(float(value), step=trainer.current_epoch)
            if trial.should_prune():
                _ACTIVE["pruned"] = True
                trainer.should_stop = True  # a clean stop: the MLflow run ends FINISHED; the worker tags it

    return [Prune()]


# ------------------------------------------------------------------------------------------------- helpers
def _validate(sw, fixed: list[str], points: list[dict]) -> None:
    """Validate every grid point (or the fixed part of a sampled space) before any trial or MLflow run
    exists: a typo fails the sweep in seconds, not at trial 37. Each problem is said once.

    Hydra composes the first point of each choice of config groups (activation=..., init=...) in full, at
    about 0.15 s each; the other points of that choice differ from it only in plain values (model.depth=...),
    which are set on a copy the way Hydra sets them (its own parser, OmegaConf.update): 4 compositions, not
    8, for the 2 x 2 x 2 grid; 6, not 18, for the default one."""
    loader, parser = sw.hydra_context.config_loader, OverridesParser.create()
    is_group = functools.cache(lambda key: not key.replace(".", "").replace("_", "").isalnum()
                               or loader.repository.group_exists(key.replace(".", "/")))
    problems, composed = [], {}
    for p in points:
        choice = tuple((k, str(v)) for k, v in p.items() if is_group(k))
        if choice not in composed:  # the first point of this choice: as Hydra composes it
            try:
                cfg = composed[choice] = loader.load_sweep_config(sw.config, fixed + sweep.as_overrides(p))
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


def _parent_run(study: optuna.Study, mlflow, cfg, uri: str, where: str) -> tuple[str, str]:
    """One MLflow parent run per study, created by the first worker; later workers and resumes reuse it.
    Returns its id and its experiment's, where the trials' runs go."""
    key = "mlflow_parent_run_id"
    exp_id = tracking.ensure_experiment(mlflow, cfg.tracking.experiment, uri)
    if sweep.elect(study, "mlflow-parent"):
        run_id = mlflow.create_run(exp_id, run_name=f"study {study.study_name}", tags={
            "study_name": study.study_name, "gradflow.sweep": "true", "optuna.storage": where}).info.run_id
        study.set_user_attr(key, run_id)
        return run_id, exp_id
    deadline = time.monotonic() + 60
    while (run_id := study.user_attrs.get(key)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"study {study.study_name!r}: no MLflow parent run was recorded")
        time.sleep(0.2)
    mlflow.update_run(run_id, status="RUNNING")  # a resumed study is running again
    return run_id, exp_id


def _threads(sw) -> int:
    """torch threads per trial: as configured, else the cores shared out among this machine's workers."""
    return int(sw.torch_threads or max(1, (os.cpu_count() or 1) // int(sw.n_jobs or 1)))


def _start_siblings(sw, ctx: dict) -> list:
    """n_jobs > 1: n_jobs - 1 more workers of the same study, forked from this one once it has joined the
    study (a fork costs milliseconds; a fresh interpreter would spend seconds importing torch again)."""
    n = int(sw.n_jobs or 1)
    gpus = [str(g) for g in (sw.gpus or [])]
    fork = mp.get_context("fork")
    procs = [fork.Process(target=_sibling, args=(ctx, gpus[i % len(gpus)] if gpus else None), daemon=False)
             for i in range(1, n)]
    for p in procs:
        p.start()
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[0]
    if procs:
        sweep.log(f"started {len(procs)} more worker(s): pids {[p.pid for p in procs]}")
    return procs


def _sibling(ctx: dict, gpu: str | None) -> None:
    """A forked worker: its own storage and tracking connections, then the same loop."""
    drop_inherited_connections()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    sw = ctx["sw"]
    sampler = None if ctx["grid"] else _instantiate(sw.sampler)
    ctx = dict(ctx, durations=[], mlflow=tracking.client(tracking.resolve_uri(sw.config.tracking.uri)),
               study=sweep.load_or_create(sweep.open_storage(sw.storage), sw.study_name, sw.direction, sampler,
                                          _instantiate(sw.pruner)))
    try:
        _work(ctx)
    except KeyboardInterrupt:
        os._exit(130)
    os._exit(0)  # the worker's atexit handlers belong to the worker


def _progress(ctx, number, params, state, outcome, seconds) -> None:
    study = ctx["study"]
    c = sweep.counts(study)
    if ctx["grid"]:
        g = sweep.grid_status(study, ctx["points"])
        done, total, left = g["complete"] + g["failed"], g["points"], g["pending"] + g["missing"]
    else:
        total = ctx["sw"].n_trials or 0
        done = c["COMPLETE"] + c["PRUNED"] + c["FAIL"] - c["WAITING"]
        left = max(0, total - done)
    workers = max(1, len({t.system_attrs.get(sweep.WORKER) for t in
                          study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}))
    mean = sum(ctx["durations"]) / len(ctx["durations"])
    value = f"{ctx['metric']}={outcome.value:.4g}" if outcome.value is not None else (outcome.error or "")
    sweep.log(f"trial {number} {state.name} in {seconds:.1f}s ({','.join(sweep.as_overrides(params))}: "
              f"{value[:120]}) | {done}/{total or '?'} done, {c['RUNNING']} running, {c['FAIL']} failed"
              f" | ETA {_eta(left * mean / workers)}")


def _eta(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _finish_study(ctx: dict) -> None:
    study = ctx["study"]
    c = sweep.counts(study)
    if c["RUNNING"] or c["WAITING"]:
        return  # other workers are still at it; the last one reports
    if ctx["grid"] and sweep.grid_status(study, ctx["points"])["missing"]:
        return
    try:
        paths, text = report.write(study, Path(str(ctx["sw"].config.hydra.sweep.dir)) / "report",
                                   ctx["metric"])
        for p in paths:
            ctx["mlflow"].log_artifact(ctx["parent_id"], str(p), "report")
        print(text)
    except Exception as e:  # noqa: BLE001 - the trials are safe in the storage; the report can be redone
        sweep.log(f"could not write the report ({e}); `make sweep-report` retries it")
    status = "FINISHED" if c["COMPLETE"] else "FAILED"
    ctx["mlflow"].set_terminated(ctx["parent_id"], status)
    sweep.log(f"study {study.study_name!r} done: {c['COMPLETE']} complete, {c['FAIL']} failed, "
              f"{c['PRUNED']} pruned; parent run {status}")


def _close_mlflow_run(mlflow, run_id: str | None, status: str) -> None:
    if not run_id:
        return
    try:
        if mlflow.get_run(run_id).info.status == "RUNNING":
            mlflow.set_terminated(run_id, status)
    except Exception as e:  # noqa: BLE001 - the tracking server may be down; the trial's state is what counts
        sweep.log(f"could not close MLflow run {run_id}: {e}")


def _copy_run_summary(mlflow, run_id: str, trial: optuna.Trial) -> None:
    """The run's verdict and initial backprop_ratio, kept with the trial for the report."""
    try:
        run = mlflow.get_run(run_id)
        if "verdict" in run.data.tags:
            trial.set_user_attr("verdict", run.data.tags["verdict"])
        history = mlflow.get_metric_history(run_id, "backprop_ratio")
        if history:
            trial.set_user_attr("backprop_ratio_init", min(history, key=lambda m: m.step).value)
    except Exception as e:  # noqa: BLE001
        sweep.log(f"trial {trial.number}: could not read MLflow run {run_id}: {e}")


def _retry_tag(trial: optuna.Trial) -> dict:
    first = sweep._storage(trial.study).get_trial_system_attrs(trial._trial_id).get("failed_trial")
    return {"retry_of_trial": str(first)} if first is not None else {}


def _instantiate(node):
    if not node:
        return None
    from hydra.utils import instantiate

    return instantiate(node)


def _die_with_parent() -> None:
    """Linux: the trial process gets SIGTERM if its worker dies (kill -9, node loss), so it stops training
    and marks its MLflow run, instead of running on as an orphan whose point is being retried elsewhere."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _die(msg: str) -> None:
    print("sweep config error:\n  " + msg.replace("\n", "\n  "), file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------------------------- commands
USAGE = """usage: python -m src.sweeper COMMAND [hydra overrides]
  status     the study's progress: counts per state and every trial
  report     write the sweep report (CSV, HTML, heatmaps), print it, attach it to the study's MLflow run
  dashboard  start optuna-dashboard on the study's storage (127.0.0.1:$DASHBOARD_PORT, default 8080)
  requeue    queue the points whose every trial failed once more, with a fresh retry budget; the next run
             of the sweep (or any worker still running) runs them
  submit     start N workers as jobs: `submit --workers 4 [--slurm-partition P --gpus-per-worker 1]`;
             on SLURM when sbatch is available, else as local processes (submitit's local executor)
The overrides choose the study as the sweep does, e.g. `hparams_search=grid hydra.sweeper.storage=...`."""


def _study_config(overrides: list[str]):
    """The composed config (with hydra.sweeper) a sweep with these overrides would use; sweep axes such as
    activation=a,b are ignored here, since they do not change which study it is."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = [o.input_line for o in OverridesParser.create().parse_overrides(overrides) if not o.is_sweep_override()]
    if not any(o.startswith("hparams_search=") for o in plain):
        plain.insert(0, "hparams_search=grid")
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return compose("train", overrides=plain, return_hydra_config=True)


def _submit(overrides: list[str], workers: int, partition: str | None, gpus: int, minutes: int) -> int:
    """One worker per job, each a fresh `python -m src.train -m ...` process, so nothing (CUDA included)
    is shared between workers; the study's storage is the only thing they share."""
    import submitit

    cfg = _study_config(overrides)
    folder = Path(str(cfg.hydra.sweep.dir))
    executor = submitit.AutoExecutor(folder=folder / "jobs", cluster=None if _has_slurm() else "local")
    executor.update_parameters(timeout_min=minutes, gpus_per_node=gpus, cpus_per_task=max(1, os.cpu_count() // workers)
                               if not _has_slurm() else 4, **({"slurm_partition": partition} if partition else {}))
    command = [sys.executable, "-m", "src.train", "-m", *overrides, "hydra.sweeper.n_jobs=1"]
    jobs = [executor.submit(_worker_job, command, str(Path.cwd())) for _ in range(workers)]
    sweep.log(f"submitted {len(jobs)} worker job(s) to {executor.cluster}: {[j.job_id for j in jobs]}; "
              f"logs in {folder / 'jobs'}")
    codes = [j.result() for j in jobs]
    sweep.log(f"worker exit codes: {codes}")
    return max(codes, default=0)


def _worker_job(command: list[str], cwd: str) -> int:
    return subprocess.run(command, cwd=cwd).returncode


def _has_slurm() -> bool:
    import shutil

    return shutil.which("sbatch") is not None


def main(argv: list[str]) -> int:
    import argparse

    if not argv or argv[0] not in ("status", "report", "dashboard", "submit", "requeue"):
        print(USAGE, file=sys.stderr)
        return 2
    cmd = argv[0]
    parser = argparse.ArgumentParser(prog=f"python -m src.sweeper {cmd}")
    if cmd == "submit":
        parser.add_argument("--workers", type=int, default=2)
        parser.add_argument("--slurm-partition", default=None)
        parser.add_argument("--gpus-per-worker", type=int, default=0)
        parser.add_argument("--minutes", type=int, default=24 * 60)
    args, overrides = parser.parse_known_args(argv[1:])
    if cmd == "submit":
        return _submit(overrides, args.workers, args.slurm_partition, args.gpus_per_worker, args.minutes)
    cfg = _study_config(overrides)
    url, name = cfg.hydra.sweeper.storage, cfg.hydra.sweeper.study_name
    if cmd == "dashboard":
        target = url[len("journal:"):] if (url or "").startswith("journal:") else url
        port = os.environ.get("DASHBOARD_PORT", "8080")
        sweep.log(f"optuna-dashboard on {sweep.describe_storage(url)}: http://127.0.0.1:{port}")
        os.execvp("optuna-dashboard", ["optuna-dashboard", "--host", "127.0.0.1", "--port", port, target])
    try:
        study = optuna.load_study(study_name=name, storage=sweep.open_storage(url))
    except KeyError:
        print(f"no study named {name!r} in {sweep.describe_storage(url)} yet", file=sys.stderr)
        return 1
    if cmd == "status":
        print(report.status_text(study))
        return 0
    if cmd == "requeue":
        points = sweep.requeue_failed(study)
        for p in points:
            print("queued again: " + ",".join(sweep.as_overrides(p)))
        sweep.log(f"study {name!r}: {len(points)} failed point(s) queued again"
                  + ("; run the sweep again to run them" if points else " (none had failed in every trial)"))
        return 0
    out = Path(str(cfg.hydra.sweep.dir)) / "report"
    paths, text = report.write(study, out, cfg.get("optimized_metric") or "objective")
    print(text)
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent:
        mlflow = tracking.client(tracking.resolve_uri(cfg.tracking.uri))
        for p in paths:
            mlflow.log_artifact(parent, str(p), "report")
    sweep.log(f"report in {out}" + (f" and on MLflow run {parent}" if parent else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
