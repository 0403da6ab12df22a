"""One training on several processes (Lightning's DDP on CPU, gloo) is one MLflow run, global rank 0's, and its
weight-gradient statistics are those of the global batch."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from src.data.datamodule import ArrayDataModule
from tests.conftest import ROOT


def test_shuffle_false_gives_the_training_batches_in_dataset_order():
    dm = ArrayDataModule("digits", 16, seed=0, shuffle=False)
    x, _ = next(iter(dm.train_dataloader()))
    assert torch.equal(x, dm.train_set.tensors[0][:16])
    shuffled, _ = next(iter(ArrayDataModule("digits", 16, seed=0).train_dataloader()))
    assert not torch.equal(shuffled, x)


@pytest.mark.slow
def test_two_process_ddp_is_one_run_with_the_global_batchs_weight_gradients(tmp_path):
    """DDP, 2 processes x 32 samples, data.shuffle=false, against one process x 64: one run each; at step 0 the
    weight gradients' statistics agree to 1e-5 relative (DDP all-reduces them before we read them)."""
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
    assert "global rank 0's shard" in ddp.data.tags["stats_scope"]
    for key in ("grad_norm/layer_00", "grad_std/layer_02", "grad_mean/layer_01", "update_ratio/layer_02", "grad_absmax/layer_01"):
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
