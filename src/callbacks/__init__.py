"""Lightning callbacks, one concern each, built from the `callbacks` config group (conf/callbacks): the
gradient statistics, the histograms, the weight change, the guard against a non-finite loss, and the pruning
of a sweep's trial. A callback may declare what it leaves behind: `artifacts()` (files by role, uploaded
after fit) and `tags()` (MLflow tags of the run)."""
from __future__ import annotations

from pathlib import Path


def artifacts_of(callbacks: list) -> dict[str, Path]:
    """Every file the callbacks declare, by role (trace, histograms, weight_change, ...)."""
    return _gather(callbacks, "artifacts")


def tags_of(callbacks: list) -> dict[str, str]:
    """Every MLflow tag the callbacks declare."""
    return _gather(callbacks, "tags")


def _gather(callbacks: list, method: str) -> dict:
    out: dict = {}
    for cb in callbacks:
        if hasattr(cb, method):
            out.update(getattr(cb, method)())
    return out
