"""The statistics' per-step cost of this checkout against an earlier commit, measured side by side in one run.

    python benchmarks/ab.py --baseline REV [--rounds 4] [--models small,mid,wide] [-- overhead.py options]

Checks REV out into a temporary git worktree and runs `benchmarks/overhead.py --repeats 1 --no-slow-server`
alternately in it and in this checkout (the order swapped every other round, so a machine slowing down biases
neither side), with the same Python. Each run prints its own paired `stats / off` ratio per model; this script
prints, per model, the median over rounds of each side's ratio, and of the ratio of the two sides' `stats`
milliseconds per step in the same round (`now / base`: below 1 is faster now). The last lines are
machine-readable: `ab_<model>_stats_now_vs_base=<ratio>`.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a row of overhead.py's table: "| 20x256 relu | stats | 1.23 | ..." (older ones: fixed-width columns)
ROW = re.compile(r"^\|? ?(\d+x\d+ \w+)\s*\|?\s*(off|stats)\s*\|?\s*([\d.]+)", re.M)
RATIO = re.compile(r"^(overhead_ratio(?:_small|_wide)?)=([\d.]+)$", re.M)
NAMES = {"overhead_ratio_small": "small", "overhead_ratio": "mid", "overhead_ratio_wide": "wide"}


def run(tree: Path, models: str, extra: list[str]) -> tuple[dict, dict]:
    """({model: stats ms/step}, {model: stats/off ratio}) from one overhead.py run in `tree`."""
    cmd = [sys.executable, str(tree / "benchmarks/overhead.py"), "--repeats", "1", "--no-slow-server",
           "--models", models, *extra]
    out = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, check=True).stdout
    stats_ms = [float(ms) for _, cond, ms in ROW.findall(out) if cond == "stats"]  # in the order of --models
    ratios = {NAMES[k]: float(v) for k, v in RATIO.findall(out)}
    return dict(zip(models.split(","), stats_ms)), ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="the git revision to compare with (e.g. main, HEAD~3)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--models", default="small,mid,wide")
    ap.add_argument("extra", nargs="*", help="more overhead.py options, after --")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gradflow-ab-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.baseline], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            ms = {"now": [], "base": []}
            ratios = {"now": [], "base": []}
            for r in range(args.rounds):
                order = [("now", ROOT), ("base", base)]
                for side, tree in order if r % 2 == 0 else reversed(order):
                    m, q = run(tree, args.models, args.extra)
                    ms[side].append(m)
                    ratios[side].append(q)
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
    rev = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    print(f"\nthis checkout against {args.baseline} ({rev}), {args.rounds} rounds of overhead.py --repeats 1\n")
    print("| model | stats/off now | stats/off base | stats ms/step now / base (paired) | range |")
    print("|---|---|---|---|---|")
    summary = []
    for model in args.models.split(","):
        paired = [a[model] / b[model] for a, b in zip(ms["now"], ms["base"])]
        now = statistics.median(q[model] for q in ratios["now"])
        was = statistics.median(q[model] for q in ratios["base"])
        print(f"| {model} | {now:.2f}x | {was:.2f}x | {statistics.median(paired):.3f} | "
              f"{min(paired):.2f}-{max(paired):.2f} |")
        summary.append(f"ab_{model}_stats_now_vs_base={statistics.median(paired):.3f}")
    print("\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
