"""What a run costs after its training: `time/artifacts_s` (reading the trace back, the verdict, report.html, and
the PNG figures when asked for) against `time/fit_s`, on the default run as `make train` runs it.

    python benchmarks/after_fit.py [--repeats 3] [--docs] [overrides ...]

Runs the default config with `tracking.plots=false` (the default: report.html only) and `tracking.plots=true`
(the report and the PNGs, as every run did before the report), interleaved, each in a fresh process and MLflow
store under a temporary folder. Prints the medians and the last lines `after_fit_vs_fit=<ratio>` (the default
run's artifacts_s over its fit_s) and `png_vs_report=<ratio>` (artifacts_s with the PNGs over without).
`--docs` also writes the table into docs/performance.md.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import perf_page  # noqa: E402  (benchmarks/perf_page.py)


def one_run(tmp: Path, name: str, plots: bool, extra: list[str]) -> tuple[float, float, int]:
    """(fit_s, artifacts_s, report bytes) of one default run in its own store."""
    uri = f"sqlite:///{tmp / name}.db"
    subprocess.run([sys.executable, "-m", "src.train", f"tracking.uri={uri}", f"tracking.plots={str(plots).lower()}",
                    "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp / name}", *extra],
                   cwd=ROOT, check=True, capture_output=True)
    [run] = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("gradflow").experiment_id])
    m = run.data.metrics
    return m["time/fit_s"], m["time/artifacts_s"], (tmp / name / "report.html").stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--docs", action="store_true", help="also write the table into docs/performance.md")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run (e.g. trainer.max_epochs=5)")
    args = ap.parse_args()
    got: dict[bool, list[tuple[float, float, int]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for plots in ((False, True) if r % 2 == 0 else (True, False)):  # neither always goes first
                got[plots].append(one_run(Path(tmp), f"r{r}-{plots}", plots, args.overrides))
                fit, after, _ = got[plots][-1]
                print(f"repeat {r + 1}/{args.repeats} plots={plots}: fit {fit:.2f} s, after fit {after:.3f} s",
                      file=sys.stderr)
    med = {p: [statistics.median(v[i] for v in runs) for i in range(3)] for p, runs in got.items()}
    lines = ["| run | fit_s | artifacts_s | artifacts / fit | report.html |", "|---|---|---|---|---|"]
    for plots, label in ((False, "default (report.html)"), (True, "tracking.plots=true (report + PNGs)")):
        fit, after, size = med[plots]
        lines.append(f"| {label} | {fit:.2f} | {after:.3f} | {after / fit:.3f} | {size / 1024:.0f} KB |")
    lines += ["", "```", f"after_fit_vs_fit={med[False][1] / med[False][0]:.3f}",
              f"png_vs_report={med[True][1] / med[False][1]:.1f}", "```"]
    print("\n".join(lines))
    if args.docs:
        perf_page.write("after-fit", lines)


if __name__ == "__main__":
    main()
