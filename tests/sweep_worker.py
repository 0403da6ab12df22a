"""A sweep worker with a cheap objective, in its own light module so that spawned test processes import only
the engine (and not the test module's heavier imports)."""
from __future__ import annotations

import time

from src.sweeps.leases import Outcome, Policy
from src.sweeps.loop import work
from src.sweeps.space import grid_points, parse_space
from src.sweeps.storage import open_storage
from src.sweeps.study import enqueue_grid, load_or_create, requeue_failed

FAST = Policy(max_retries=2, heartbeat_interval=0.1, grace_period=2.0, poll_interval=0.05)


def grid_worker(url: str, name: str, space_cfg: dict, out, start, delay: float) -> None:
    """Join the study, wait until every worker is ready (so the election and the claims really race),
    enqueue the grid, run trials; report how many this worker ran."""
    space, _ = parse_space(space_cfg, [])
    study = load_or_create(open_storage(url), name, "maximize")
    start.wait(timeout=300)
    enqueue_grid(study, grid_points(space))

    def run(trial, params):
        time.sleep(delay)
        return Outcome(value=float(params["a"] * 10 + params["b"]))

    out.put(work(study, space, FAST, grid=True, run=run))


def requeue_worker(url: str, name: str, out, start) -> None:
    """Wait until every process is ready, then ask for the failed points to be queued again at once."""
    study = load_or_create(open_storage(url), name, "maximize")
    start.wait(timeout=300)
    out.put(len(requeue_failed(study, settle=0.0)))
