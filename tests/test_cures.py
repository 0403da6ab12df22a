"""The cures as model options: where norm layers and skips go, that the statistics still mean what the
README says with them in the net (checked against autograd), that clipping composes and acts, and that bad
values are named before any run exists."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from src.config import validate
from src.callbacks.gradient_stats import GradientStatsCallback
from src.models.mlp import build_mlp
from src.models.modules import Classifier
from src.stats.names import LAYER_STATS
from src.stats.trace import read_trace


def test_norm_sits_between_linear_and_activation():
    net = build_mlp(3, 2, widths=[4, 4], activation="sigmoid", init="xavier_uniform", norm="batch")
    kinds = [(name, type(m).__name__) for name, m in net.named_children()]
    assert kinds == [("layer_00", "Linear"), ("norm_00", "BatchNorm1d"), ("act_00", "Sigmoid"), ("layer_01", "Linear"),
                     ("norm_01", "BatchNorm1d"), ("act_01", "Sigmoid"), ("layer_02", "Linear")]
    net = build_mlp(3, 2, widths=[4], activation="tanh", init="xavier_uniform", norm="layer")
    assert [type(m).__name__ for m in net.children()] == ["Linear", "LayerNorm", "Tanh", "Linear"]


def test_residual_only_where_widths_match():
    net = build_mlp(3, 2, widths=[4, 4, 6, 6], activation="relu", init="kaiming_normal", residual=True)
    assert net.residual == [False, True, False, True]  # 4->4 and 6->6; 3->4 and 4->6 change width: no skip
    assert sum(isinstance(m, nn.Linear) for m in net.modules()) == 5
    x = torch.randn(7, 3)
    h0 = net.act_00(net.layer_00(x))
    h1 = h0 + net.act_01(net.layer_01(h0))
    h2 = net.act_02(net.layer_02(h1))
    h3 = h2 + net.act_03(net.layer_03(h2))
    torch.testing.assert_close(net(x), net.layer_04(h3))


def test_no_hidden_layer_and_head_activation():
    net = build_mlp(1, 1, widths=[], activation="identity", init="constant", head_activation="tanh")
    assert [type(m).__name__ for m in net.children()] == ["Linear", "Tanh"]
    assert net.layer_00.weight.item() == 0.5
    assert torch.all(net(torch.randn(5, 1)).abs() < 1)


def test_unknown_norm_fails_listing_valid():
    with pytest.raises(ValueError, match="none, batch, layer"):
        build_mlp(3, 2, widths=[4], activation="relu", init="kaiming_normal", norm="group")


@pytest.mark.parametrize("norm,residual", [("batch", False), ("layer", True), ("none", True)])
def test_statistics_with_norm_and_residual_match_autograd(norm, residual, tmp_path):
    """The Linear layers keep their names and meaning (input first): backprop_norm is ||dL/ds|| at each
    Linear's output (before the norm). The norms are recorded too, after their Linear; the activation follows
    the norm, so act_* sit on the norm's row, fed by its output."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    net = build_mlp(5, 3, widths=[8, 8, 8], activation="tanh", init="xavier_uniform", norm=norm, residual=residual)
    # the same forward and backward by hand: keep each Linear's output and each activation's input
    outs, act_in = [], []
    def keep_out(m, i, o):  # a forward hook that returns None leaves the output alone
        o.retain_grad()
        outs.append(o)

    def keep_in(m, i, o):
        act_in.append(i[0].detach())

    hooks = [m.register_forward_hook(keep_out) for m in net.modules() if isinstance(m, nn.Linear)]
    hooks += [m.register_forward_hook(keep_in) for m in net.modules() if isinstance(m, nn.Tanh)]
    net.train()
    nn.functional.cross_entropy(net(x), y).backward()
    for h in hooks:
        h.remove()
    expected_bp = torch.stack([o.grad.norm() for o in outs])
    expected_sat = torch.stack([((1 - torch.tanh(a) ** 2) < 0.05).float().mean() for a in act_in])
    net.zero_grad()

    module = Classifier(net, "sgd", {"lr": 0.0})  # lr 0: the step changes nothing, step 0 is the state above
    cb = GradientStatsCallback(trace_path=tmp_path / "t.parquet")
    trainer = L.Trainer(max_steps=1, logger=False, callbacks=[cb], enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
    t = read_trace(tmp_path / "t.parquet")
    linear = [j for j, k in enumerate(t["kinds"]) if k == "linear"]
    assert [t["modules"][j] for j in linear] == ["layer_00", "layer_01", "layer_02", "layer_03"]
    torch.testing.assert_close(torch.from_numpy(t["backprop_norm"][0, linear]), expected_bp.float(), rtol=1e-4, atol=1e-7)
    # the activation follows the last recorded module before it: the norm when there is one
    act_rows = [j for j, m in enumerate(t["modules"]) if m in (("norm_00", "norm_01", "norm_02") if norm != "none"
                                                               else ("layer_00", "layer_01", "layer_02"))]
    torch.testing.assert_close(torch.from_numpy(t["act_saturation"][0, act_rows]), expected_sat, rtol=0, atol=1e-6)
    assert cb.act_rows == set(act_rows)
    assert set(LAYER_STATS) <= set(t)


def _fit_one_step(net, clip):
    torch.manual_seed(0)
    x, y = torch.randn(32, 5) * 10, torch.randint(0, 3, (32,))
    before = [p.detach().clone() for p in net.parameters()]
    L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
              enable_model_summary=False, accelerator="cpu", gradient_clip_val=clip).fit(
        Classifier(net, "sgd", {"lr": 1.0}), DataLoader(TensorDataset(x, y), batch_size=32))
    return torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(net.parameters(), before)))


def test_gradient_clipping_bounds_the_step():
    step = _fit_one_step(build_mlp(5, 3, widths=[8, 8], activation="relu", init="kaiming_normal"), None)
    clipped = _fit_one_step(build_mlp(5, 3, widths=[8, 8], activation="relu", init="kaiming_normal"), 1e-3)
    assert step > 1e-2 and clipped <= 1e-3 * 1.001  # SGD lr 1: the step is the (clipped) gradient


@pytest.mark.parametrize("override,key,hint", [
    ("model.norm=group", "model.norm", "none, batch, layer"),
    ("model.residual=maybe", "model.residual", "true or false"),
    ("model.head_activation=swish", "model.head_activation", "null or one of"),
    ("model.widths=[8,-1]", "model.widths", "list of integers"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val", "number >= 0"),
    ("trainer.gradient_clip_algorithm=max", "trainer.gradient_clip_algorithm", "norm or value"),
])
def test_bad_cure_values_are_named(override, key, hint, compose_cfg, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    found = validate.problems(compose_cfg([override]))
    assert len(found) == 1, found
    assert found[0].startswith(f"{key}=") and hint in found[0]


def test_batch_norm_needs_batches_of_two(compose_cfg, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    [msg] = validate.problems(compose_cfg(["model.norm=batch", "data.batch_size=1"]))
    assert msg.startswith("data.batch_size=1") and "model.norm=batch" in msg


@pytest.mark.parametrize("cure", ["none", "batch_norm", "layer_norm", "residual", "clip", "relu_he"])
def test_each_cure_composes_and_validates(cure, compose_cfg, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_cfg([f"cure={cure}"])
    assert validate.problems(cfg) == []
    changed = {"batch_norm": cfg.model.norm == "batch", "layer_norm": cfg.model.norm == "layer",
               "residual": cfg.model.residual is True, "clip": cfg.trainer.gradient_clip_val == 1.0,
               "relu_he": (cfg.activation.name, cfg.init.name) == ("relu", "kaiming_normal"),
               "none": (cfg.model.norm, cfg.model.residual, cfg.trainer.gradient_clip_val) == ("none", False, None)}
    assert changed[cure]
