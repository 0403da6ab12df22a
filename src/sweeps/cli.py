"""The sweep's commands besides running it: status, report, dashboard, requeue, submit (`make sweep-status`,
`make sweep-report`, `make dashboard`, `make sweep-requeue`; `python -m src.sweeps COMMAND [overrides]`)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import optuna

from src.sweeps import loop, report, study as studies
from src.sweeps.space import SweepConfigError, as_overrides
from src.sweeps.storage import describe_storage, open_storage, serve_proxy
from src.sweeps.submit import submit

COMMANDS = ("status", "report", "dashboard", "requeue", "submit", "proxy")
USAGE = """usage: python -m src.sweeps COMMAND [hydra overrides]
  status     the study's progress: counts per state and every trial
  report     write the sweep report (CSV, HTML), print it, attach it to the study's MLflow run
  dashboard  start optuna-dashboard on the study's storage (127.0.0.1:$DASHBOARD_PORT, default 8080)
  requeue    queue the points whose every trial failed once more, with a fresh retry budget; the next run
             of the sweep (or any worker still running) runs them
  submit     start N workers as jobs: `submit --workers 4 [--slurm-partition P --gpus-per-worker 1] [--wait]`;
             on SLURM when sbatch is available (one job array; returns once queued, or with --wait when
             the jobs end), else as local processes (submitit's local executor; waits for them)
  proxy      Optuna's gRPC storage proxy in front of the sweep's storage (--host 127.0.0.1 --port 13000):
             workers given hydra.sweeper.storage=grpc://host:13000 share its database connections
The overrides choose the study as the sweep does, e.g. `hparams_search=grid hydra.sweeper.storage=...`."""


def study_config(overrides: list[str]):
    """The composed config (with hydra.sweeper) a sweep with these overrides would use; sweep axes such as
    activation=a,b are ignored here, since they do not change which study it is."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = [o.input_line for o in OverridesParser.create().parse_overrides(overrides) if not o.is_sweep_override()]
    if not any(o.startswith("hparams_search=") for o in plain):
        plain.insert(0, "hparams_search=grid")
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        return compose("train", overrides=plain, return_hydra_config=True)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return 2
    cmd = argv[0]
    parser = argparse.ArgumentParser(prog=f"python -m src.sweeps {cmd}")
    if cmd == "submit":
        parser.add_argument("--workers", type=int, default=2)
        parser.add_argument("--slurm-partition", default=None)
        parser.add_argument("--gpus-per-worker", type=int, default=0)
        parser.add_argument("--minutes", type=int, default=24 * 60)
        parser.add_argument("--wait", action="store_true", help="on SLURM, wait for the jobs to end")
    if cmd == "proxy":
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=13000)
    args, overrides = parser.parse_known_args(argv[1:])
    cfg = study_config(overrides)
    if cmd == "proxy":
        loop.log(f"gRPC storage proxy for {describe_storage(cfg.hydra.sweeper.storage)} on {args.host}:{args.port}")
        try:
            serve_proxy(cfg.hydra.sweeper.storage, args.host, args.port)
        except SweepConfigError as e:
            print(f"sweep config error: {e}", file=sys.stderr)
            return 2
        return 0
    if cmd == "submit":
        return submit(cfg, overrides, args.workers, args.slurm_partition, args.gpus_per_worker, args.minutes,
                      args.wait)
    url, name = cfg.hydra.sweeper.storage, cfg.hydra.sweeper.study_name
    if cmd == "dashboard":
        target = url[len("journal:"):] if (url or "").startswith("journal:") else url
        port = os.environ.get("DASHBOARD_PORT", "8080")
        loop.log(f"optuna-dashboard on {describe_storage(url)}: http://127.0.0.1:{port}")
        os.execvp("optuna-dashboard", ["optuna-dashboard", "--host", "127.0.0.1", "--port", port, target])
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        print(f"no study named {name!r} in {describe_storage(url)} yet", file=sys.stderr)
        return 1
    if cmd == "status":
        print(report.status_text(study))
    elif cmd == "requeue":
        points = studies.requeue_failed(study)
        for p in points:
            print("queued again: " + ",".join(as_overrides(p)))
        loop.log(f"study {name!r}: {len(points)} failed point(s) queued again"
                 + ("; run the sweep again to run them" if points else " (none had failed in every trial)"))
    else:
        write_report(study, cfg)
    return 0


def write_report(study: optuna.Study, cfg) -> None:
    from src.tracking.store import client, resolve_uri

    out = Path(str(cfg.hydra.sweep.dir)) / "report"
    metric = cfg.get("optimized_metric") or "objective"
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if not parent:
        paths, text = report.write(study, out, metric)
    else:  # the trials' runs are in the parent's experiment: the page links to them
        uri = resolve_uri(cfg.tracking.uri)
        mlflow = client(uri)
        paths, text = report.write(study, out, metric, uri, mlflow.get_run(parent).info.experiment_id)
        for p in paths:
            mlflow.log_artifact(parent, str(p), "report")
    print(text)
    loop.log(f"report in {out}" + (f" and on MLflow run {parent}" if parent else ""))
