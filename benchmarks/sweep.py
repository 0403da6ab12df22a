"""Sweep throughput: one worker against two on the same grid, and the per-trial overhead.

    python benchmarks/sweep.py [--epochs 10] [--repeats 1] [--grid 8|18] [--docs]

`--grid 8` (the default) is activation=sigmoid,relu x init=xavier,he x model.depth=2,4; `--grid 18` is the
grid `make sweep` runs (conf/hparams_search/grid.yaml's own axes, 3 x 2 x 3). The sweeps run back to back in
fresh studies and MLflow stores under a temporary folder: one worker with the thread split `make sweep` uses
(all cores), one worker with one torch thread (on small nets one thread is often faster than several, so this
is the fairer baseline), and two workers (cores/2 threads each); with `--repeats N` the three run N times, in
reversed order every other time, and ratios are the median of each repeat's own. The per-trial overhead
is a trial's wall time (claim to result, as Optuna records it) minus the time its Lightning fit took
(`time/fit_s`) and the time its trace, verdict and report took after it
(`time/artifacts_s`, shown apart): fork, Hydra job set-up, MLflow run creation, data loading, the verdict.
A command splits into its start-up (command start to the first claim: imports, stores, queueing), the grid
phase (first claim to last result) and the report (last result to exit). Last lines: `workers_2_vs_1=<ratio>`
(whole commands, against the default one-worker run), `workers_2_vs_1_thread=<ratio>` (against the
one-thread run), `grid_phase_2_vs_1=<ratio>` and `trial_overhead_s=<seconds>`. `--docs` also writes the
table and those lines into docs/performance.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import optuna
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import perf_page  # noqa: E402  (benchmarks/perf_page.py)
from src.sweeps.storage import open_storage  # noqa: E402

# the grids' axis overrides: 8 points, or none (the config's own 18)
GRIDS = {8: ["activation=sigmoid,relu", "init=xavier,he", "model.depth=2,4"], 18: []}


class Sweep(NamedTuple):
    wall: float  # the whole command
    grid: float  # first claim to last result
    startup: float  # command start to first claim: imports, stores, queueing
    end: float  # last result to the command's exit: the report
    overheads: list[float]
    fits: list[float]
    artifacts: list[float]


def run_sweep(tmp: Path, grid: list[str], workers: int, epochs: int, threads: int | None = None) -> Sweep:
    tag = f"w{workers}t{threads}"
    storage, uri = f"journal:{tmp}/{tag}.journal", f"sqlite:///{tmp}/{tag}.db"
    cmd = [sys.executable, "-m", "src.train", "-m", "hparams_search=grid", *grid, f"trainer.max_epochs={epochs}",
           f"hydra.sweeper.storage={storage}", f"hydra.sweeper.workers={workers}",
           f"hydra.sweep.dir={tmp}/sweeps-{tag}"] + ([f"hydra.sweeper.torch_threads={threads}"] if threads else [])
    tmp.mkdir(parents=True, exist_ok=True)
    began, t0 = datetime.now(), time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, MLFLOW_TRACKING_URI=uri), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    study = optuna.load_study(study_name="gradflow-grid", storage=open_storage(storage))
    client = MlflowClient(uri)
    overheads, fits, artifacts = [], [], []
    trials = study.get_trials()
    first, last = min(t.datetime_start for t in trials), max(t.datetime_complete for t in trials)
    for t in trials:
        assert t.state.name == "COMPLETE", (t.number, t.state, t.user_attrs.get("error"))
        m = client.get_run(t.user_attrs["mlflow_run_id"]).data.metrics
        overheads.append((t.datetime_complete - t.datetime_start).total_seconds() - m["time/fit_s"]
                         - m["time/artifacts_s"])
        fits.append(m["time/fit_s"])
        artifacts.append(m["time/artifacts_s"])
    startup = (first - began).total_seconds()
    grid = (last - first).total_seconds()
    return Sweep(wall, grid, startup, wall - startup - grid, overheads, fits, artifacts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10, help="the grid's own default is 10")
    ap.add_argument("--grid", type=int, choices=sorted(GRIDS), default=8,
                    help="8: the 2 x 2 x 2 grid; 18: the default grid of make sweep")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the three sweeps this many times, in reversed order every other time")
    ap.add_argument("--docs", action="store_true", help="also write the table into docs/performance.md")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    configs = {"1 (all cores)": (1, None), "1 (1 thread)": (1, 1), "2": (2, None)}
    runs: dict[str, list[Sweep]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory(prefix="gradflow-bench-") as tmp:
        for r in range(args.repeats):
            for name in list(configs) if r % 2 == 0 else reversed(configs):
                workers, threads = configs[name]
                runs[name].append(run_sweep(Path(tmp) / f"r{r}", GRIDS[args.grid], workers, args.epochs,
                                                threads))
                print(f"repeat {r + 1}/{args.repeats}: {name} worker(s) took {runs[name][-1].wall:.1f} s",
                      file=sys.stderr, flush=True)
    med = statistics.median
    lines = [f"{args.grid}-point grid, {args.epochs} epochs on digits, {args.repeats} repeat(s); medians over "
             "repeats.", "", "| workers | wall s | start-up s | grid s | report s | fit s/trial | artifacts s/trial "
             "| overhead s/trial |", "|---|---|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        lines.append(f"| {name} | {med(r.wall for r in rs):.1f} | {med(r.startup for r in rs):.1f} | "
                     f"{med(r.grid for r in rs):.1f} | {med(r.end for r in rs):.1f} | "
                     f"{med(statistics.mean(r.fits) for r in rs):.2f} | {med(statistics.mean(r.artifacts) for r in rs):.2f} | "
                     f"{med(statistics.median(r.overheads) for r in rs):.2f} |")
    print("\n".join(lines) + "\n")

    def paired(a: str, b: str, field: str = "wall") -> tuple[float, float, float]:
        """Median, min and max over repeats of a's time over b's in the same repeat."""
        ratios = [getattr(x, field) / getattr(y, field) for x, y in zip(runs[a], runs[b])]
        return med(ratios), min(ratios), max(ratios)

    over = [o for r in runs["1 (all cores)"] for o in r.overheads]
    summary = [f"per-trial overhead (trial wall - fit - artifacts), 1 worker: median {med(over):.2f} s, "
               f"max {max(over):.2f} s"]
    for key, (a, b, field) in {"workers_2_vs_1": ("2", "1 (all cores)", "wall"),
                               "workers_2_vs_1_thread": ("2", "1 (1 thread)", "wall"),
                               "grid_phase_2_vs_1": ("2", "1 (all cores)", "grid")}.items():
        mid, lo, hi = paired(a, b, field)
        summary.append(f"{key}={mid:.3f}" + (f"  (repeats: {lo:.3f}-{hi:.3f})" if args.repeats > 1 else ""))
    summary.append(f"trial_overhead_s={med(over):.3f}")
    summary.append(f"trial_artifacts_s={med(a for r in runs['1 (all cores)'] for a in r.artifacts):.3f}")
    print("\n".join(summary))
    if args.docs:
        perf_page.write(f"sweep-{args.grid}", lines + ["", "```", *summary, "```"])


if __name__ == "__main__":
    main()
