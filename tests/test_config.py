"""Tier (a): every option of every config group composes, validates, and builds what it names, through the
same config edge (src.config.build) as training."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from src.config import build, validate
from src.models import registry
from src.models.mlp import build_mlp
from tests.conftest import CONF

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
IN_DIM = {"digits": 64, "moons": 2, "circles": 2, "line": 1, "mnist": 784, "fashion_mnist": 784, "adding": 2,
          "recall": 16}
# a data option whose samples are sequences or tokens composes with a model that takes them
MODEL_FOR = {"adding": "model=lstm", "recall": "model=transformer"}


def check_model(cfg, net, n_classes: int) -> None:
    """The network is what its model option names: its blocks, sizes and activations."""
    kind = registry.ACTIVATIONS[cfg.activation.name].make
    acts = [m for m in net.modules() if type(m) in registry.ACTIVATION_BY_TYPE]
    target = cfg.model._target_.rsplit(".", 1)[1]
    if target == "build_mlp":  # one Linear per hidden width and a head, each hidden one followed by the activation
        hidden = list(cfg.model.widths) if cfg.model.widths is not None else [cfg.model.width] * cfg.model.depth
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        assert [m.out_features for m in linears[:-1]] == hidden and linears[-1].out_features == n_classes
        acts = acts[:len(hidden)]
        assert len(acts) == len(hidden)
    elif target == "build_cnn":
        convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == cfg.model.depth and {c.out_channels for c in convs} == {cfg.model.channels}
        assert len(acts) == cfg.model.depth and net.residual == cfg.model.residual
    elif target == "build_recurrent":
        cell = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cfg.model.cell]
        layers = [m for m in net.modules() if isinstance(m, nn.RNNBase)]
        assert len(layers) == cfg.model.depth and all(type(m) is cell and m.hidden_size == cfg.model.width
                                                      for m in layers)
        if cfg.model.cell == "rnn":
            assert {m.nonlinearity for m in layers} == {cfg.activation.name}
        if cfg.model.cell == "lstm":  # the forget gates' bias, b_ih's slice (b_hh's is 0)
            w = cfg.model.width
            assert all(torch.all(m.bias_ih_l0[w:2 * w] + m.bias_hh_l0[w:2 * w] == cfg.model.forget_bias) for m in layers)
        acts = []
    elif target == "build_transformer":
        blocks = [m for m in net.modules() if isinstance(m, nn.TransformerEncoderLayer)]
        assert len(blocks) == cfg.model.depth and all(b.norm_first == (cfg.model.norm_position == "pre") for b in blocks)
        assert all(b.linear1.in_features == cfg.model.width for b in blocks) and len(acts) == cfg.model.depth
    else:
        raise AssertionError(f"no check for {target}")
    assert all(type(m) is kind for m in acts)
    for key, value in build.option(cfg.activation)[1].items():
        assert all(getattr(m, key) == value for m in acts), key


def test_groups_are_the_documented_ones():
    assert {"activation", "init", "data", "optimizer", "model", "trainer", "stats", "callbacks",
            "tracking"} <= set(GROUPS)
    names = {g: {o for gg, o in OPTIONS if gg == g} for g in GROUPS}
    assert {"sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "gelu", "softsign", "identity"} <= names["activation"]
    assert {"xavier", "xavier_normal", "he", "he_uniform", "lecun", "normal", "small_normal",
            "torch_default", "orthogonal"} <= names["init"]
    assert {"sgd", "momentum", "rmsprop", "adam"} <= names["optimizer"]
    assert {"digits", "moons", "circles", "mnist", "fashion_mnist"} <= names["data"]
    assert {"default", "off"} <= names["stats"]
    assert {"default", "weight_change"} <= names["callbacks"]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_builds_what_it_names(group, option, compose_cfg, tiny_mnist):
    extra = [f"data.path={tiny_mnist}"] if "mnist" in option else []  # data=mnist*, experiment=mnist_*
    extra += [MODEL_FOR[option]] if group == "data" and option in MODEL_FOR else []
    extra += ["activation=tanh"] if option.startswith("critical") else []  # the default sigmoid has no critical line
    cfg = compose_cfg([f"{group}={option}", *extra])
    validate.check(cfg)
    data = build.data_module(cfg)
    net = build.network(cfg, data)
    module = build.lightning_module(cfg, net, data)
    # the data: its input size, and one output per class (or target)
    assert data.in_dim == IN_DIM[cfg.data.name]
    x, _ = next(iter(data.train_dataloader()))
    assert module(x).shape == (len(x), data.n_classes)
    check_model(cfg, net, data.n_classes)
    # the optimizer: the registry's class, with every configured argument
    opt = module.configure_optimizers()
    name, params = build.option(cfg.optimizer)
    assert type(opt) is registry.OPTIMIZERS[name]
    assert {k: opt.defaults[k] for k in params} == pytest.approx(params)
    # the callbacks: one per node that is not null, of the class its _target_ names
    built = build.callbacks(cfg)
    targets = [node._target_ for node in cfg.callbacks.values() if node is not None]
    assert [f"{type(c).__module__}.{type(c).__qualname__}" for c in built] == targets


def test_stats_off_and_the_weight_change_variant_change_only_their_callbacks(compose_cfg):
    names = lambda overrides: [type(c).__name__ for c in build.callbacks(compose_cfg(overrides))]  # noqa: E731
    assert names([]) == ["GradientStatsCallback", "HistogramCallback", "StopOnNonFiniteLoss"]
    assert names(["stats=off"]) == ["StopOnNonFiniteLoss"]
    assert names(["callbacks=weight_change"]) == names([]) + ["WeightChangeCallback"]
    assert names(["callbacks.nonfinite_guard=null", "callbacks.histograms=null"]) == ["GradientStatsCallback"]
    cb = build.callbacks(compose_cfg(["stats.every_n_steps=5", "stats.log_every_n_steps=10",
                                      "stats.saturation_threshold=0.1", "stats.histogram_every_n_steps=7"]))
    assert (cb[0].every_n_steps, cb[0].log_every_n_steps, cb[0].threshold, cb[1].every_n_steps) == (5, 10, 0.1, 7)


def test_a_callback_that_refuses_its_arguments_is_a_config_error(compose_cfg):
    with pytest.raises(validate.ConfigError, match=r"callbacks.gradient_stats: stats.log_every_n_steps \(10\) must "
                                                   r"be a multiple of stats.every_n_steps \(3\)"):
        build.callbacks(compose_cfg(["stats.every_n_steps=3", "stats.log_every_n_steps=10"]))


def test_per_layer_snapshots_have_their_own_cadence_and_presets_keep_the_seeds(compose_cfg):
    """By default MLflow gets train/* every 10 steps and the per-layer snapshot every 50; the experiment
    presets log the per-layer statistics at their trainer cadence, as the seeds were read."""
    cfg = compose_cfg([])
    assert (cfg.trainer.log_every_n_steps, cfg.stats.log_every_n_steps) == (10, 50)
    assert compose_cfg(["stats=off"]).stats.log_every_n_steps == 50
    for preset, every in (("circles_4x5", 25), ("moons_sigmoid_vs_relu", 7), ("cures", 10)):
        cfg = compose_cfg([f"experiment={preset}"])
        assert cfg.stats.log_every_n_steps == cfg.trainer.log_every_n_steps == every, preset
    assert compose_cfg(["trainer.log_every_n_steps=3"]).stats.log_every_n_steps == 50


@pytest.mark.parametrize("kind,fn", [("activation", registry.activation), ("init", registry.init_fn)])
def test_registry_fails_loudly_listing_valid_names(kind, fn):
    with pytest.raises(registry.UnknownNameError, match=rf"unknown {kind} 'swish'; valid: .*tanh|unknown {kind} 'swish'; valid: .*normal"):
        fn("swish")


@pytest.mark.parametrize("name", sorted(registry.ACTIVATIONS))
def test_registry_derivatives_match_autograd(name):
    s = torch.linspace(-6, 6, 241, dtype=torch.float64, requires_grad=True)
    module = registry.activation(name)
    (g,) = torch.autograd.grad(module(s).sum(), s)
    entry = registry.ACTIVATIONS[name]
    torch.testing.assert_close(entry.derivative(s.detach()), g, atol=1e-3, rtol=1e-3)
    assert g.max().item() <= entry.max_derivative + 1e-3


@pytest.mark.parametrize("init,expected_var", [
    ("xavier", 2 / (400 + 300)), ("xavier_normal", 2 / (400 + 300)), ("he", 2 / 400), ("he_uniform", 2 / 400),
    ("lecun", 1 / 400), ("normal", 1.0), ("small_normal", 1e-4), ("torch_default", 1 / (3 * 400)),
    ("orthogonal", 1 / 400),
])
def test_init_variances(init, expected_var, compose_cfg):
    cfg = compose_cfg([f"init={init}"])
    torch.manual_seed(0)
    net = build_mlp(400, 10, widths=[300], activation="relu", init=cfg.init.name,
                    init_params={k: v for k, v in cfg.init.items() if k != "name"})
    var = net.layer_00.weight.var().item()
    assert var == pytest.approx(expected_var, rel=0.05)
