"""The Jacobian spectrum at initialisation (src/analysis/jacobian.py): exact on nets whose answer is known, and
logged by a real run when stats.jacobian is on."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from src.analysis import jacobian, theory
from src.models.mlp import build_mlp
from src.train import train
from tests.conftest import runs_of


@pytest.fixture(autouse=True)
def one_thread():
    """Small matrices: one thread is the fastest, and two fighting a busy CI box's cores are 20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_deep_linear_orthogonal_net_is_an_exact_isometry():
    torch.manual_seed(0)
    net = build_mlp(16, 3, activation="identity", init="orthogonal", depth=12, width=32)
    sv = jacobian.singular_values(net, torch.randn(8, 16))
    assert sv.shape == (8, 32) and np.allclose(sv, 1.0, atol=1e-5)  # float32 weights: orthogonal to ~1e-7 each
    assert jacobian.metrics(sv)["jacobian/mean_sq_sv"] == pytest.approx(1.0, abs=1e-5)
    net.double()
    for i in range(net.depth):
        torch.nn.init.orthogonal_(getattr(net, f"layer_{i:02d}").weight)  # orthogonal in float64
    sv = jacobian.singular_values(net, torch.randn(8, 16))
    assert sv.dtype == np.float64 and np.abs(sv - 1).max() < 1e-6
    assert jacobian.spread(sv) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("init,params", [("lecun_normal", {}), ("scaled_normal", {"weight_var": 1.5})])
def test_the_mean_squared_singular_value_is_the_product_of_the_predicted_chi1(init, params):
    """Wide tanh net, Gaussian weights (sigma_w^2 = 1: LeCun, and 1.5): E[sigma^2] of dh_L/dh_1 = the product over
    blocks 2..L of sigma_w^2 E[f'(s_l)^2]. theory.predict's chi1[l] pairs block l's f' with the next Linear's
    sigma_w^2 (W_{l+1}, the head's for the last), so with one sigma_w^2 everywhere that product is chi1[1:]."""
    for seed in range(3):
        torch.manual_seed(seed)
        net = build_mlp(64, 10, activation="tanh", init=init, init_params=params, depth=6, width=256)
        x = torch.randn(256, 64)
        chi = theory.predict(net, x, "tanh").chi1
        assert len(chi) == 6  # blocks 1..6; 2..6 are chi[1:]
        got = jacobian.metrics(jacobian.singular_values(net, x))["jacobian/mean_sq_sv"]
        assert got == pytest.approx(math.prod(chi[1:]), rel=0.1), (seed, got, chi)


def test_orthogonal_tanh_near_criticality_spreads_less_than_gaussian_tanh():
    """Pennington et al. 2017: at sigma_w^2 = 1 (tanh, no bias) orthogonal weights keep the spectrum together (max
    sigma / rms sigma 1.75-1.77 seen) where Gaussian weights of the same variance do not (6.3-8.2), depth 16."""
    for seed in range(3):
        ratio = {}
        for init, params in (("orthogonal", {"gain": 1.0}), ("lecun_normal", {})):
            torch.manual_seed(seed)
            net = build_mlp(64, 10, activation="tanh", init=init, init_params=params, depth=16, width=128)
            m = jacobian.metrics(jacobian.singular_values(net, torch.randn(64, 64)))
            ratio[init] = m["jacobian/max_sv"] / math.sqrt(m["jacobian/mean_sq_sv"])
        assert ratio["orthogonal"] < 2.2 and 2.5 * ratio["orthogonal"] < ratio["lecun_normal"], (seed, ratio)


def test_residual_and_norm_blocks_are_differentiated_as_the_net_runs_them():
    """A residual LayerNorm MLP: J from jacrev equals the product of finite differences through MLP.forward's
    own blocks (the head left out), and the net is left in the mode it was in."""
    torch.manual_seed(0)
    net = build_mlp(5, 2, activation="tanh", init="lecun_normal", depth=4, width=6, norm="layer", residual=True)
    x = torch.randn(3, 5)
    sv = jacobian.singular_values(net, x)
    assert net.training and sv.shape == (3, 6)
    net64 = copy.deepcopy(net).double().eval()
    h1 = jacobian._block(net64, 0, x.double())
    upper = lambda h: jacobian._block(net64, 3, jacobian._block(net64, 2, jacobian._block(net64, 1, h)))  # noqa: E731
    eps = 1e-6
    for k in range(3):
        basis = torch.eye(6, dtype=torch.float64)
        cols = [(upper(h1[k] + eps * e) - upper(h1[k] - eps * e)) / (2 * eps) for e in basis]
        want = torch.linalg.svdvals(torch.stack(cols, dim=1)).detach().numpy()
        np.testing.assert_allclose(sv[k], want, rtol=1e-6, atol=1e-8)


def test_the_histogram_the_figure_and_the_report_section(tmp_path):
    from src.analysis.verdict import Verdict
    from src.report import run as report
    from tests.test_report import HISTORY, page_data

    sv = np.exp(np.random.default_rng(0).normal(0, 1, (4, 16)))
    edges, frac = jacobian.histogram(sv)
    assert len(edges) == jacobian.BINS + 1 and frac.sum() == pytest.approx(1.0)
    assert edges[0] == pytest.approx(np.log10(sv.min())) and edges[-1] == pytest.approx(np.log10(sv.max()))
    assert jacobian.histogram(np.ones((2, 3)))[1].sum() == pytest.approx(1.0)  # an exact isometry: one bin
    assert jacobian.histogram(np.zeros((2, 3)))[1].sum() == pytest.approx(1.0)  # every sigma 0: no error
    assert math.isnan(jacobian.spread(np.zeros(3)))

    class Run:  # what jacobian.record uses of a TrackedRun
        def __init__(self):
            self.writer, self.metrics, self.tags, self.files = self, [], {}, []

        def log_metrics(self, m, step):
            self.metrics.append((m, step))

        def set_tags(self, tags):
            self.tags |= tags

        def log_artifact(self, path, folder):
            self.files.append((Path(path).relative_to(tmp_path).as_posix(), folder))

    got = Run()
    jacobian.record(got, sv, None, tmp_path, True, "t")
    assert got.metrics == [(jacobian.metrics(sv), 0)] and got.tags == {}
    assert got.files == [("jacobian/spectrum.csv", "jacobian"), ("plots/jacobian_spectrum.png", "plots")]
    assert (tmp_path / "plots" / "jacobian_spectrum.png").read_bytes()[:4] == b"\x89PNG"
    got = Run()
    jacobian.record(got, None, "why", tmp_path, True, "t")
    assert got.tags == {"jacobian": "not applicable: why"} and not got.metrics and not got.files

    page = report.write(tmp_path / "report.html", "t", Verdict("healthy", "ok", None), {}, None, HISTORY, jacobian=sv)
    assert "Jacobian spectrum at initialisation" in page.read_text()
    (chart,) = [c for c in page_data(page)["charts"] if c["into"] == "jacobian"]
    assert chart["xlabel"] == "log10 σ" and len(chart["x"]) == jacobian.BINS
    assert "Jacobian spectrum" not in report.write(tmp_path / "none.html", "t", Verdict("healthy", "ok", None), {},
                                                   None, HISTORY).read_text()


def test_models_it_does_not_describe_say_why():
    assert "MLPs" in jacobian.not_applicable(torch.nn.Linear(3, 3))
    shallow = build_mlp(4, 2, activation="tanh", init="kaiming_normal", depth=1, width=4)
    assert "2 hidden layers" in jacobian.not_applicable(shallow)
    assert jacobian.at_init(True, shallow, torch.randn(2, 4)) == (None, jacobian.not_applicable(shallow))
    assert jacobian.at_init(False, shallow, torch.randn(2, 4)) == (None, None)


def test_a_run_logs_the_spectrum_at_step_0(compose_cfg, tracking_uri):
    train(compose_cfg(["stats.jacobian=true", "activation=tanh", "init=critical_orthogonal", "model.depth=4",
                       "trainer.max_steps=2", "trainer.enable_progress_bar=false"]))
    client, (run,) = runs_of(tracking_uri)
    history = client.get_metric_history(run.info.run_id, "jacobian/mean_sq_sv")
    assert [m.step for m in history] == [0] and 0 < history[0].value <= 1.5
    assert run.data.metrics["jacobian/max_sv"] >= math.sqrt(history[0].value)
    (csv,) = [f.path for f in client.list_artifacts(run.info.run_id, "jacobian")]
    rows = np.loadtxt(client.download_artifacts(run.info.run_id, csv), delimiter=",", skiprows=1)
    assert rows.shape == (jacobian.N_INPUTS, 64) and (np.diff(rows, axis=1) <= 0).all()  # largest first
    assert rows.max() == pytest.approx(run.data.metrics["jacobian/max_sv"], rel=1e-5)
    html = Path(client.download_artifacts(run.info.run_id, "report.html")).read_text()
    assert "Jacobian spectrum at initialisation" in html


def test_a_recurrent_run_with_the_jacobian_on_is_tagged_not_applicable(compose_cfg, tracking_uri):
    train(compose_cfg(["stats.jacobian=true", "model=rnn", "data=adding", "trainer.max_steps=1",
                       "trainer.enable_progress_bar=false"]))
    client, (run,) = runs_of(tracking_uri)
    assert run.data.tags["jacobian"].startswith("not applicable: the Jacobian spectrum is computed for MLPs")
    assert "jacobian/mean_sq_sv" not in run.data.metrics
