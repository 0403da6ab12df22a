"""One trial of a sweep, run by its worker: an MLflow child run created first (so that a dead trial's run can
be closed, never left RUNNING), then the Hydra job in a forked process, the worker renewing the trial's lease
while it runs.

The fork reuses the worker's imports, so a trial pays no interpreter start-up; the worker never touches
CUDA, so a trial's CUDA state dies with its process. The trial process learns which run and which trial it
is from the environment (src.tracking.env, and $GRADFLOW_TRIAL for trial_callbacks) and sends its result back
through a pipe.
"""
from __future__ import annotations

import ctypes
import json
import multiprocessing as mp
import os
import signal
import sys
import traceback
from typing import Any

import optuna

from src.callbacks.pruning import PRUNED_AT, TRIAL_ENV, OptunaPruning
from src.report.views import CONTEXT, SPECTRUM
from src.sweeps import leases, loop
from src.sweeps.space import as_overrides
from src.sweeps.storage import open_storage, storage_of
from src.tracking.env import PARENT_RUN_ENV, RUN_ID_ENV, SWEEP_KEYS_ENV
from src.tracking.sink import drop_inherited_connections


def run_trial(sweep, trial: optuna.Trial, params: dict) -> leases.Outcome:
    """Run one claimed trial of `sweep` (a src.sweeps.worker.Sweep) with these parameters."""
    study, mlflow = sweep.study, sweep.mlflow
    name = ",".join(as_overrides(params))
    run_id = mlflow.create_run(sweep.experiment_id, run_name=name[:250], tags={
        "mlflow.parentRunId": sweep.parent_id, "study_name": study.study_name,
        "trial_number": str(trial.number), **_retry_tag(trial)}).info.run_id
    trial.set_user_attr("mlflow_run_id", run_id)
    env = {RUN_ID_ENV: run_id, PARENT_RUN_ENV: sweep.parent_id, SWEEP_KEYS_ENV: ",".join(params),
           TRIAL_ENV: json.dumps({"storage": sweep.sw.storage, "study": study.study_name, "trial_id": trial._trial_id,
                                  "metric": sweep.metric, "pruner": sweep.sw.pruner})}
    fork = mp.get_context("fork")
    receive, send = fork.Pipe(duplex=False)
    child = fork.Process(target=_child, args=(send, sweep.sw, sweep.fixed + as_overrides(params), trial.number,
                                              env, sweep.metric))
    child.start()
    send.close()
    lost = False
    while child.is_alive():
        if not leases.beat(study, trial._trial_id):
            lost = True  # presumed dead by another worker, and re-queued: this result must not count
            child.terminate()
        child.join(sweep.policy.heartbeat_interval)
    msg = receive.recv() if receive.poll() else {"error": f"trial process died (exit code {child.exitcode})"}
    if lost:  # the worker that failed this trial has re-queued its point already
        msg = {"error": "lease lost to another worker while running; result dropped", "retry": False}
    pruned = not lost and PRUNED_AT in storage_of(study).get_trial(trial._trial_id).user_attrs
    if pruned:  # stopped early on purpose: its last objective, no error
        msg = {"value": msg.get("value")}
    close_mlflow_run(mlflow, run_id, "FAILED")  # only if the trial process could not close it itself
    try:
        if pruned:
            mlflow.set_tag(run_id, "optuna.pruned", "true")
        if msg.get("value") is not None:
            mlflow.set_tag(run_id, "objective", f"{msg['value']:.6g}")
    except Exception as e:  # noqa: BLE001 - the trial's result is in the storage whatever MLflow says
        loop.log(f"could not tag MLflow run {run_id}: {e}")
    _copy_run_summary(mlflow, run_id, trial)
    return leases.Outcome(value=msg.get("value"), error=msg.get("error"), pruned=pruned,
                          retry=msg.get("retry", True))


def _child(conn, sw, overrides: list[str], number: int, env: dict, metric: str) -> None:
    """Runs in the forked trial process: one Hydra job, its result sent back through the pipe."""
    _die_with_parent()
    drop_inherited_connections()
    os.environ.update(env)
    import torch

    torch.set_num_threads(threads(sw))
    msg: dict[str, Any]
    try:
        from hydra.core.utils import JobStatus

        ret = sw.launcher.launch([overrides], initial_job_idx=number)[0]
        if ret.status == JobStatus.COMPLETED:
            value = ret.return_value
            msg = {"value": None if value is None else float(value)}
            if value is None:
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
    """In a trial's process ($GRADFLOW_TRIAL set by its worker): [OptunaPruning] when the study has a pruner,
    else []."""
    spec = json.loads(os.environ.get(TRIAL_ENV) or "{}")
    if not spec.get("pruner"):
        return []
    from hydra.utils import instantiate

    study = optuna.load_study(study_name=spec["study"], storage=open_storage(spec["storage"]),
                              pruner=instantiate(spec["pruner"]))
    return [OptunaPruning(optuna.Trial(study, spec["trial_id"]), spec["metric"])]


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (what SLURM, taskset or a container's cpuset gave
    it), not os.cpu_count(), which counts the whole node."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads(sw) -> int:
    """torch threads per trial: as configured, else the usable CPUs shared out among this machine's workers."""
    return int(sw.torch_threads or max(1, usable_cpus() // int(sw.workers or 1)))


def close_mlflow_run(mlflow, run_id: str | None, status: str) -> None:
    """Mark the run `status` if it is still RUNNING (its process died before it could)."""
    if not run_id:
        return
    try:
        if mlflow.get_run(run_id).info.status == "RUNNING":
            mlflow.set_terminated(run_id, status)
    except Exception as e:  # noqa: BLE001 - the tracking server may be down; the trial's state is what counts
        loop.log(f"could not close MLflow run {run_id}: {e}")


def _copy_run_summary(mlflow, run_id: str, trial: optuna.Trial) -> None:
    """The run's verdict, initial backprop_ratio and what the report's views need, kept with the trial."""
    try:
        run = mlflow.get_run(run_id)
        if "verdict" in run.data.tags:
            trial.set_user_attr("verdict", run.data.tags["verdict"])
        history = mlflow.get_metric_history(run_id, "backprop_ratio")
        if history:
            trial.set_user_attr("backprop_ratio_init", min(history, key=lambda m: m.step).value)
        # what the report's views need (src.report.views): the fixed config of the theory, the Jacobian at step 0
        trial.set_user_attr("context", {k: run.data.params.get(k) for k in CONTEXT})
        for k in SPECTRUM:
            if k in run.data.metrics:
                trial.set_user_attr(k, run.data.metrics[k])
    except Exception as e:  # noqa: BLE001
        loop.log(f"trial {trial.number}: could not read MLflow run {run_id}: {e}")


def _retry_tag(trial: optuna.Trial) -> dict:
    first = storage_of(trial.study).get_trial_system_attrs(trial._trial_id).get("failed_trial")
    return {"retry_of_trial": str(first)} if first is not None else {}


def _die_with_parent() -> None:
    """Linux: the trial process gets SIGTERM if its worker dies (kill -9, node loss), so it stops training
    and marks its MLflow run, instead of running on as an orphan whose point is being retried elsewhere."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
