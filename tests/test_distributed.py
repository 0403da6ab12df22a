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


@pytest.mark.slow
def test_two_process_ddp_is_one_run_with_the_global_batchs_statistics(tmp_path):
    """DDP, 2 processes x 32 samples, data.shuffle=false, against one process x 64: one run each; at step 0 every
    family agrees to 1e-5 relative (weight gradients all-reduced by DDP, activations and signal by us)."""
    uri = f"sqlite:///{tmp_path}/m.db"
    for name, extra in (("ddp", ["trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=32"]),
                        ("single", ["trainer.devices=1", "data.batch_size=64"])):
        done = subprocess.run(
            [sys.executable, "-m", "src.train", "trainer.accelerator=cpu", *extra, "data.shuffle=false",
             "trainer.max_steps=3", "model.depth=3", "trainer.enable_progress_bar=false", f"tracking.run_name={name}",
             f"hydra.run.dir={tmp_path}/{name}"],
            cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs(["1"])}
    assert sorted(runs) == ["ddp", "single"]  # not one run per process
    ddp = runs["ddp"]
    assert ddp.info.status == "FINISHED" and ddp.data.tags["verdict"] and ddp.data.tags["devices"] == "2"
    assert "act_* and backprop_* reduced across the processes" in ddp.data.tags["stats_scope"]
    for key in ("grad_norm/layer_00", "grad_std/layer_02", "grad_mean/layer_01", "update_ratio/layer_02",
                "grad_absmax/layer_01", "act_mean/layer_00", "act_std/layer_01", "act_saturation/layer_01",
                "backprop_norm/layer_00", "backprop_norm/layer_03", "backprop_ratio"):
        a, b = (client.get_metric_history(runs[n].info.run_id, key)[0] for n in ("ddp", "single"))
        assert a.step == b.step == 0 and a.value == pytest.approx(b.value, rel=1e-5), key
    assert not list((tmp_path / "ddp").glob("**/mlruns"))
    assert sorted(p.name for p in (tmp_path / "ddp").glob("*.parquet")) == ["histograms.parquet", "trace.parquet"]


def test_a_sharded_strategy_is_refused_while_statistics_are_on():
    """FSDP needs a GPU to be built at all, so the rule is checked on the strategy's class name."""
    from types import SimpleNamespace

    from src.callbacks.gradient_stats import GradientStatsCallback
    from src.tracking.ranks import refuse_sharded

    FSDPStrategy = type("FSDPStrategy", (), {})
    trainer = SimpleNamespace(strategy=FSDPStrategy())
    assert "do not support sharded weights (FSDPStrategy)" in refuse_sharded(trainer, [GradientStatsCallback()])
    assert refuse_sharded(trainer, []) is None  # stats=off: nothing to get wrong
    assert refuse_sharded(SimpleNamespace(strategy=type("DDPStrategy", (), {})()), [GradientStatsCallback()]) is None
