"""Tier (a): every option of every config group composes, and what it names can be built."""
from __future__ import annotations

import pytest
import torch

from src import registry
from src.callback import GradientStatsCallback
from src.data import ArrayDataModule
from src.model import Classifier, build_mlp
from tests.conftest import CONF

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]


def test_groups_are_the_documented_ones():
    assert {"activation", "init", "data", "optimizer", "model", "trainer", "stats", "tracking"} <= set(GROUPS)
    names = {g: {o for gg, o in OPTIONS if gg == g} for g in GROUPS}
    assert {"sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "gelu", "softsign", "identity"} <= names["activation"]
    assert {"xavier", "xavier_normal", "he", "he_uniform", "lecun", "normal", "small_normal",
            "torch_default", "orthogonal"} <= names["init"]
    assert {"sgd", "momentum", "rmsprop", "adam"} <= names["optimizer"]
    assert {"digits", "moons", "circles", "mnist", "fashion_mnist"} <= names["data"]
    assert {"default", "off"} <= names["stats"]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(group, option, compose_cfg, tiny_mnist):
    extra = [f"data.path={tiny_mnist}"] if "mnist" in option else []  # data=mnist*, experiment=mnist_*
    cfg = compose_cfg([f"{group}={option}", *extra])
    data = ArrayDataModule(**{k: v for k, v in cfg.data.items()}, seed=cfg.seed)
    net = build_mlp(data.in_dim, data.n_classes, [cfg.model.width] * cfg.model.depth,
                    cfg.activation.name, cfg.init.name,
                    {k: v for k, v in cfg.activation.items() if k != "name"},
                    {k: v for k, v in cfg.init.items() if k != "name"})
    module = Classifier(net, cfg.optimizer.name, {k: v for k, v in cfg.optimizer.items() if k != "name"})
    assert isinstance(module.configure_optimizers(), torch.optim.Optimizer)
    x, y = next(iter(data.train_dataloader()))
    assert module(x).shape == (len(x), data.n_classes)
    GradientStatsCallback(cfg.stats.every_n_steps, cfg.stats.log_every_n_steps, cfg.stats.saturation_threshold)


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
    net = build_mlp(400, 10, [300], "relu", cfg.init.name, None,
                    {k: v for k, v in cfg.init.items() if k != "name"})
    var = net[0].weight.var().item()
    assert var == pytest.approx(expected_var, rel=0.05)
