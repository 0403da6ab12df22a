"""Sweep throughput: one worker against two on the same 8-point grid, and the per-trial overhead.

    python benchmarks/sweep.py [--epochs 3]

The sweeps run back to back in fresh studies and MLflow stores under a temporary folder: one worker with the
thread split `make sweep` uses (all cores), one worker with one torch thread (on small nets one thread is
often faster than several, so this is the fairer baseline), and two workers (cores/2 threads each). The per-trial overhead is a trial's
wall time (claim to result, as Optuna records it) minus the time its Lightning fit took (`time/fit_s`) and the
time its trace, figures and uploads took after it (`time/artifacts_s`, shown apart): fork, Hydra job set-up,
MLflow run creation, data loading, the verdict. The grid phase runs from the first
claim to the last result: the command less its start-up (imports, stores, queueing) and the report. Last
lines: `workers_2_vs_1=<ratio>` (whole commands, against the default one-worker run),
`workers_2_vs_1_thread=<ratio>` (against the one-thread run), `grid_phase_2_vs_1=<ratio>` and
`trial_overhead_s=<seconds>`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from src import sweep  # noqa: E402

GRID = ["activation=sigmoid,relu", "init=xavier,he", "model.depth=2,4"]


def run_sweep(tmp: Path, workers: int, epochs: int, threads: int | None = None
              ) -> tuple[float, float, list[float], list[float], list[float]]:
    tag = f"w{workers}t{threads}"
    storage, uri = f"journal:{tmp}/{tag}.journal", f"sqlite:///{tmp}/{tag}.db"
    cmd = [sys.executable, "-m", "src.train", "-m", "hparams_search=grid", *GRID, f"trainer.max_epochs={epochs}",
           "tracking.plots=true", f"hydra.sweeper.storage={storage}", f"hydra.sweeper.n_jobs={workers}",
           f"hydra.sweep.dir={tmp}/sweeps-{tag}"] + ([f"hydra.sweeper.torch_threads={threads}"] if threads else [])
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, MLFLOW_TRACKING_URI=uri), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    study = optuna.load_study(study_name="gradflow-grid", storage=sweep.open_storage(storage))
    client = MlflowClient(uri)
    overheads, fits = [], []
    trials = study.get_trials()
    # the grid phase: first claim to last result (the command's wall time less start-up and the report)
    grid = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    artifacts = []
    for t in trials:
        assert t.state.name == "COMPLETE", (t.number, t.state, t.user_attrs.get("error"))
        m = client.get_run(t.user_attrs["mlflow_run_id"]).data.metrics
        overheads.append((t.datetime_complete - t.datetime_start).total_seconds() - m["time/fit_s"]
                         - m["time/artifacts_s"])
        fits.append(m["time/fit_s"])
        artifacts.append(m["time/artifacts_s"])
    return wall, grid, overheads, fits, artifacts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10, help="the grid's own default is 10")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gradflow-bench-") as tmp:
        one, grid1, over, fit1, art1 = run_sweep(Path(tmp), 1, args.epochs)
        one_t, grid1_t, over_t, fit1_t, art1_t = run_sweep(Path(tmp), 1, args.epochs, threads=1)
        two, grid2, over2, fit2, art2 = run_sweep(Path(tmp), 2, args.epochs)
    print(f"8-point grid, {args.epochs} epochs on digits, {os.cpu_count()} cores")
    print(f"{'workers':>18} {'wall s':>8} {'grid s':>8} {'fit s/trial':>12} {'artifacts s/trial':>18} "
          f"{'overhead s/trial':>17}")
    rows = (("1 (all cores)", one, grid1, fit1, art1, over), ("1 (1 thread)", one_t, grid1_t, fit1_t, art1_t, over_t),
            ("2", two, grid2, fit2, art2, over2))
    for name, wall, grid, fit, art, ov in rows:
        print(f"{name:>18} {wall:8.1f} {grid:8.1f} {statistics.mean(fit):12.2f} {statistics.mean(art):18.2f} "
              f"{statistics.median(ov):17.2f}")
    print(f"start-up and report (wall - grid), 1 worker: {one - grid1:.1f} s, 2 workers: {two - grid2:.1f} s")
    print(f"per-trial overhead (trial wall - fit - artifacts), 1 worker: median {statistics.median(over):.2f} s, "
          f"max {max(over):.2f} s")
    print(f"workers_2_vs_1={two / one:.3f}")
    print(f"workers_2_vs_1_thread={two / one_t:.3f}")
    print(f"grid_phase_2_vs_1={grid2 / grid1:.3f}")
    print(f"trial_overhead_s={statistics.median(over):.3f}")
    print(f"trial_artifacts_s={statistics.median(art1):.3f}")


if __name__ == "__main__":
    main()
