"""What a run leaves behind once fit has ended (or failed): the files its callbacks declare, read back; the
figures drawn from them; the presets' per-epoch view. Uploading is the caller's: it passes `upload(path,
artifact_folder)`. A figure that cannot be drawn is reported and skipped: this runs after a failed fit too,
where it must not hide the run's own error."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from src.analysis import plots
from src.callbacks import artifacts_of
from src.callbacks.weight_change import read_weight_change
from src.stats.histograms import read_histograms
from src.stats.trace import read_time_trace, read_trace


def record(upload: Callable[[Path, str], None], callbacks: list, history: dict, out_dir: Path, title: str,
           chi1: list[float] | None, draw: bool, steps_per_epoch: Callable[[], int] | None
           ) -> tuple[dict | None, dict | None]:
    """Upload the callbacks' files under trace/ and, with `draw`, the figures under plots/; with
    `steps_per_epoch` (asked only now, when the trainer knows it), the per-epoch statistics too. Returns the
    trace and the signal through time as read back (None without them)."""
    files = artifacts_of(callbacks)
    for path in files.values():
        upload(path, "trace")
    trace = read_trace(files["trace"]) if "trace" in files else None
    through_time = read_time_trace(files["time_trace"]) if "time_trace" in files else None
    if draw:
        try:
            hist = read_histograms(files["histograms"]) if "histograms" in files else None
            change = read_weight_change(files["weight_change"]) if "weight_change" in files else None
            for path in plots.draw_all(trace, history, out_dir / "plots", title, chi1, hist, change, through_time):
                upload(path, "plots")
        except Exception as e:  # noqa: BLE001
            print(f"plots: could not draw the figures: {e}", file=sys.stderr)
    if steps_per_epoch and trace is not None and len(trace["steps"]):
        try:  # seed 003's view: each layer's weight and gradient mean/std per epoch
            paths = plots.epoch_stats(trace, max(1, int(steps_per_epoch())), out_dir / "epoch_stats.csv",
                                      out_dir / "plots" / "epoch_stats.png" if draw else None, title)
            for path, folder in zip(paths, ("trace", "plots")):
                upload(path, folder)
        except Exception as e:  # noqa: BLE001
            print(f"extras: could not write the per-epoch statistics: {e}", file=sys.stderr)
    return trace, through_time
