"""What a run prints: the known noise of our dependencies filtered by message (never whole categories, so a new
warning still shows), and the three lines that end a run."""
from __future__ import annotations

import logging
import re
import warnings

# Lightning's advertisement for its own logging product, printed by every Trainer without one
ADVERT = re.compile(r"^💡 Tip: .*litlogger")
# torch deprecates LeafSpec, which Lightning's pytree helper still uses; and the all_gather Lightning's DDP
# strategy calls (the statistics' one collective per flush): nothing a user of ours can change
HARMLESS_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                     r"torch\.distributed\.nn\.functional\.all_gather is deprecated")


class _DropAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not ADVERT.match(str(record.msg))


def quiet_known_noise() -> None:
    """Filter the lines above (idempotent: the filters are installed once)."""
    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvert) for f in log.filters):
        log.addFilter(_DropAdvert())


def fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def metrics_line(metrics: dict[str, float]) -> str:
    """The headline metrics present in `metrics`, and the fit's time."""
    shown = [k for k in ("val/acc", "val/loss", "train/loss", "backprop_ratio", "backprop_time_ratio") if k in metrics]
    timing = f"  (fit {metrics['time/fit_s']:.1f} s)" if "time/fit_s" in metrics else ""
    return "  ".join(f"{k}={fmt(metrics[k])}" for k in shown) + timing


def summary(verdict: str, reason: str, metrics: dict[str, float], where: str) -> str:
    """The run's last three lines: its verdict and why, its headline metrics, where to look next."""
    return "\n".join([f"verdict: {verdict}: {reason}", metrics_line(metrics), f"look: {where}"])
