"""The sweep engine on real Optuna storages (journal file, SQLite, PostgreSQL), with a cheap objective:
override parsing, exactly-once claims under concurrency, leases, retries, resume and the report."""
from __future__ import annotations

import math
import multiprocessing as mp
import threading
import time
import uuid

import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from src.sweeps import report
from tests import sweep_worker
from tests.pg import fresh_database
from src.sweeps.leases import Outcome, Policy, beat, claim, fail_stale, finish
from src.sweeps.loop import suggest, work
from src.sweeps.space import SweepConfigError, grid_points, parse_space
from src.sweeps.storage import open_storage
from src.sweeps.study import enqueue_grid, grid_status, load_or_create, requeue_failed

FAST = Policy(max_retries=2, heartbeat_interval=0.1, grace_period=0.5, poll_interval=0.05)
ONE_RETRY = Policy(max_retries=1, heartbeat_interval=0.1, grace_period=0.5, poll_interval=0.05)


# ------------------------------------------------------------------------------------------- overrides
def test_command_line_sweeps_replace_the_configs_space_and_plain_values_fix_a_key():
    config = {"activation": "choice(sigmoid, tanh, relu)", "init": "choice(xavier, he)",
              "model.depth": "choice(2, 5, 10)", "optimizer.lr": "tag(log, interval(0.001, 1.0))"}
    space, fixed = parse_space(config, ["hparams_search=grid", "activation=sigmoid,relu",
                                              "model.depth=choice(2,4)", "optimizer.lr=0.1",
                                              "trainer.max_steps=50"])
    assert space["activation"] == CategoricalDistribution(["sigmoid", "relu"])
    assert space["init"] == CategoricalDistribution(["xavier", "he"])
    assert space["model.depth"] == CategoricalDistribution([2, 4])
    assert "optimizer.lr" not in space
    assert fixed == ["hparams_search=grid", "optimizer.lr=0.1", "trainer.max_steps=50"]
    assert len(grid_points(space)) == 8


def test_range_excludes_its_end_like_hydra_and_intervals_become_continuous():
    space, _ = parse_space({"d": "range(2, 12)", "w": "range(16, 65, 16)", "lr": "tag(log, interval(1e-3, 1))",
                                  "m": "interval(0.0, 0.9)", "k": "tag(int, interval(1, 4))"}, [])
    assert space["d"] == IntDistribution(2, 11)
    assert grid_points({"w": space["w"]}) == [{"w": 16}, {"w": 32}, {"w": 48}, {"w": 64}]
    assert space["lr"] == FloatDistribution(1e-3, 1.0, log=True)
    assert space["m"] == FloatDistribution(0.0, 0.9)
    assert space["k"] == IntDistribution(1, 4)
    with pytest.raises(SweepConfigError, match="lr: a grid needs a finite list"):
        grid_points(space)


def test_bad_storage_urls_fail_with_the_key_and_no_password(tmp_path):
    with pytest.raises(SweepConfigError, match="hydra.sweeper.storage=ftp://u:\\*\\*\\*@h/x: expected"):
        open_storage("ftp://u:secret@h/x")
    with pytest.raises(SweepConfigError) as e:
        open_storage("postgresql://u:secret@127.0.0.1:1/nope")
    assert "secret" not in str(e.value) and "cannot open the storage" in str(e.value)
    assert isinstance(open_storage(f"journal:{tmp_path}/s/j.log"), optuna.storages.JournalStorage)


# ------------------------------------------------------------------------------- claims and workers
GRID = {"a": "range(0, 4)", "b": "choice(0, 1, 2)"}  # 12 points


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["journal", "sqlite", "postgresql"])
def test_concurrent_workers_complete_every_grid_point_exactly_once(tmp_path, kind):
    """4 workers start at once on a new storage: they race to create the schema, to enqueue the grid and
    to claim each point."""
    if kind == "postgresql":
        with fresh_database() as url:
            _claims_race(url)
    else:
        _claims_race(f"journal:{tmp_path}/journal.log" if kind == "journal" else f"sqlite:///{tmp_path}/o.db")


def _claims_race(url: str) -> None:
    name = f"claims-{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("spawn")
    out, start = ctx.Queue(), ctx.Barrier(4)
    procs = [ctx.Process(target=sweep_worker.grid_worker, args=(url, name, GRID, out, start, 0.2))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    ran = [out.get(timeout=5) for _ in procs]
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    trials = study.get_trials()
    assert sum(ran) == len(trials) == 12, (ran, [t.params for t in trials])
    assert sorted((t.params["a"], t.params["b"]) for t in trials) == [(a, b) for a in range(4) for b in range(3)]
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    assert sum(r > 0 for r in ran) >= 2  # the work was shared, not done by whoever enqueued


def test_a_dead_workers_trial_is_failed_requeued_and_completed_by_another(tmp_path):
    space, _ = parse_space({"a": "choice(1, 2)"}, [])
    study = load_or_create(open_storage(f"journal:{tmp_path}/j.log"), "lease", "maximize")
    enqueue_grid(study, grid_points(space))
    dead = claim(study, grid=True)  # claimed, then its worker "dies": no more heartbeats
    suggest(dead, space)
    time.sleep(FAST.grace_period + 0.2)
    closed = []
    work(study, space, FAST, grid=True, run=lambda t, p: Outcome(value=1.0),
               on_stale=lambda t: closed.append(t.number))
    trials = study.get_trials()
    assert closed == [dead.number]
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2
    assert trials[dead.number].state == TrialState.FAIL
    assert "lease expired" in trials[dead.number].user_attrs["error"]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == trials[dead.number].params


def test_a_worker_alive_but_silent_loses_its_lease_and_its_result_is_not_counted(tmp_path):
    space, _ = parse_space({"a": "choice(1)"}, [])
    study = load_or_create(open_storage(f"journal:{tmp_path}/j.log"), "lost", "maximize")
    enqueue_grid(study, grid_points(space))
    slow = claim(study, grid=True)
    time.sleep(FAST.grace_period + 0.2)
    assert fail_stale(study, FAST) == [slow.number]
    assert not beat(study, slow._trial_id)  # the slow worker learns it lost the trial
    late = Outcome(value=1.0, error="lease lost", retry=False)
    assert finish(study, slow, late, FAST) == TrialState.FAIL  # its late result changes nothing
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.WAITING]  # one retry only


@pytest.mark.parametrize("retries,expected", [(2, [TrialState.FAIL, TrialState.COMPLETE]), (0, [TrialState.FAIL])])
def test_a_trial_that_raised_is_recorded_failed_with_its_error_and_retried_per_policy(tmp_path, retries, expected):
    space, _ = parse_space({"a": "choice(1)"}, [])
    study = load_or_create(open_storage(f"journal:{tmp_path}/j.log"), "retry", "maximize")
    enqueue_grid(study, grid_points(space))
    calls = []

    def run(trial, params):
        calls.append(trial.number)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return Outcome(value=0.5)

    policy = Policy(max_retries=retries, heartbeat_interval=0.1, grace_period=0.5, poll_interval=0.05)
    work(study, space, policy, grid=True, run=run)
    trials = study.get_trials()
    assert [t.state for t in trials] == expected
    assert trials[0].user_attrs["error"] == "RuntimeError: CUDA out of memory (simulated)"


def test_nan_objectives_are_recorded_not_retried_and_do_not_stop_the_sweep(tmp_path):
    space, _ = parse_space({"a": "choice(1, 2)"}, [])
    study = load_or_create(open_storage(f"journal:{tmp_path}/j.log"), "nan", "maximize")
    enqueue_grid(study, grid_points(space))
    work(study, space, FAST, grid=True,
               run=lambda t, p: Outcome(value=math.nan if p["a"] == 1 else 0.9))
    by_a = {t.params["a"]: t for t in study.get_trials()}
    assert len(by_a) == 2 and len(study.get_trials()) == 2
    assert by_a[1].state == TrialState.FAIL and by_a[1].user_attrs["objective"] == "nan"
    assert by_a[2].state == TrialState.COMPLETE and by_a[2].value == 0.9


def _failed_grid(url: str, name: str) -> optuna.Study:
    """A 4-point grid after one sweep (one retry): a=0 completes, a=1 fails once then completes, a=2 fails
    every time, a=3 returns NaN (never retried)."""
    space, _ = parse_space({"a": "range(0, 4)"}, [])
    study = load_or_create(open_storage(url), name, "maximize")
    enqueue_grid(study, grid_points(space))
    seen = []

    def run(trial, params):
        seen.append(params["a"])
        if params["a"] == 2 or (params["a"] == 1 and seen.count(1) == 1):
            raise RuntimeError("out of memory (simulated)")
        return Outcome(value=math.nan if params["a"] == 3 else 1.0)

    work(study, space, ONE_RETRY, grid=True, run=run)
    return study


def test_requeue_queues_only_the_points_that_failed_every_time_with_a_fresh_retry_budget(tmp_path):
    study = _failed_grid(f"journal:{tmp_path}/j.log", "requeue")
    points = [{"a": a} for a in range(4)]
    assert grid_status(study, points) == {"points": 4, "complete": 2, "pending": 0, "failed": 2,
                                                "missing": 0}
    assert sorted(p["a"] for p in requeue_failed(study, settle=0)) == [2, 3]
    assert requeue_failed(study, settle=0) == []  # already queued: asking again adds nothing
    assert grid_status(study, points)["pending"] == 2

    attempts = []

    def fails_once_more(trial, params):  # the fresh budget (max_retries=1) allows one retry per point
        attempts.append(params["a"])
        return Outcome(error="still failing") if attempts.count(params["a"]) == 1 else Outcome(value=2.0)

    space, _ = parse_space({"a": "range(0, 4)"}, [])
    work(study, space, ONE_RETRY, grid=True, run=fails_once_more)
    assert sorted(attempts) == [2, 2, 3, 3]
    assert grid_status(study, points)["complete"] == 4
    assert requeue_failed(study, settle=0) == []


def test_requeue_waits_for_a_workers_own_retry_of_a_fresh_failure(tmp_path):
    """A worker fails a trial, closes its MLflow run, then queues the retry: requeue in between must not
    queue the point a second time."""
    study = load_or_create(open_storage(f"journal:{tmp_path}/j.log"), "settle", "maximize")
    study.enqueue_trial({"a": 1})
    trial = claim(study, grid=True)
    trial.suggest_categorical("a", [1])
    study.tell(trial, state=TrialState.FAIL)
    retry = threading.Timer(1.0, lambda: study.enqueue_trial({"a": 1}))  # the worker's retry, a second later
    retry.start()
    t0 = time.monotonic()
    assert requeue_failed(study, settle=3.0) == []
    assert time.monotonic() - t0 >= 2.5
    retry.join()
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1


def test_requeue_from_several_processes_at_once_queues_each_point_once(tmp_path):
    url, name = f"journal:{tmp_path}/j.log", "requeue-race"
    _failed_grid(url, name)
    ctx = mp.get_context("spawn")
    out, start = ctx.Queue(), ctx.Barrier(3)
    procs = [ctx.Process(target=sweep_worker.requeue_worker, args=(url, name, out, start)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert sorted(out.get(timeout=5) for _ in procs) == [0, 0, 2]
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    waiting = study.get_trials(states=(TrialState.WAITING,))  # a queued trial keeps its point as fixed_params
    assert sorted(t.system_attrs["fixed_params"]["a"] for t in waiting) == [2, 3]


def test_the_requeue_command_names_what_it_queued(tmp_path, capsys, monkeypatch):
    from src.sweeps import cli, study as study_module

    monkeypatch.setattr(study_module, "SETTLE_S", 0.0)
    url = f"journal:{tmp_path}/j.log"
    _failed_grid(url, "requeue-cli")
    args = ["requeue", f"hydra.sweeper.storage={url}", "hydra.sweeper.study_name=requeue-cli"]
    assert cli.main(args) == 0
    out = capsys.readouterr()
    assert sorted(out.out.splitlines()) == ["queued again: a=2", "queued again: a=3"]
    assert "2 failed point(s) queued again; run the sweep again to run them" in out.err
    assert cli.main(args) == 0
    assert "0 failed point(s) queued again" in capsys.readouterr().err


def test_resume_runs_only_what_is_left_and_requeues_an_interrupted_point(tmp_path):
    url, space_cfg = f"journal:{tmp_path}/j.log", {"a": "range(0, 5)"}
    space, _ = parse_space(space_cfg, [])
    points = grid_points(space)
    first = []

    def interrupted(trial, params):
        if len(first) == 2:
            raise KeyboardInterrupt
        first.append(params["a"])
        return Outcome(value=1.0)

    study = load_or_create(open_storage(url), "resume", "maximize")
    assert enqueue_grid(study, points) == 5
    with pytest.raises(KeyboardInterrupt):
        work(study, space, FAST, grid=True, run=interrupted)
    assert grid_status(study, points) == {"points": 5, "complete": 2, "pending": 3, "failed": 0,
                                                "missing": 0}

    again = load_or_create(open_storage(url), "resume", "maximize")  # the same command, rerun
    assert enqueue_grid(again, points) == 0
    second = []
    work(again, space, FAST, grid=True, run=lambda t, p: second.append(p["a"]) or Outcome(value=2.0))
    assert sorted(first + second) == [0, 1, 2, 3, 4]
    assert grid_status(again, points)["complete"] == 5

    bigger, _ = parse_space({"a": "range(0, 7)"}, [])  # a wider grid adds only the new points
    assert enqueue_grid(again, grid_points(bigger)) == 2


def test_sampler_studies_stop_at_the_trial_budget_across_workers(tmp_path):
    """Two workers in turn on a budget of 6: the first runs all 6, the second finds the budget spent and runs
    none; every trial is COMPLETE with its own point in the space and the objective computed on it."""
    space, _ = parse_space({"x": "interval(-1.0, 1.0)"}, [])
    url = f"journal:{tmp_path}/j.log"
    ran = []
    for _ in range(2):
        study = load_or_create(open_storage(url), "tpe", "minimize", sampler=optuna.samplers.TPESampler(seed=0))
        ran.append(work(study, space, FAST, grid=False, n_trials=6, run=lambda t, p: Outcome(value=p["x"] ** 2)))
    assert ran == [6, 0]
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    xs = [t.params["x"] for t in trials]
    assert len(set(xs)) == 6 and all(-1.0 <= x <= 1.0 for x in xs)
    assert [t.value for t in trials] == [x ** 2 for x in xs]


# ------------------------------------------------------------------------------------------- report
def test_report_has_one_row_per_point_heatmaps_and_the_failed_attempts(tmp_path):
    study = optuna.create_study(direction="maximize", study_name="rep")
    dist = {"activation": CategoricalDistribution(["sigmoid", "relu"]), "init": CategoricalDistribution(["xavier", "he"]),
            "model.depth": CategoricalDistribution([2, 4])}
    values = {}
    for act in ("sigmoid", "relu"):
        for init in ("xavier", "he"):
            for depth in (2, 4):
                p = {"activation": act, "init": init, "model.depth": depth}
                values[(act, init, depth)] = v = (0.9 if act == "relu" else 0.5 / depth)
                if (act, init, depth) == ("relu", "he", 4):  # one point needed a retry
                    study.add_trial(optuna.create_trial(state=TrialState.FAIL, params=p, distributions=dist,
                                                        user_attrs={"error": "worker died"}))
                study.add_trial(optuna.create_trial(value=v, params=p, distributions=dist, user_attrs={
                    "verdict": "vanishing" if act == "sigmoid" else "healthy",
                    "backprop_ratio_init": 1e-6 if act == "sigmoid" else 0.8}))
    paths, text = report.write(study, tmp_path, "val/acc")
    names = {p.name for p in paths}
    assert names == {"report.csv", "report.html"}
    csv = pd.read_csv(tmp_path / "report.csv")
    assert len(csv) == 8 and set(csv["state"]) == {"COMPLETE"}
    row = csv[(csv.activation == "relu") & (csv.init == "he") & (csv["model.depth"] == 4)].iloc[0]
    assert row["attempts"] == 2 and row["verdict"] == "healthy"
    got = {(r.activation, r.init, r["model.depth"]): r["val/acc"] for _, r in csv.iterrows()}
    assert got == pytest.approx(values)
    assert "vanishing" in text and "sigmoid" in text
    assert "<table class='heat'" in (tmp_path / "report.html").read_text()


def test_the_grid_is_queued_longest_first_so_workers_finish_together(tmp_path):
    space, _ = parse_space({"activation": "choice(sigmoid, relu)", "model.depth": "choice(2, 8, 4)"}, [])
    study = load_or_create(open_storage(f"journal:{tmp_path}/j.log"), "lpt", "maximize")
    enqueue_grid(study, grid_points(space))
    order = []
    work(study, space, FAST, grid=True, run=lambda t, p: order.append(p) or Outcome(value=1.0))
    assert [p["model.depth"] for p in order] == [8, 8, 4, 4, 2, 2]
    assert [p["activation"] for p in order[:2]] == ["sigmoid", "relu"]  # grid order among equal costs
