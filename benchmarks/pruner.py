"""What the VanishingPruner saves on the grid `make sweep` runs, and what it changes in the answer.

    python benchmarks/pruner.py [--workers 2] [--repeats 1] [--docs] [overrides ...]

Runs the 18-point grid (conf/hparams_search/grid.yaml, 10 epochs on digits) with `hydra.sweeper.pruner=null`
and with the VanishingPruner, back to back (in reversed order every other repeat), each in a fresh study and
MLflow store. Prints each sweep's wall time and trials pruned, then whether the best point and each point's
verdict are the same with and without it, and the last line `pruner_wall_ratio=<with / without>` (median over
repeats). `--docs` also writes the table into docs/performance.md.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import perf_page  # noqa: E402  (benchmarks/perf_page.py)
from src.sweeps.space import point_key  # noqa: E402
from src.sweeps.storage import open_storage  # noqa: E402

PRUNERS = {"none": "null", "vanishing": "{_target_: src.sweeps.pruners.VanishingPruner}"}


def sweep(tmp: Path, pruner: str, workers: int, extra: list[str]) -> tuple[float, dict, list[str]]:
    """(wall seconds, {point: (state, verdict, value)}, the best point) of one fresh sweep."""
    tmp.mkdir(parents=True)
    storage, uri = f"journal:{tmp}/o.journal", f"sqlite:///{tmp}/mlflow.db"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "src.train", "-m", "hparams_search=grid", f"hydra.sweeper.workers={workers}",
                    f"hydra.sweeper.storage={storage}", f"hydra.sweeper.pruner={PRUNERS[pruner]}",
                    f"hydra.sweep.dir={tmp}/s", *extra], cwd=ROOT, env=dict(os.environ, MLFLOW_TRACKING_URI=uri),
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    study = optuna.load_study(study_name="gradflow-grid", storage=open_storage(storage))
    points = {point_key(t.params): (t.state.name, t.user_attrs.get("verdict", "-"), t.value)
              for t in study.get_trials()}
    return wall, points, point_key(study.best_trial.params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="as make sweep (SWEEP_WORKERS=2)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--docs", action="store_true", help="also write the table into docs/performance.md")
    ap.add_argument("overrides", nargs="*", help="config overrides for both sweeps")
    args = ap.parse_args()
    got: dict[str, list] = {"none": [], "vanishing": []}
    with tempfile.TemporaryDirectory(prefix="gradflow-pruner-") as tmp:
        for r in range(args.repeats):
            for name in (("none", "vanishing") if r % 2 == 0 else ("vanishing", "none")):
                got[name].append(sweep(Path(tmp) / f"{r}-{name}", name, args.workers, args.overrides))
                print(f"repeat {r + 1}/{args.repeats}: pruner={name} took {got[name][-1][0]:.1f} s", file=sys.stderr)
    (_, without, best_without), (_, with_, best_with) = got["none"][-1], got["vanishing"][-1]
    ratio = statistics.median(w[0] / n[0] for w, n in zip(got["vanishing"], got["none"]))
    lines = [f"{len(without)}-point grid, {args.workers} worker(s), {args.repeats} repeat(s); the points of the last repeat.", "",
             "| point | without: state, verdict, val/acc | with the pruner: state, verdict, val/acc |",
             "|---|---|---|"]
    for point in sorted(without):
        a, b = without[point], with_.get(point, ("-", "-", None))
        lines.append(f"| {point} | {a[0]}, {a[1]}, {a[2]:.3f} | {b[0]}, {b[1]}, "
                     f"{'-' if b[2] is None else f'{b[2]:.3f}'} |")
    same = [p for p in without if without[p][1] == with_.get(p, (None, None))[1]]
    wall = {n: statistics.median(x[0] for x in runs) for n, runs in got.items()}
    lines += ["", "```", f"wall s: without {wall['none']:.1f}, with {wall['vanishing']:.1f}",
              f"pruned: {sum(v[0] == 'PRUNED' for v in with_.values())} of {len(with_)} points",
              f"same verdict: {len(same)} of {len(without)} points",
              f"best point: without {best_without}; with {best_with}; "
              f"{'the same' if best_with == best_without else 'DIFFERENT'}",
              f"pruner_wall_ratio={ratio:.3f}", "```"]
    print("\n".join(lines))
    if args.docs:
        perf_page.write("pruner", lines)


if __name__ == "__main__":
    main()
