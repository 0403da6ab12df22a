"""WeightChangeCallback on a tiny real Trainer, against the step plain SGD must take; and the per-epoch
view drawn from a hand-made trace."""
from __future__ import annotations

import csv

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from src.analysis import plots
from src.models.mlp import build_mlp
from src.models.modules import Classifier
from src.callbacks.weight_change import WeightChangeCallback, read_weight_change


def test_one_sgd_step_changes_each_layer_by_lr_times_its_gradient(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    net = build_mlp(4, 3, widths=[6, 5], activation="tanh", init="xavier_uniform")
    w0 = [m.weight.detach().clone() for m in net.modules() if isinstance(m, nn.Linear)]
    nn.functional.cross_entropy(net(x), y).backward()
    grads = [m.weight.grad.clone() for m in net.modules() if isinstance(m, nn.Linear)]
    net.zero_grad()

    lr = 0.3
    cb = WeightChangeCallback(csv_path=tmp_path / "wc.csv")
    L.Trainer(max_steps=1, logger=False, callbacks=[cb], enable_progress_bar=False, enable_checkpointing=False,
              enable_model_summary=False, accelerator="cpu").fit(
        Classifier(net, "sgd", {"lr": lr}), DataLoader(TensorDataset(x, y), batch_size=16))

    expected = np.array([lr * g.abs().mean().item() for g in grads])
    assert cb.steps == [0]
    np.testing.assert_allclose(cb.mean_abs[0], expected, rtol=1e-4)
    np.testing.assert_allclose(cb.totals["total_over_lr"], expected / lr, rtol=1e-4)
    pct = [(100 * lr * g / w).abs().median().item() for g, w in zip(grads, w0)]
    np.testing.assert_allclose(cb.totals["pct_median"], pct, rtol=1e-3)
    path = cb.artifacts()["weight_change"]
    rows = list(csv.reader(open(path)))
    assert rows[0] == ["step", "layer_00", "layer_01", "layer_02"] and rows[1][0] == "0"
    steps, values, names = read_weight_change(path)  # what the figure is drawn from
    assert steps.tolist() == [0] and names == ["layer_00", "layer_01", "layer_02"]
    np.testing.assert_allclose(values[0], expected, rtol=1e-4)


def test_bad_cadence_fails_loudly():
    with pytest.raises(ValueError, match="every_n_steps"):
        WeightChangeCallback(every_n_steps=0)


def test_epoch_stats_take_weights_at_epoch_end_and_gradients_at_epoch_start(tmp_path):
    steps = np.arange(6)  # 3 steps per epoch, 2 layers; value = 10 * step + layer
    val = (10 * steps[:, None] + np.arange(2)[None, :]).astype(np.float32)
    trace = {"steps": steps, "layers": np.arange(2), "modules": np.array(["a", "b"], dtype=object),
             "weight_mean": val, "weight_std": val + 1, "grad_mean": -val, "grad_std": val + 2}
    csv_path, png = plots.epoch_stats(trace, 3, tmp_path / "e.csv", tmp_path / "e.png")
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 4 and png.exists()
    r = rows[3]  # epoch 1, module b: weights at step 5, gradients at step 3
    assert (r["epoch"], r["module"]) == ("1", "b")
    assert float(r["weight_mean"]) == 51 and float(r["weight_std"]) == 52
    assert float(r["grad_mean"]) == -31 and float(r["grad_std"]) == 33
