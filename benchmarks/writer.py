"""What the MLflow writer's design costs the training thread, measured side by side in one process.

    python benchmarks/writer.py [--model small|mid|wide] [--repeats 4] [--threads 1] [--docs]

Trains the MLP of benchmarks/overhead.py with all statistics every step (the MLflow snapshot at the default
cadence, stats.log_every_n_steps, on a SQLite store) with the writer as it is (log_batch in a forked process,
batches held open 1 s) and with two older designs (log_batch on the writer thread, with and without the 1 s
batching), interleaved, plus `stats=off`. Prints each one's median wall and CPU time per step and its ratio to
`off`; `--docs` also writes that table into docs/performance.md (one block per model).
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import overhead  # noqa: E402
import perf_page  # noqa: E402
import torch  # noqa: E402

VARIANTS = {
    "off": ("off", {}),
    "forked process, 1 s batches": ("stats", {}),
    "writer thread, 1 s batches": ("stats", {"process": False}),
    "writer thread, no batching": ("stats", {"process": False, "linger": 0.0}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", choices=sorted(overhead.MODELS))
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: all of torch on the timed thread)")
    ap.add_argument("--docs", action="store_true", help="also write the table into docs/performance.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    workdir = Path(tempfile.mkdtemp(prefix="gradflow-bench-"))
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    real, times = overhead.AsyncRunWriter, {name: [] for name in VARIANTS}
    try:  # the writer overhead.run_once builds, with each variant's options
        for _ in range(args.repeats):
            for name, (condition, options) in VARIANTS.items():
                overhead.AsyncRunWriter = functools.partial(real, **options)
                times[name].append(overhead.run_once(args.model, condition, args.steps, 30, uri, "cpu", workdir))
    finally:
        overhead.AsyncRunWriter = real
    wall = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    cpu = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
    lines = [f"{overhead.MODELS[args.model].label}, {args.threads} torch thread(s), {args.repeats} repeats, medians.", "",
             "| writer | wall ms/step | vs off | cpu ms/step | vs off |", "|---|---|---|---|---|"]
    for k in VARIANTS:
        lines.append(f"| {k} | {wall[k] * 1e3:.2f} | {wall[k] / wall['off']:.2f}x | {cpu[k] * 1e3:.2f} | "
                     f"{cpu[k] / cpu['off']:.2f}x |")
    print("\n".join(lines))
    if args.docs:
        perf_page.write(f"writer-{args.model}", lines)


if __name__ == "__main__":
    main()
