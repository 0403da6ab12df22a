"""What a run leaves behind once fit has ended (or failed): the files its callbacks declare, read back; with
`tracking.plots` the PNG figures drawn from them; the presets' per-epoch view; and, once the run is judged, its
HTML report. Uploading is the caller's: it passes `upload(path, artifact_folder)`. A figure or report that
cannot be written is reported and skipped: this runs after a failed fit too, where it must not hide the run's
own error."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from src.callbacks import artifacts_of
from src.callbacks.weight_change import read_weight_change
from src.stats.histograms import read_histograms
from src.stats.trace import read_time_trace, read_trace


@dataclass
class Recorded:
    """The callbacks' files read back (None where a callback was off)."""
    trace: dict | None = None
    through_time: dict | None = None
    hist: dict | None = None


def record(upload: Callable[[Path, str], None], callbacks: list, history: dict, out_dir: Path, title: str,
           chi1: list[float] | None, draw: bool, steps_per_epoch: Callable[[], int] | None) -> Recorded:
    """Upload the callbacks' files under trace/ and, with `draw`, the PNG figures under plots/; with
    `steps_per_epoch` (asked only now, when the trainer knows it), the per-epoch statistics too."""
    files = artifacts_of(callbacks)
    for path in files.values():
        upload(path, "trace")
    got = Recorded(read_trace(files["trace"]) if "trace" in files else None,
                   read_time_trace(files["time_trace"]) if "time_trace" in files else None,
                   read_histograms(files["histograms"]) if "histograms" in files else None)
    if draw:
        try:
            from src.analysis import plots  # matplotlib: imported only when PNGs are asked for

            change = read_weight_change(files["weight_change"]) if "weight_change" in files else None
            for path in plots.draw_all(got.trace, history, out_dir / "plots", title, chi1, got.hist, change,
                                       got.through_time):
                upload(path, "plots")
        except Exception as e:  # noqa: BLE001
            print(f"plots: could not draw the figures: {e}", file=sys.stderr)
    if steps_per_epoch and got.trace is not None and len(got.trace["steps"]):
        try:  # seed 003's view: each layer's weight and gradient mean/std per epoch
            from src.analysis import plots

            paths = plots.epoch_stats(got.trace, max(1, int(steps_per_epoch())), out_dir / "epoch_stats.csv",
                                      out_dir / "plots" / "epoch_stats.png" if draw else None, title)
            for path, folder in zip(paths, ("trace", "plots")):
                upload(path, folder)
        except Exception as e:  # noqa: BLE001
            print(f"extras: could not write the per-epoch statistics: {e}", file=sys.stderr)
    return got


def report(upload: Callable[[Path, str | None], None], got: Recorded, out_dir: Path, title: str, judged,
           metrics: dict[str, float], history: dict, chi1: list[float] | None, config: str,
           jacobian=None) -> None:
    """Write report.html (src.report.run) and upload it at the top of the run's artifacts; `jacobian`: the
    singular values at initialisation (src.analysis.jacobian), when stats.jacobian computed them."""
    from src.report import run

    try:
        upload(run.write(out_dir / "report.html", title, judged, metrics, got.trace, history, chi1, got.hist,
                         got.through_time, config, jacobian), None)
    except Exception as e:  # noqa: BLE001
        print(f"report: could not write report.html: {e}", file=sys.stderr)
