"""The cluster path: CPUs counted as the job owns them; Redis and gRPC-proxy storages; SLURM job arrays;
elections that leave no study behind; twelve workers on PostgreSQL; sweeps whose every trial failed."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.skipif(shutil.which("taskset") is None or (os.cpu_count() or 1) < 2, reason="needs taskset, 2+ CPUs")
def test_trial_threads_follow_the_affinity_mask_not_the_node():
    code = ("from types import SimpleNamespace as S; from src.sweeps.trial import threads, usable_cpus; "
            "import os; print(os.cpu_count(), usable_cpus(), threads(S(torch_threads=None, workers=1)))")
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    assert int(out[0]) >= 2 and out[1:] == ["1", "1"]  # the node has more; the job owns one


REDIS = os.environ.get("GRADFLOW_TEST_REDIS", "redis://127.0.0.1:6379/15")  # a database of its own: flushed


def _redis_or_skip():
    redis = pytest.importorskip("redis", reason="the redis extra: pip install -e '.[redis]'")
    try:
        client = redis.Redis.from_url(REDIS, socket_connect_timeout=2)
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip(f"no Redis answers at {REDIS} ($GRADFLOW_TEST_REDIS)")
    return client


@pytest.mark.slow
def test_two_workers_share_a_study_on_redis(tmp_path):
    import optuna
    from optuna.trial import TrialState

    from src.sweeps.space import point_key
    from src.sweeps.storage import open_storage

    client = _redis_or_skip()
    client.flushdb()
    try:
        args = [sys.executable, "-m", "src.train", "-m", "hparams_search=grid", "activation=sigmoid,relu",
                "init=xavier,he", "model.depth=1", "trainer.max_epochs=1", "+trainer.limit_train_batches=4",
                "+trainer.limit_val_batches=2", "model.width=16", f"hydra.sweeper.storage={REDIS}",
                "hydra.sweeper.study_name=redis", f"hydra.sweep.dir={tmp_path / 'sweeps'}"]
        env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db")
        workers = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True) for _ in range(2)]
        for w in workers:
            assert w.wait(600) == 0, w.stderr.read()[-3000:]
        trials = optuna.load_study(study_name="redis", storage=open_storage(REDIS)).get_trials()
        complete = [point_key(t.params) for t in trials if t.state == TrialState.COMPLETE]
        assert len(complete) == 4 and len(set(complete)) == 4, [(t.state, t.params) for t in trials]
    finally:
        client.flushdb()


def test_a_redis_storage_without_the_package_says_which_extra(monkeypatch):
    import builtins

    from src.sweeps.space import SweepConfigError
    from src.sweeps.storage import open_storage

    real = builtins.__import__

    def no_redis(name, *args, **kwargs):  # the package absent, as in an install without the extra
        if name == "redis" or name.startswith("redis."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_redis)
    with pytest.raises(SweepConfigError, match=r"needs the redis package: pip install -e '\.\[redis\]'"):
        open_storage("redis://127.0.0.1:6379/15")


@pytest.mark.slow
def test_a_sweep_whose_every_trial_failed_exits_1_with_the_first_reason(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "src.train", "-m", "hparams_search=grid", "activation=sigmoid,relu", "init=he",
         "model.depth=1", "trainer.max_steps=2", "optimized_metric=val/nope", f"hydra.sweep.dir={tmp_path}/s",
         f"hydra.sweeper.storage=journal:{tmp_path}/o.journal"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "sweep failed: every trial of study 'gradflow-grid' failed; the first, trial 0 (activation=sigmoid" \
           in done.stderr and "optimized_metric=val/nope is not among the run's metrics" in done.stderr


@pytest.mark.slow
def test_slurm_submission_is_one_job_array_and_returns_at_once(tmp_path):
    """No SLURM here: an `sbatch` on PATH that records what it is given and answers as sbatch does, to check
    what we hand to SLURM (one array of N tasks) and that the command returns once it is queued."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\ncat "$1" >> {tmp_path}/scripts\n'
                                 'echo "Submitted batch job 4242"\n')
    (bin_ / "srun").write_text("#!/bin/sh\nexit 1\n")  # how submitit recognises a SLURM machine; never run here
    for tool in ("sbatch", "srun"):
        (bin_ / tool).chmod(0o755)
    done = subprocess.run([sys.executable, "-m", "src.sweeps", "submit", "--workers", "3", "--slurm-partition", "gpu",
                           "hparams_search=grid", f"hydra.sweep.dir={tmp_path}/s"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert len((tmp_path / "calls").read_text().splitlines()) == 1  # one sbatch for the three workers
    script = (tmp_path / "scripts").read_text()
    assert "#SBATCH --array=0-2" in script and "#SBATCH --partition=gpu" in script
    assert "['4242_0', '4242_1', '4242_2']" in done.stderr and "squeue --me" in done.stderr


def _elect(storage_url: str, out) -> None:
    import optuna

    from src.sweeps.storage import open_storage
    from src.sweeps.study import elected

    study = optuna.load_study(study_name="s", storage=open_storage(storage_url))
    with elected(study, "grid-x") as won:
        out.put(won)


def test_one_of_many_wins_an_election_and_no_marker_study_is_left(tmp_path):
    import multiprocessing as mp

    import optuna

    from src.sweeps.storage import open_storage

    url = f"journal:{tmp_path}/o.journal"
    optuna.create_study(study_name="s", storage=open_storage(url))
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_elect, args=(url, out)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(out.get(timeout=5) for _ in procs) == [False] * 5 + [True]
    _elect(url, out)  # a late caller, after the marker is gone, loses too
    assert out.get(timeout=5) is False
    assert optuna.get_all_study_names(open_storage(url)) == ["s"]  # what optuna-dashboard lists


@pytest.mark.slow
def test_twelve_workers_on_postgresql_run_every_point_once(tmp_path, mlflow_server):
    import optuna
    from collections import Counter

    from src.sweeps.space import point_key
    from src.sweeps.storage import open_storage
    from tests.pg import fresh_database

    with fresh_database("gradflow_twelve") as storage:
        args = [sys.executable, "-m", "src.train", "-m", "hparams_search=grid", "activation=relu", "init=he",
                "model.depth=1", "model.width=8", "seed=range(0,24)", "trainer.max_steps=2",
                "+trainer.limit_val_batches=1", "hydra.sweeper.workers=6", "hydra.sweeper.torch_threads=1",
                f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=twelve", f"hydra.sweep.dir={tmp_path}/s"]
        env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
        commands = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True) for _ in range(2)]  # 2 machines x 6 workers
        for c in commands:
            assert c.wait(600) == 0, c.stderr.read()[-3000:]
        trials = optuna.load_study(study_name="twelve", storage=open_storage(storage)).get_trials()
    complete = Counter(point_key(t.params) for t in trials if t.state.name == "COMPLETE")
    assert len(complete) == 24 and set(complete.values()) == {1}, [(t.number, t.state, t.params) for t in trials]
    from src.sweeps.leases import WORKER

    assert len(trials) == 24 and len({t.system_attrs[WORKER] for t in trials}) > 2  # shared out among workers


def test_a_worker_waits_for_the_proxy_then_says_none_answered(monkeypatch):
    pytest.importorskip("grpc", reason="the grpc extra: pip install -e '.[grpc]'")
    import src.sweeps.storage as storage
    from src.sweeps.space import SweepConfigError
    from tests.conftest import free_port

    monkeypatch.setattr(storage, "PROXY_WAIT_S", 1)
    with pytest.raises(SweepConfigError, match=r"no storage proxy answered in 1 s \(start one with: python -m src"):
        storage.open_storage(f"grpc://127.0.0.1:{free_port()}")


@pytest.mark.slow
def test_workers_through_the_grpc_proxy_run_every_point_once(tmp_path):
    import optuna
    from collections import Counter

    pytest.importorskip("grpc", reason="the grpc extra: pip install -e '.[grpc]'")
    from src.sweeps.space import point_key
    from src.sweeps.storage import open_storage
    from tests.conftest import free_port
    from tests.pg import fresh_database

    with fresh_database("gradflow_proxy") as database:
        port = free_port()
        proxy = subprocess.Popen([sys.executable, "-m", "src.sweeps", "proxy", "--port", str(port)], cwd=ROOT,
                                 env={**os.environ, "GRADFLOW_SWEEP_STORAGE": database}, start_new_session=True,
                                 stderr=subprocess.PIPE, text=True)
        try:
            args = [sys.executable, "-m", "src.train", "-m", "hparams_search=grid", "activation=relu", "init=he",
                    "model.depth=1", "model.width=8", "seed=range(0,8)", "trainer.max_steps=2",
                    "+trainer.limit_val_batches=1", "hydra.sweeper.workers=2", f"hydra.sweeper.storage=grpc://127.0.0.1:{port}",
                    "hydra.sweeper.study_name=proxied", f"hydra.sweep.dir={tmp_path}/s"]
            env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
            commands = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         text=True) for _ in range(2)]
            for c in commands:
                assert c.wait(600) == 0, c.stderr.read()[-3000:]
        finally:
            os.killpg(proxy.pid, signal.SIGTERM)
            proxy.wait(30)
        trials = optuna.load_study(study_name="proxied", storage=open_storage(database)).get_trials()
    complete = Counter(point_key(t.params) for t in trials if t.state.name == "COMPLETE")
    assert len(complete) == 8 and set(complete.values()) == {1}, [(t.number, t.state, t.params) for t in trials]
