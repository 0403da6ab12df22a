"""Many sweep workers on one PostgreSQL study, tracking to one MLflow server on PostgreSQL: what breaks first.

    python benchmarks/scale.py [--workers 8,16,32] [--points-per-worker 3] [--per-command 8] [--docs]

For each N: fresh databases for Optuna and MLflow, an `mlflow server` on PostgreSQL (4 workers, in its own
process group), then N workers (N / per-command commands of `hydra.sweeper.workers=per-command` each, the
forked workers sharing their command's imports) on a grid of N x points-per-worker tiny trials (seed axis, 3
steps each). Reported per N: claims per second over the grid phase, trial start latency (claim to its MLflow
run's start: the queue and the tracking server under load), the most PostgreSQL connections in use at once
(pg_stat_activity, both databases, sampled every 0.2 s), trials that failed, workers that exited non-zero, and
whether every point completed exactly once. PostgreSQL: $GRADFLOW_TEST_POSTGRES (default
postgresql://postgres@127.0.0.1:5432/postgres), with rights to create databases.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import optuna
import psycopg
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import perf_page  # noqa: E402  (benchmarks/perf_page.py)
from src.sweeps.space import point_key  # noqa: E402
from src.sweeps.storage import open_storage  # noqa: E402

ADMIN = os.environ.get("GRADFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
TINY = ["activation=relu", "init=he", "model.depth=2", "model.width=16", "trainer.max_steps=3",
        "+trainer.limit_val_batches=1", "hydra.sweeper.heartbeat_interval=2", "hydra.sweeper.torch_threads=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_pools() -> dict[str, str]:
    """The MLflow server's pool settings, as docker-compose.yml gives them."""
    import yaml

    env = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["mlflow"]["environment"]
    return {k: str(v) for k, v in env.items() if k.startswith("MLFLOW_SQLALCHEMYSTORE_")}


class Connections(threading.Thread):
    """The most connections to `databases` seen in pg_stat_activity, sampled until stopped."""

    def __init__(self, databases: list[str]):
        super().__init__(daemon=True)
        self.databases, self.most, self.done = databases, 0, threading.Event()

    def run(self) -> None:
        with psycopg.connect(ADMIN, autocommit=True) as con:
            while not self.done.wait(0.2):
                (n,) = con.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = ANY(%s)",
                                   (self.databases,)).fetchone()
                self.most = max(self.most, n)


def one(n: int, per_command: int, points: int, tmp: Path) -> dict:
    names = [f"gradflow_scale_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("optuna", "mlflow")]
    with psycopg.connect(ADMIN, autocommit=True) as con:
        for name in names:
            con.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN.rsplit("/", 1)[0]
    storage, backend = (f"{base}/{name}" for name in names)
    port = free_port()
    server = subprocess.Popen(["mlflow", "server", "--backend-store-uri", backend.replace("postgresql://",
                               "postgresql+psycopg://"), "--artifacts-destination", str(tmp / "artifacts"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "4"],
                              stdout=open(tmp / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, **server_pools(),
                                   "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    uri = f"http://127.0.0.1:{port}"
    watch = Connections(names)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"mlflow server did not start: {(tmp / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        watch.start()
        commands = [[sys.executable, "-m", "src.train", "-m", "hparams_search=grid", *TINY,
                     f"seed=range(0,{n * points})", f"hydra.sweeper.workers={per_command}",
                     f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=scale",
                     f"hydra.sweep.dir={tmp}/sweeps"] for _ in range(max(1, n // per_command))]
        began = time.perf_counter()
        procs = [subprocess.Popen(c, cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                                  stdout=subprocess.DEVNULL, stderr=open(tmp / f"w{i}.log", "w"))
                 for i, c in enumerate(commands)]
        codes = [p.wait() for p in procs]
        wall = time.perf_counter() - began
    finally:
        watch.done.set()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    trials = optuna.load_study(study_name="scale", storage=open_storage(storage)).get_trials()
    complete = Counter(point_key(t.params) for t in trials if t.state.name == "COMPLETE")
    client = MlflowClient(backend.replace("postgresql://", "postgresql+psycopg://"))
    latency = []
    for t in trials:
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id and t.datetime_start:
            start = client.get_run(run_id).info.start_time / 1000
            latency.append(start - t.datetime_start.timestamp())
    done = [t for t in trials if t.datetime_complete]
    grid = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    with psycopg.connect(ADMIN, autocommit=True) as con:
        for name in names:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return {"n": n, "points": n * points, "wall": wall, "claims_per_s": len(done) / grid,
            "latency_median": statistics.median(latency), "latency_p95": sorted(latency)[int(0.95 * (len(latency) - 1))],
            "connections": watch.most, "failed": sum(t.state.name == "FAIL" for t in trials),
            "bad_exits": sum(c != 0 for c in codes),
            "exactly_once": len(complete) == n * points and set(complete.values()) == {1}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="8,16,32", help="comma-separated N")
    ap.add_argument("--per-command", type=int, default=8, help="workers forked by one command (hydra.sweeper.workers)")
    ap.add_argument("--points-per-worker", type=int, default=3)
    ap.add_argument("--docs", action="store_true", help="also write the table into docs/performance.md")
    args = ap.parse_args()
    rows = []
    for n in (int(x) for x in args.workers.split(",")):
        with tempfile.TemporaryDirectory(prefix="gradflow-scale-") as tmp:
            rows.append(one(n, min(args.per_command, n), args.points_per_worker, Path(tmp)))
        r = rows[-1]
        print(f"N={n}: {r['wall']:.0f} s, {r['claims_per_s']:.2f} claims/s, {r['connections']} connections",
              file=sys.stderr, flush=True)
    with psycopg.connect(ADMIN) as con:
        (limit,) = con.execute("SHOW max_connections").fetchone()
    lines = [f"{args.points_per_worker} trials of 3 steps per worker; workers forked {args.per_command} per command; "
             f"MLflow server with 4 workers and the compose file's pools; PostgreSQL max_connections={limit}.", "",
             "| workers | trials | wall s | claims/s | start latency s (median, p95) | PostgreSQL connections (max) "
             "| failed trials | bad exits | every point once |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['points']} | {r['wall']:.0f} | {r['claims_per_s']:.2f} | "
                     f"{r['latency_median']:.2f}, {r['latency_p95']:.2f} | {r['connections']} | {r['failed']} | "
                     f"{r['bad_exits']} | {'yes' if r['exactly_once'] else 'NO'} |")
    print("\n".join(lines))
    if args.docs:
        perf_page.write("scale", lines)


if __name__ == "__main__":
    main()
