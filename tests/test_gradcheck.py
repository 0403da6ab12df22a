"""Gradient check: passes on every registry activation, fails on a wrong backward, skips kinks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from src import gradcheck as gradcheck_cli
from src.analysis import gradcheck
from src.models import registry
from src.data.datamodule import ArrayDataModule
from src.models.mlp import build_mlp

INIT_FOR = {"relu": "kaiming_normal", "leaky_relu": "kaiming_normal", "selu": "lecun_normal"}


@pytest.fixture(scope="module")
def digits_batch():
    x, y = ArrayDataModule("digits", 32, seed=0).train_set.tensors
    return x[:16], y[:16]


@pytest.mark.parametrize("activation", sorted(registry.ACTIVATIONS))
def test_passes_for_every_activation(activation, digits_batch):
    torch.manual_seed(0)
    net = build_mlp(64, 10, widths=[24, 24, 24], activation=activation, init=INIT_FOR.get(activation, "xavier_uniform"))
    rows = gradcheck.check(net, *digits_batch, samples=15)
    assert len(rows) == 8 and all(r.checked + r.skipped == min(15, r_numel) for r, r_numel in
                                  zip(rows, [64 * 24, 24, 24 * 24, 24, 24 * 24, 24, 24 * 10, 10]))
    worst = max(r.max_rel_error for r in rows)
    assert worst <= 1e-6, gradcheck.table(rows, 1e-6)
    assert all(r.max_abs_grad > 0 for r in rows)


class WrongSigmoid(torch.autograd.Function):
    """sigmoid with a backward 10% too large: the kind of bug a gradient check exists for."""

    @staticmethod
    def forward(ctx, s):
        p = torch.sigmoid(s)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        return g * p * (1 - p) * 1.1


class WrongAct(nn.Module):
    def forward(self, s):
        return WrongSigmoid.apply(s)


def test_fails_on_a_wrong_backward(digits_batch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 16), WrongAct(), nn.Linear(16, 10))
    rows = gradcheck.check(net, *digits_batch, samples=10)
    by = {(r.module, r.param): r.max_rel_error for r in rows}
    assert by[("0", "weight")] > 1e-2 and by[("0", "bias")] > 1e-2  # the layer below the bad backward: wrong
    assert by[("2", "weight")] < 1e-6  # the layer above it is untouched
    assert gradcheck.exit_code(rows, 1e-6) == 1
    # torch's own gradcheck agrees on both counts
    x, y = digits_batch
    entries = torch.arange(5)
    assert not gradcheck.torch_check(net, x, y, 0, entries)
    torch.manual_seed(0)
    good = nn.Sequential(nn.Linear(64, 16), nn.Sigmoid(), nn.Linear(16, 10))
    assert gradcheck.torch_check(good, x, y, 0, entries)
    assert gradcheck.exit_code(gradcheck.check(good, x, y, samples=10), 1e-6) == 0


def test_entries_whose_perturbation_crosses_a_relu_kink_are_skipped():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
        net[0].bias.zero_()
    x = torch.tensor([[0.0, 0.0], [1.0, 0.5]])  # unit 0 of sample 0 sits exactly at s=0 for every weight
    rows = gradcheck.check(net, x, torch.tensor([0, 1]), samples=10)
    first = [r for r in rows if r.module == "0"]
    assert sum(r.skipped for r in first) >= 1
    assert max(r.max_rel_error for r in rows) <= 1e-6
    assert registry.ACTIVATIONS["relu"].kinked and not registry.ACTIVATIONS["tanh"].kinked


def test_cli_passes_on_a_configured_model_and_rejects_bad_config(capsys):
    assert gradcheck_cli.main(["activation=tanh", "model.depth=3", "model.width=16", "gradcheck.samples=5"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 10 and "PASS: max relative error" in out  # header + 8 rows + summary
    assert gradcheck_cli.main(["model.depth=0"]) == 2
    assert "model.depth=0: must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("overrides", [["model=lstm", "data=adding", "data.seq_len=5", "model.width=4"],
                                       ["model=transformer", "data=recall", "data.seq_len=4", "model.depth=1",
                                        "model.width=8", "model.heads=2"],
                                       ["model=cnn", "model.depth=2", "model.channels=3", "activation=tanh"]])
def test_cli_checks_every_parameter_of_any_model(overrides, capsys):
    """Each recorded module's every parameter (weights and biases), by module path; the loss of the task."""
    assert gradcheck_cli.main([*overrides, "gradcheck.samples=4", "gradcheck.batch=4"]) == 0
    out = capsys.readouterr().out
    assert "PASS: max relative error" in out
    rows = [line.split()[:2] for line in out.splitlines()[1:-1]]
    expected = {"model=lstm": {("rnn_00", "weight_ih_l0"), ("rnn_00", "weight_hh_l0"), ("rnn_00", "bias_hh_l0"),
                               ("head", "weight")},
                "model=transformer": {("encoder.layers.0.self_attn", "in_proj_weight"), ("embed", "weight"),
                                      ("encoder.layers.0.self_attn.out_proj", "weight"), ("pos", "weight")},
                "model=cnn": {("conv_00", "weight"), ("conv_01", "bias"), ("head", "weight")}}[overrides[0]]
    assert expected <= {tuple(r) for r in rows}, rows
