"""The Jacobian spectrum at initialisation (src/analysis/jacobian.py): exact on nets whose answer is known, and
logged by a real run when stats.jacobian is on."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from src.analysis import jacobian, theory
from src.models.mlp import build_mlp
from src.train import train
from tests.conftest import runs_of


def test_a_deep_linear_orthogonal_net_is_an_exact_isometry():
    torch.manual_seed(0)
    net = build_mlp(16, 3, activation="identity", init="orthogonal", depth=12, width=32)
    sv = jacobian.singular_values(net, torch.randn(8, 16))
    assert sv.shape == (8, 32) and np.allclose(sv, 1.0, atol=1e-5)
    assert jacobian.metrics(sv)["jacobian/mean_sq_sv"] == pytest.approx(1.0, abs=1e-5)


def test_the_mean_squared_singular_value_is_the_product_of_the_predicted_chi1():
    """Wide tanh net, Gaussian weights sigma_w^2 = 1.5: E[sigma^2] of dh_L/dh_1 = prod over blocks 2..L of chi1."""
    for seed in range(3):
        torch.manual_seed(seed)
        net = build_mlp(64, 10, activation="tanh", init="scaled_normal", init_params={"weight_var": 1.5}, depth=6,
                        width=256)
        x = torch.randn(256, 64)
        chi = theory.predict(net, x, "tanh").chi1
        got = jacobian.metrics(jacobian.singular_values(net, x))["jacobian/mean_sq_sv"]
        assert got == pytest.approx(math.prod(chi[1:]), rel=0.15), (seed, got, chi)


def test_models_it_does_not_describe_say_why():
    assert "MLPs" in jacobian.not_applicable(torch.nn.Linear(3, 3))
    assert "2 hidden layers" in jacobian.not_applicable(build_mlp(4, 2, activation="tanh", init="kaiming_normal", depth=1, width=4))


def test_a_run_logs_the_spectrum_at_step_0(compose_cfg, tracking_uri):
    train(compose_cfg(["stats.jacobian=true", "activation=tanh", "init=critical_orthogonal", "model.depth=4",
                       "trainer.max_steps=2", "trainer.enable_progress_bar=false"]))
    client, (run,) = runs_of(tracking_uri)
    history = client.get_metric_history(run.info.run_id, "jacobian/mean_sq_sv")
    assert [m.step for m in history] == [0] and 0 < history[0].value <= 1.5
    assert run.data.metrics["jacobian/max_sv"] >= math.sqrt(history[0].value)
    (csv,) = [f.path for f in client.list_artifacts(run.info.run_id, "jacobian")]
    rows = np.loadtxt(client.download_artifacts(run.info.run_id, csv), delimiter=",", skiprows=1)
    assert rows.shape == (jacobian.N_INPUTS, 64)


def test_a_recurrent_run_with_the_jacobian_on_is_tagged_not_applicable(compose_cfg, tracking_uri):
    train(compose_cfg(["stats.jacobian=true", "model=rnn", "data=adding", "trainer.max_steps=1",
                       "trainer.enable_progress_bar=false"]))
    client, (run,) = runs_of(tracking_uri)
    assert run.data.tags["jacobian"].startswith("not applicable: the Jacobian spectrum is computed for MLPs")
    assert "jacobian/mean_sq_sv" not in run.data.metrics
