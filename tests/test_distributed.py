"""One training on several processes (Lightning's DDP on CPU, gloo) is one MLflow run, global rank 0's, and its
statistics are those of the global batch: the weight gradients because DDP all-reduces them, the activations and
the signal because the callback reduces them across ranks."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from src.data.datamodule import ArrayDataModule
from src.models.registry import ACTIVATIONS
from src.stats import across_ranks
from src.stats import reductions as stats
from src.stats.names import LAYER_STATS, is_module_key
from tests.conftest import ROOT


def test_shuffle_false_gives_the_training_batches_in_dataset_order():
    dm = ArrayDataModule("digits", 16, seed=0, shuffle=False)
    x, _ = next(iter(dm.train_dataloader()))
    assert torch.equal(x, dm.train_set.tensors[0][:16])
    shuffled, _ = next(iter(ArrayDataModule("digits", 16, seed=0).train_dataloader()))
    assert not torch.equal(shuffled, x)


def _shard_stats(pre, name, rows):
    """Activation statistics and entry counts of pre-activations [steps, layers, rows, width], as a recorder
    computes them."""
    entry = ACTIVATIONS[name]
    act = stats.stacked_activation_stats(pre, entry.make(), entry.derivative, entry.max_derivative, 0.05)
    return act, torch.full(act.shape[:-1], float(rows * pre.shape[-1]), dtype=torch.float64)


@pytest.mark.parametrize("name", ["sigmoid", "relu", "tanh"])
def test_shards_combine_into_the_whole_batchs_activation_statistics(name):
    """Unequal shards (20 + 9 + 3 rows) of saturating pre-activations: the combined mean, std and saturated
    fraction are those of the 32 rows at once; a module without activation (count 0, NaN) stays NaN."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(3, 2, 32, 16, generator=g) * 5 + 2  # steps x layers x rows x width, mean far from 0
    whole, _ = _shard_stats(pre, name, 32)
    shards = []
    for a, b in ((0, 20), (20, 29), (29, 32)):
        act, count = _shard_stats(pre[:, :, a:b], name, b - a)
        act, count = torch.cat([act, torch.full_like(act[:, :1], float("nan"))], 1), torch.cat([count, count[:, :1] * 0], 1)
        shards.append(across_ranks.shard_columns(torch.zeros(3, 3), act, count))
    _, got = across_ranks.combine(torch.stack(shards))
    assert 0 < whole[..., 2].mean() < 1  # some saturated entries, not all: the fraction is tested
    torch.testing.assert_close(got[:, :2], whole, rtol=1e-5, atol=1e-7)
    assert got[:, 2].isnan().all()


def test_shard_signals_combine_into_the_whole_batchs_signal():
    """DDP descends the mean of the ranks' losses: with a mean loss over each shard, sum_r ||dL_r/ds||^2 / W^2
    is ||dL/ds||^2 of the whole batch's mean loss."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))

    def signal_sq(xs, ys):
        s = net[0](xs)
        s.retain_grad()
        torch.nn.functional.cross_entropy(net[2](net[1](s)), ys).backward()
        return s.grad.double().square().sum()

    whole = signal_sq(x, y)
    parts = torch.stack([signal_sq(x[r::2], y[r::2]) for r in range(2)])
    cols = torch.stack([across_ranks.shard_columns(p.reshape(1, 1), torch.full((1, 1, 3), float("nan")),
                                                   torch.zeros(1, 1)) for p in parts])
    got, _ = across_ranks.combine(cols)
    assert got.item() == pytest.approx(whole.item(), rel=1e-10)
    assert parts[0].item() != pytest.approx(whole.item(), rel=0.1)  # one shard alone is not it


COMMON = ["trainer.accelerator=cpu", "data.shuffle=false", "trainer.max_steps=3", "model.depth=3", "init=xavier",
          "trainer.enable_progress_bar=false"]
# activations on both paths of the callback: sigmoid (the compiled kernel), gelu (buffered, recomputed at flush)
ACTS = ("sigmoid", "gelu")


def _train(uri, *args, multirun=False):
    done = subprocess.run([sys.executable, "-m", "src.train", *["-m"] * multirun, *COMMON, *args], cwd=ROOT, timeout=900,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def three_ways(tmp_path_factory):
    """The same two trainings (sigmoid, gelu) three ways, each a multirun in its own experiment: one process x 64
    samples, DDP on 2 processes x 32 (the jobs one after another in one process, each starting its own second
    rank), and a sweep whose trials each run DDP on 2 processes."""
    tmp = tmp_path_factory.mktemp("ddp")
    uri = f"sqlite:///{tmp}/m.db"
    _train(uri, f"activation={','.join(ACTS)}", "trainer.devices=1", "data.batch_size=64",
           "tracking.experiment=single", f"hydra.sweep.dir={tmp}/single", multirun=True)
    _train(uri, f"activation={','.join(ACTS)}", "trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=32",
           "tracking.experiment=ddp", f"hydra.sweep.dir={tmp}/ddp", multirun=True)
    _train(uri, "hparams_search=grid", f"activation={','.join(ACTS)}", "model.depth=3", "trainer.devices=2",
           "trainer.strategy=ddp", "data.batch_size=32", "tracking.experiment=sweep",
           f"hydra.sweeper.storage=journal:{tmp}/optuna.journal", f"hydra.sweep.dir={tmp}/sweep", multirun=True)
    return tmp, MlflowClient(uri)


def _runs(client, experiment: str) -> dict:
    """The experiment's training runs (not a multirun's or a study's parent) by activation."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    trained = [r for r in runs if "activation" in r.data.params]
    assert len(runs) - len(trained) <= 1  # the parent, if any: no run per process
    return {r.data.params["activation"]: r for r in trained}


def _same_step0(client, run, reference) -> None:
    """Every per-module key and backprop_ratio at step 0 equal to 1e-5 relative (1e-8 absolute for a mean near 0)."""
    keys = [k for k in reference.data.metrics if is_module_key(k) and k.split("/")[0] in LAYER_STATS]
    assert {k for k in run.data.metrics if is_module_key(k)} >= set(keys) and len(keys) >= 3 * len(LAYER_STATS) - 3
    for key in keys + ["backprop_ratio"]:
        a, b = (client.get_metric_history(r.info.run_id, key)[0] for r in (run, reference))
        assert a.step == b.step == 0 and a.value == pytest.approx(b.value, rel=1e-5, abs=1e-8), key


@pytest.mark.slow
def test_two_process_ddp_is_one_run_with_the_global_batchs_statistics(three_ways):
    """One run per training, FINISHED with a verdict; at step 0 every family equals the single process's on the
    same 64 samples (weight gradients all-reduced by DDP, activations and signal reduced by us)."""
    tmp, client = three_ways
    single, ddp = _runs(client, "single"), _runs(client, "ddp")
    assert sorted(ddp) == sorted(ACTS)
    for act, run in ddp.items():
        assert run.info.status == "FINISHED" and run.data.tags["verdict"] and run.data.tags["devices"] == "2"
        assert "act_* and backprop_* reduced across the processes" in run.data.tags["stats_scope"]
        _same_step0(client, run, single[act])
    assert not list((tmp / "ddp").glob("**/mlruns"))
    for job in ("0", "1"):
        assert sorted(p.name for p in (tmp / "ddp" / job).glob("*.parquet")) == ["histograms.parquet", "trace.parquet"]


@pytest.mark.slow
def test_a_sweep_trial_on_two_processes_is_one_run_with_the_global_batchs_statistics(three_ways):
    """Each trial of the study trains on 2 processes: one child run per trial, FINISHED, with a verdict and the
    single process's statistics; the second rank ran that trial's overrides alone, in the trial's folder."""
    tmp, client = three_ways
    single, trials = _runs(client, "single"), _runs(client, "sweep")
    assert sorted(trials) == sorted(ACTS)
    for act, run in trials.items():
        assert run.info.status == "FINISHED" and run.data.tags["verdict"] and run.data.tags["devices"] == "2", act
        _same_step0(client, run, single[act])
    for trial in ("trial_0", "trial_1"):
        assert (tmp / "sweep" / trial / "train_ddp_process_1.log").exists()
        assert len(list((tmp / "sweep" / trial).glob("trace.parquet"))) == 1
    assert not list(tmp.glob("sweep/*/*/multirun.yaml"))  # the second rank started no sweep of its own


@pytest.mark.slow
def test_a_strategy_that_starts_its_processes_inside_fit_is_refused_before_any_run(tmp_path):
    """ddp_spawn trains in processes the run never sees (before: an MLflow run, then a pickling error)."""
    uri = f"sqlite:///{tmp_path}/m.db"
    done = subprocess.run([sys.executable, "-m", "src.train", "trainer.accelerator=cpu", "trainer.devices=2",
                           "trainer.strategy=ddp_spawn", "trainer.max_steps=2", f"hydra.run.dir={tmp_path}/run"],
                          cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "processes started by spawn from inside fit cannot be tracked as one run" in done.stderr
    assert "trainer.strategy=ddp" in done.stderr
    assert not MlflowClient(uri).search_runs(["0", "1"])


def test_a_sharded_strategy_is_refused_while_statistics_are_on():
    """FSDP needs a GPU to be built at all, so the rule is checked on the strategy's class name."""
    from types import SimpleNamespace

    from src.callbacks.gradient_stats import GradientStatsCallback
    from src.tracking.ranks import refused as refuse_sharded

    FSDPStrategy = type("FSDPStrategy", (), {})
    trainer = SimpleNamespace(strategy=FSDPStrategy())
    assert "do not support sharded weights (FSDPStrategy)" in refuse_sharded(trainer, [GradientStatsCallback()])
    assert refuse_sharded(trainer, []) is None  # stats=off: nothing to get wrong
    assert refuse_sharded(SimpleNamespace(strategy=type("DDPStrategy", (), {})()), [GradientStatsCallback()]) is None


def test_gpus_per_trial_gives_each_worker_its_own_group_of_gpus_and_each_trial_as_many_devices():
    from types import SimpleNamespace

    from src.sweeps.space import SweepConfigError
    from src.sweeps.worker import gpu_slots, trial_devices

    assert gpu_slots(["0", "1", "2", "3", "4"], 2) == ["0,1", "2,3"]  # GPU 4 left idle: no group of 2
    assert gpu_slots(["0", "1"], 1) == ["0", "1"] and gpu_slots([], 1) == []
    sw = SimpleNamespace(gpus=[0, 1, 2, 3], gpus_per_trial=2)
    assert trial_devices(sw, ["activation=relu"]) == ["activation=relu", "trainer.devices=2"]
    assert trial_devices(sw, ["trainer.devices=2"]) == ["trainer.devices=2"]
    with pytest.raises(SweepConfigError, match="gpus_per_trial=2 but trainer.devices=4"):
        trial_devices(sw, ["trainer.devices=4"])
    with pytest.raises(SweepConfigError, match=r"needs at least 2 GPUs listed in hydra.sweeper.gpus \(got none\)"):
        trial_devices(SimpleNamespace(gpus=None, gpus_per_trial=2), [])
    assert trial_devices(SimpleNamespace(gpus=None, gpus_per_trial=1), ["x=1"]) == ["x=1"]
