"""The presets: each composes and validates in one line (fast), and the slow tier re-runs a scaled-down
study per preset and checks what the seed or paper found. The slow tests use fewer steps than the presets
(`--quick`-like step counts, stated in each test) so each stays within a minute or two on 2 cores."""
from __future__ import annotations

import math

import pytest
import torch

from src.config import validate
from src.data.datasets import DataFilesMissing
from src.train import train
from tests.conftest import CONF, runs_of

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.fixture(autouse=True)
def one_thread():
    """These nets are tiny: on a busy 2-core machine a second intra-op thread only spins waiting for a
    core (the glorot_bengio test took 1323 s with torch's default threads, its 6 runs took 193 s with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
QUIET = ["trainer.enable_progress_bar=false", "tracking.plots=false"]


def test_the_documented_presets_exist():
    assert set(PRESETS) == {"circles_4x5", "moons_sigmoid_vs_relu", "mnist_40_20", "mnist_deep_sigmoid",
                            "line_fit", "glorot_bengio", "he_depth", "cures", "plain_vs_resnet", "rnn_vs_lstm",
                            "post_vs_pre_ln", "trainability", "isometry", "deep_linear", "glorot_saturation"}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_validates(preset, compose_cfg, tiny_mnist, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    extra = [f"data.path={tiny_mnist}"] if "mnist" in preset else []
    cfg = compose_cfg([f"experiment={preset}", *extra])
    assert validate.problems(cfg) == []
    assert cfg.tracking.experiment == preset


@pytest.mark.parametrize("preset", ["mnist_40_20", "mnist_deep_sigmoid"])
def test_mnist_presets_say_how_to_get_the_files_and_run_offline_on_digits(preset, compose_cfg, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    [msg] = validate.problems(compose_cfg([f"experiment={preset}", "data.path=/nonexistent/mnist"]))
    assert msg.startswith("data.path=") and "https://" in msg and "GRADFLOW_DATA_DIR" in msg and "data=digits" in msg
    cfg = compose_cfg([f"experiment={preset}", "data=digits"])
    assert validate.problems(cfg) == [] and cfg.data.name == "digits"
    assert list(cfg.model.widths) == ([40, 20] if preset == "mnist_40_20" else [1000, 750, 500])


def test_presets_carry_the_seed_facts(compose_cfg):
    c = compose_cfg(["experiment=circles_4x5"])
    assert (c.data.name, c.data.n_samples, c.data.factor, c.data.noise, c.data.batch_size) == ("circles", 1000, 0.5, 0.1, 32)
    assert (list(c.model.widths), c.init.name, c.init.std, c.optimizer.name, c.trainer.max_epochs) == (
        [5, 5, 5, 5], "normal", 1.0, "rmsprop", 100)
    m = compose_cfg(["experiment=mnist_deep_sigmoid"])
    assert (list(m.model.widths), m.activation.name, m.optimizer.lr, m.optimizer.momentum, m.data.batch_size,
            m.trainer.max_epochs) == ([1000, 750, 500], "sigmoid", 0.01, 0.99, 100, 30)
    mo = compose_cfg(["experiment=moons_sigmoid_vs_relu"])
    assert (mo.data.n_samples, mo.data.noise, mo.seed, mo.model.width, mo.optimizer.name, mo.optimizer.lr) == (
        250, 0.05, 42, 10, "adam", 0.001)
    h = compose_cfg(["experiment=he_depth"])
    assert (h.model.depth, h.activation.name) == (30, "relu")


def test_mnist_preset_without_files_fails_before_any_run(compose_cfg, tracking_uri):
    with pytest.raises((validate.ConfigError, DataFilesMissing), match="data=digits"):
        train(compose_cfg(["experiment=mnist_40_20", "data.path=/nonexistent/mnist"]))
    assert runs_of(tracking_uri)[1] == []


def _first(client, run, key):
    return next(m.value for m in client.get_metric_history(run.info.run_id, key) if m.step == 0)


@pytest.mark.slow
def test_he_depth_ratio_collapses_for_lecun_and_stays_near_one_for_he(compose_cfg, tracking_uri):
    """At init (one step each, not the preset's 450): depth-30 ReLU, width 256. The measured first/last ratio is
    within 35 % of the mean-field prediction the run logged (sqrt of the product of the 29 hidden-to-hidden
    chi1; observed within 17 % over seeds 0-2): about 2^(-29/2) ~ 4e-5 for LeCun's 1/n, 1 for He's 2/n."""
    ratios, predicted = {}, {}
    for init in ("lecun", "he"):
        train(compose_cfg(["experiment=he_depth", f"init={init}", "trainer.max_steps=1", *QUIET,
                           f"tracking.run_name={init}"]))
        client, runs = runs_of(tracking_uri, "he_depth")
        run = next(r for r in runs if r.info.run_name == init)
        ratios[init] = _first(client, run, "backprop_ratio")
        predicted[init] = math.sqrt(math.prod(run.data.metrics[f"theory/chi1/layer_{i:02d}"] for i in range(29)))
        assert abs(math.log(ratios[init] / predicted[init])) < math.log(1.35), (init, ratios, predicted)
    assert predicted["lecun"] == pytest.approx(2 ** -14.5, rel=0.2) and predicted["he"] == pytest.approx(1, rel=0.1)
    assert ratios["lecun"] < 1e-3 < 0.1 < ratios["he"]


@pytest.mark.slow
def test_glorot_bengio_orderings_scaled_down(compose_cfg, tracking_uri):
    """Scaled down from the preset (width 256, 10 epochs): the back-propagated ratio at init (1 step) for
    tanh and softsign under both inits, and 1 epoch at width 32 with the standard init for the error
    ordering. The paper's orderings: the normalized init keeps the signal more level than the standard one
    (Eq. 14), and sigmoid trains worst."""
    ratio = {}
    for act in ("tanh", "softsign"):
        for init in ("torch_default", "xavier"):
            name = f"{act}-{init}"
            train(compose_cfg(["experiment=glorot_bengio", f"activation={act}", f"init={init}",
                               "trainer.max_steps=1", *QUIET, f"tracking.run_name={name}"]))
            client, runs = runs_of(tracking_uri, "glorot_bengio")
            ratio[name] = _first(client, next(r for r in runs if r.info.run_name == name), "backprop_ratio")
    for act in ("tanh", "softsign"):
        assert ratio[f"{act}-xavier"] > ratio[f"{act}-torch_default"], ratio
    acc = {act: train(compose_cfg(["experiment=glorot_bengio", f"activation={act}", "init=torch_default",
                                   "model.width=32", "trainer.max_epochs=1", *QUIET]))["val/acc"]
           for act in ("sigmoid", "tanh", "softsign")}
    assert acc["sigmoid"] < min(acc["tanh"], acc["softsign"]), acc


@pytest.mark.slow
def test_a_cure_rescues_the_deep_sigmoid_net(compose_cfg, tracking_uri):
    """4 epochs (~180 steps; the preset runs 20): at depth 20 the plain sigmoid net stays near chance,
    batch norm lifts it well above."""
    base = train(compose_cfg(["experiment=cures", "cure=none", "trainer.max_epochs=4", *QUIET]))
    cured = train(compose_cfg(["experiment=cures", "cure=batch_norm", "trainer.max_epochs=4", *QUIET]))
    assert base["val/acc"] < 0.3, base
    assert cured["val/acc"] > base["val/acc"] + 0.3, (base, cured)


@pytest.mark.slow
def test_line_fit_ends_converged_not_vanishing(compose_cfg, tracking_uri):
    """300 steps (the preset runs 2000): the gradient has shrunk by orders of magnitude, and the verdict
    reads that as convergence, not a vanishing gradient (seed 002)."""
    out = train(compose_cfg(["experiment=line_fit", "trainer.max_steps=300", *QUIET]))
    assert out["verdict"] == "converged", out
    client, [run] = runs_of(tracking_uri, "line_fit")
    grads = [m.value for m in client.get_metric_history(run.info.run_id, "grad_norm/layer_00")]
    assert grads[-1] < grads[0] / 100 and out["train/loss"] < 0.01


@pytest.mark.slow
def test_circles_tanh_and_relu_learn_where_sigmoid_stalls(compose_cfg, tracking_uri):
    """20 epochs (500 steps; the preset runs 100, where the three reach 0.635 / 1.0 / 0.998): tanh and ReLU
    are well above the sigmoid net and not vanishing; the per-epoch view is recorded."""
    out = {a: train(compose_cfg(["experiment=circles_4x5", f"activation={a}", "trainer.max_epochs=20", *QUIET]))
           for a in ("sigmoid", "tanh", "relu")}
    assert out["sigmoid"]["val/acc"] < 0.7, out["sigmoid"]
    for a in ("tanh", "relu"):
        assert out[a]["verdict"] != "vanishing", out[a]
        assert out[a]["val/acc"] > out["sigmoid"]["val/acc"] + 0.15, out
    client, runs = runs_of(tracking_uri, "circles_4x5")
    assert all("trace/epoch_stats.csv" in {a.path for a in client.list_artifacts(r.info.run_id, "trace")} for r in runs)


@pytest.mark.slow
def test_circles_sigmoid_ends_vanishing(compose_cfg, tracking_uri):
    """20 epochs (500 steps; the preset runs 100)."""
    out = train(compose_cfg(["experiment=circles_4x5", "activation=sigmoid", "trainer.max_epochs=20", *QUIET]))
    assert out["verdict"] == "vanishing", out


@pytest.mark.slow
def test_plain_vs_resnet_scaled_down(compose_cfg, tracking_uri):
    """The preset's 6 epochs (270 steps, about 10 s a run): the plain net's signal at its first convolution is
    a vanishing fraction of its last's at step 0 and it stays at chance; the residual net's is not, and it
    learns (val/acc 0.64-0.82 over seeds 0-2)."""
    out = {m: train(compose_cfg(["experiment=plain_vs_resnet", f"model={m}", *QUIET,
                                 f"tracking.run_name={m}"])) for m in ("cnn", "resnet")}
    client, runs = runs_of(tracking_uri, "plain_vs_resnet")
    ratio = {r.info.run_name: _first(client, r, "backprop_ratio") for r in runs}
    assert ratio["cnn"] < 1e-3 < 1e-2 < ratio["resnet"], ratio
    assert out["cnn"]["verdict"] == "vanishing" and out["cnn"]["val/acc"] < 0.2, out["cnn"]
    assert out["resnet"]["val/acc"] > out["cnn"]["val/acc"] + 0.3, out


@pytest.mark.slow
def test_rnn_vs_lstm_scaled_down(compose_cfg, tracking_uri):
    """50 time steps, the preset's 2000 steps of training (it also runs 10 and 30 time steps; the LSTM's loss
    starts to fall after about 1000): at step 0 the RNN's signal through time is below float32's resolution
    and orders of magnitude below the LSTM's; the RNN does no better than the mean (val/loss near 1/6) and is
    judged vanishing; the LSTM learns."""
    out = {m: train(compose_cfg(["experiment=rnn_vs_lstm", f"model={m}", "data.seq_len=50", *QUIET,
                                 f"tracking.run_name={m}"])) for m in ("rnn", "lstm")}
    client, runs = runs_of(tracking_uri, "rnn_vs_lstm")
    ratio = {r.info.run_name: _first(client, r, "backprop_time_ratio") for r in runs}
    assert ratio["rnn"] < 1e-7 < ratio["lstm"] and ratio["rnn"] < ratio["lstm"] * 1e-3, ratio
    assert out["rnn"]["verdict"] == "vanishing" and out["rnn"]["val/loss"] > 0.12, out["rnn"]
    assert out["lstm"]["val/loss"] < 0.5 * out["rnn"]["val/loss"], out
    run = next(r for r in runs if r.info.run_name == "rnn")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "trace")} >= {"trace/time_trace.parquet"}


@pytest.mark.slow
def test_post_vs_pre_ln_scaled_down(compose_cfg, tracking_uri):
    """1 epoch, 250 steps (the preset runs 750): at step 0 Post-LN's feed-forward gradient grows toward the
    output (last block over first > 1) and falls less than Pre-LN's; at Adam 5e-3 without warm-up Post-LN
    stays near chance (1/16) while Pre-LN solves the task."""
    out = {p: train(compose_cfg(["experiment=post_vs_pre_ln", f"model.norm_position={p}", "trainer.max_epochs=1",
                                 *QUIET, f"tracking.run_name={p}"])) for p in ("post", "pre")}
    client, runs = runs_of(tracking_uri, "post_vs_pre_ln")
    growth = {}
    for r in runs:
        g = [_first(client, r, f"grad_norm/encoder.layers.{i}.linear2") for i in range(6)]
        growth[r.info.run_name] = g[-1] / g[0]
    assert growth["post"] > 1 > growth["pre"], growth
    assert out["post"]["val/acc"] < 0.2 < 0.9 < out["pre"]["val/acc"], out
