"""Retrying calls to a tracking store that may be unreachable for a while: one backoff rule, one deadline
per call, and the refusals that no retry can mend."""
from __future__ import annotations

import sys
import time
from typing import Iterator

from mlflow.exceptions import MlflowException

from src.tracking.urls import redact


def backoff(first: float, cap: float = 5.0) -> Iterator[float]:
    """The waits between attempts: first, doubling, at most cap."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, cap)


def retrying(call, what: str, deadline: float):
    """call() until it succeeds or time.monotonic() passes deadline (then the last error is raised).
    A refusal the server understood (bad value, unknown run, not allowed) is raised at once."""
    for delay in backoff(0.5):
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - any transport failure: retry until the deadline
            if is_permanent(e) or time.monotonic() + delay > deadline:
                raise
            print(f"mlflow: {what} failed ({redact(first_line(e))}); retrying", file=sys.stderr)
            time.sleep(delay)


def is_permanent(e: Exception) -> bool:
    """A request the server understood and refused (bad value, unknown run, no permission): retrying
    cannot help."""
    return isinstance(e, MlflowException) and e.error_code in (
        "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "UNAUTHENTICATED", "PERMISSION_DENIED")


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
