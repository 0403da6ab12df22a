"""Tier (c): the callback on a tiny real Trainer: exact keys, and values equal to a hand-written
back-propagation of a 2-layer sigmoid net (numpy chain rule, no autograd)."""
from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from src.callbacks import activations, recorders
from src.stats import fused
from src.callbacks.gradient_stats import GradientStatsCallback
from src.models.registry import ACTIVATION_BY_TYPE, ACTIVATIONS
from src.stats.names import LAYER_STATS
from src.stats.trace import read_trace
from tests import reference_stats as ref


class ListLogger(Logger):
    """A real Lightning logger that keeps what it is given."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[int, dict]] = []

    name, version = "list", "0"

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class TwoLayer(L.LightningModule):
    """Any user module: s1 = W1 x + b1, a = sigmoid(s1), s2 = W2 a + b2, loss = mean (s2 - y)^2."""

    def __init__(self, lr=0.5):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(2, 2), nn.Sigmoid(), nn.Linear(2, 1)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[0.5, -1.0], [2.0, 0.25]]))
            self.fc1.bias.copy_(torch.tensor([0.1, -0.2]))
            self.fc2.weight.copy_(torch.tensor([[1.5, -0.5]]))
            self.fc2.bias.copy_(torch.tensor([0.3]))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.fc2(self.act(self.fc1(x))) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


X = np.array([[1.0, 2.0], [-1.0, 0.5], [3.0, -2.0]])
Y = np.array([[1.0], [0.0], [2.0]])


def hand_backprop(X=X):
    W1, b1 = np.array([[0.5, -1.0], [2.0, 0.25]]), np.array([0.1, -0.2])
    W2, b2 = np.array([[1.5, -0.5]]), np.array([0.3])
    s1 = X @ W1.T + b1
    a = 1 / (1 + np.exp(-s1))
    s2 = a @ W2.T + b2
    d2 = 2 * (s2 - Y) / len(X)            # dL/ds2
    dW2 = d2.T @ a
    d1 = (d2 @ W2) * a * (1 - a)          # dL/ds1
    with np.errstate(invalid="ignore"):  # 0 * inf = NaN, on purpose in the poisoned-input test
        dW1 = d1.T @ X
    return dict(W1=W1, W2=W2, a=a, s1=s1, d1=d1, d2=d2, dW1=dW1, dW2=dW2)


def fit(tmp_path, batch_size=3, x=X, **trainer_kwargs):
    data = DataLoader(TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32)),
                      batch_size=batch_size)
    logger = ListLogger()
    cb = GradientStatsCallback(every_n_steps=1, log_every_n_steps=1, trace_path=tmp_path / "t.parquet")
    trainer = L.Trainer(max_steps=1, logger=logger, callbacks=[cb], enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
                        **trainer_kwargs)
    trainer.fit(TwoLayer(), data)
    return logger, cb


def stats_records(logger: ListLogger) -> list[tuple[int, dict]]:
    """The logger's records that carry per-module statistics."""
    return [(s, m) for s, m in logger.records if any(k.startswith("grad_norm/") for k in m)]


def test_exact_keys_and_hand_computed_values(tmp_path):
    """Keys name each module by its path in the LightningModule (fc1, fc2)."""
    logger, cb = fit(tmp_path)
    [(step, m)] = stats_records(logger)
    assert step == 0
    expected = {f"{s}/{k}" for s in LAYER_STATS for k in ("fc1", "fc2") if not (s.startswith("act_") and k == "fc2")}
    assert set(m) == expected  # two Linear layers: no backprop_ratio (needs two hidden layers)
    trace = read_trace(cb.trace_path)
    assert trace["modules"].tolist() == ["fc1", "fc2"] and trace["kinds"].tolist() == ["linear", "linear"]

    h, lr = hand_backprop(), 0.5
    for k, (dW, d, W) in zip(("fc1", "fc2"), ((h["dW1"], h["d1"], h["W1"]), (h["dW2"], h["d2"], h["W2"]))):
        assert m[f"grad_norm/{k}"] == pytest.approx(np.linalg.norm(dW), rel=1e-5)
        assert m[f"grad_mean/{k}"] == pytest.approx(dW.mean(), rel=1e-5, abs=1e-7)
        assert m[f"grad_std/{k}"] == pytest.approx(dW.std(), rel=1e-5)
        assert m[f"grad_absmax/{k}"] == pytest.approx(np.abs(dW).max(), rel=1e-5)
        assert m[f"grad_zero_frac/{k}"] == 0.0
        assert m[f"grad_nonfinite/{k}"] == 0.0
        assert m[f"backprop_norm/{k}"] == pytest.approx(np.linalg.norm(d), rel=1e-5)
        new = W - lr * dW
        assert m[f"weight_mean/{k}"] == pytest.approx(new.mean(), rel=1e-5)
        assert m[f"weight_std/{k}"] == pytest.approx(new.std(), rel=1e-5)
        assert m[f"update_ratio/{k}"] == pytest.approx(lr * np.linalg.norm(dW) / np.linalg.norm(new), rel=1e-5)
    a = h["a"]
    assert m["act_mean/fc1"] == pytest.approx(a.mean(), rel=1e-5)
    assert m["act_std/fc1"] == pytest.approx(a.std(), rel=1e-5)
    sat = (a * (1 - a) < 0.05 * 0.25).mean()
    assert m["act_saturation/fc1"] == pytest.approx(sat)


def test_gradient_accumulation_reports_the_optimizer_step(tmp_path):
    """Three micro-batches of one sample, accumulated: the same step as one batch of three (the loss is a
    mean, Lightning divides each micro-batch's loss by 3), so every gradient statistic must match."""
    logger, _ = fit(tmp_path, batch_size=1, accumulate_grad_batches=3)
    [(_, m)] = stats_records(logger)
    h = hand_backprop()
    for k, (dW, d) in zip(("fc1", "fc2"), ((h["dW1"], h["d1"]), (h["dW2"], h["d2"]))):
        assert m[f"grad_norm/{k}"] == pytest.approx(np.linalg.norm(dW), rel=1e-5)
        assert m[f"backprop_norm/{k}"] == pytest.approx(np.linalg.norm(d), rel=1e-5)


def use_path(monkeypatch, path: str) -> None:
    """Make the callback take one of its three ways to compute the gradient and weight statistics."""
    if path == "fused":
        assert fused.library() is not None, "the fused kernel did not build (CI has a C compiler)"
    else:
        monkeypatch.setattr(fused, "library", lambda: None)
    if path == "per_tensor":
        monkeypatch.setattr(recorders, "STACK_MAX_NUMEL", 0)


@pytest.mark.parametrize("path", ["fused", "stacked", "per_tensor"])
def test_non_finite_gradients_are_counted_not_dropped(tmp_path, monkeypatch, path):
    """One poisoned input x[0, 0] = inf: s1's first row is +inf, sigmoid'(inf) = 0 stops the signal there,
    and dW1 = d1^T x has 0 * inf = NaN in its first column: exactly 2 NaN entries, no exact zero among the
    other two, and the second layer's gradient finite; all as the hand-written back-propagation says."""
    use_path(monkeypatch, path)
    x = X.copy()
    x[0, 0] = np.inf
    logger, cb = fit(tmp_path, x=x)
    assert cb.params.name == path
    [(_, m)] = stats_records(logger)
    h = hand_backprop(x)
    assert np.isnan(h["dW1"]).sum() == 2 and np.isfinite(h["dW2"]).all()  # the hand computation agrees
    assert m["grad_nonfinite/fc1"] == 2
    assert np.isnan(m["grad_norm/fc1"])
    assert m["grad_zero_frac/fc1"] == 0.0
    assert m["grad_nonfinite/fc2"] == 0 and m["grad_zero_frac/fc2"] == 0.0
    assert m["grad_norm/fc2"] == pytest.approx(np.linalg.norm(h["dW2"]), rel=1e-5)
    assert m["grad_mean/fc2"] == pytest.approx(h["dW2"].mean(), rel=1e-5)
    assert m["grad_absmax/fc2"] == pytest.approx(np.abs(h["dW2"]).max(), rel=1e-5)
    assert m["backprop_norm/fc1"] == pytest.approx(np.linalg.norm(h["d1"]), rel=1e-5)  # finite: row 0 is 0
    assert m["act_mean/fc1"] == pytest.approx(h["a"].mean(), rel=1e-5)
    assert read_trace(cb.trace_path)["grad_nonfinite"][0].tolist() == [2.0, 0.0]


def test_trace_holds_every_recorded_step(tmp_path):
    _, cb = fit(tmp_path)
    trace = read_trace(cb.trace_path)
    assert trace["steps"].tolist() == [0]
    assert trace["grad_norm"].shape == (1, 2)
    assert trace["backprop_norm"][0, 0] == pytest.approx(np.linalg.norm(hand_backprop()["d1"]), rel=1e-5)


def test_validates_its_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        GradientStatsCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="multiple"):
        GradientStatsCallback(every_n_steps=3, log_every_n_steps=10)
    with pytest.raises(ValueError, match="saturation_threshold"):
        GradientStatsCallback(saturation_threshold=2.0)


def test_fails_loudly_when_nothing_is_left_to_record(tmp_path):
    """A model whose parameters are all frozen, or a selection that matches nothing, is an error naming it."""
    frozen = TwoLayer().requires_grad_(False)
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        accelerator="cpu")
    with pytest.raises(ValueError, match="GradientStatsCallback found no module with trainable parameters in TwoLayer"):
        GradientStatsCallback().setup(trainer, frozen, "fit")
    with pytest.raises(ValueError, match=r"no module of TwoLayer matches stats.include=\['conv'\]; its modules "
                                         r"with trainable parameters: fc1, fc2"):
        GradientStatsCallback(include=["conv"]).setup(trainer, TwoLayer(), "fit")


class PlainStats(L.Callback):
    """The reference: every statistic of every layer at every step, one tensor at a time with the textbook
    formulas of tests/reference_stats.py, from its own hooks (no buffering, no batching), on CPU copies of
    whatever device the model trains on."""

    def __init__(self):
        self.rows: dict[int, np.ndarray] = {}

    def setup(self, trainer, pl_module, stage):
        self.linears = [m for m in pl_module.modules() if isinstance(m, nn.Linear)]
        self.entry = {}
        for i, lin in enumerate(self.linears):
            lin.register_forward_hook(self._keep(i))
        for m in pl_module.modules():
            if type(m) in ACTIVATION_BY_TYPE:
                m.register_forward_hook(self._keep_act)

    def _keep(self, i):
        def hook(module, inputs, out):
            if module.training:
                self.last = i
                out.register_hook(lambda g: self.signal.__setitem__(i, g.detach().cpu()))
        return hook

    def _keep_act(self, module, inputs, out):
        if module.training:
            self.acts[self.last] = (out.detach().cpu(), inputs[0].detach().cpu(), ACTIVATION_BY_TYPE[type(module)])

    def on_train_batch_start(self, *args):
        self.signal, self.acts = {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        w = [lin.weight for lin in self.linears]
        self.grads = [x.grad.detach().cpu().clone() for x in w]
        self.before = [x.detach().cpu().clone() for x in w]
        self.step = trainer.global_step

    def on_train_batch_end(self, trainer, *args):
        after = [lin.weight.detach().cpu() for lin in self.linears]
        table = np.full((len(after), len(LAYER_STATS)), np.nan)
        col = {s: j for j, s in enumerate(LAYER_STATS)}
        table[:, :5] = ref.moments(self.grads).numpy()
        table[:, col["grad_nonfinite"]] = [(~torch.isfinite(g)).sum().item() for g in self.grads]
        table[:, col["backprop_norm"]] = ref.norms([self.signal[i] for i in range(len(after))]).numpy()
        idx = sorted(self.acts)
        a, s, e = zip(*(self.acts[i] for i in idx))
        table[idx, col["act_mean"]:col["act_saturation"] + 1] = ref.activation_stats(
            a, s, [x.derivative for x in e], [x.max_derivative for x in e], 0.05).numpy()
        table[:, col["weight_mean"]:col["weight_std"] + 1] = ref.mean_std(after).numpy()
        table[:, col["update_ratio"]] = ref.update_ratio(self.before, after).numpy()
        self.rows[self.step] = table


class MLP(L.LightningModule):
    def __init__(self, act: str, widths=(16, 16, 8, 16)):
        super().__init__()
        torch.manual_seed(0)
        sizes = [4, *widths]
        layers = []
        for i, o in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(i, o), ACTIVATIONS[act].make()]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


@pytest.mark.parametrize("act,every,path", [("sigmoid", 1, "stacked"), ("relu", 1, "per_tensor"), ("tanh", 2, "stacked"),
                                            ("sigmoid", 2, "per_tensor"), ("relu", 1, "fused"), ("tanh", 2, "fused"),
                                            ("sigmoid", 1, "fused"), ("gelu", 1, "fused")])
def test_buffered_statistics_match_the_plain_reference_at_every_step(tmp_path, monkeypatch, path, act, every):
    """30 steps, statistics flushed every 6 recorded steps; batches of 4, then 32, then 32-sample epochs
    with a short last batch (5): buffers grow once and partly-filled activation rows are ignored. On the
    per-tensor path the activation statistics are also computed one step at a time (as a big net's are, in
    pieces)."""
    use_path(monkeypatch, path)
    if path == "per_tensor":
        monkeypatch.setattr(activations, "ACT_CHUNK_NUMEL", 1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(101, 4, generator=g) * 3, torch.randint(0, 3, (101,), generator=g)
    batches = [list(range(4))] + [list(range(i, min(i + 32, 101))) for i in range(0, 101, 32)] * 12
    data = DataLoader(TensorDataset(x, y), batch_sampler=batches)
    logger, plain = ListLogger(), PlainStats()
    cb = GradientStatsCallback(every_n_steps=every, log_every_n_steps=2 * every, ring_steps=6,
                               trace_path=tmp_path / "t.parquet", trace_chunk_steps=7)
    trainer = L.Trainer(max_steps=30, logger=logger, callbacks=[plain, cb], enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(MLP(act), data)
    assert cb.params.name == path
    # on the fused path the kernel reduces the activation outputs too, for the activations it knows
    assert cb.activations.name == ("kernel" if path == "fused" and act != "gelu" else "buffered")
    trace = read_trace(cb.trace_path)
    assert trace["steps"].tolist() == list(range(0, 30, every))
    for j, stat in enumerate(LAYER_STATS):
        expected = np.stack([plain.rows[s][:, j] for s in trace["steps"]])
        np.testing.assert_allclose(trace[stat], expected, rtol=2e-4, atol=1e-6, err_msg=stat)
    logged = dict(stats_records(logger))
    assert sorted(logged) == list(range(0, 30, 2 * every))  # each with its own step number
    assert trace["modules"].tolist() == ["net.0", "net.2", "net.4", "net.6", "net.8"]  # a plain Sequential's paths
    for s, m in logged.items():
        assert m["grad_norm/net.4"] == pytest.approx(plain.rows[s][2, 0], rel=2e-4)
        assert m["act_saturation/net.2"] == pytest.approx(plain.rows[s][1, LAYER_STATS.index("act_saturation")])


class ClampedMLP(MLP):
    """Clamps its weights in place before every batch: a change the optimizer did not make."""

    def on_train_batch_start(self, batch, batch_idx):
        with torch.no_grad():
            for p in self.parameters():
                p.clamp_(-0.3, 0.3)


@pytest.mark.parametrize("path", ["fused", "stacked"])
def test_the_update_is_the_optimizer_step_when_the_weights_change_between_steps(tmp_path, monkeypatch, path):
    """The fused pass keeps the weights after a step for the next one's update, unless something changed
    them in place since (here a clamp under no_grad, which bumps their version counters)."""
    use_path(monkeypatch, path)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 4, generator=g) * 3, torch.randint(0, 3, (64,), generator=g)),
                      batch_size=16)
    plain = PlainStats()
    cb = GradientStatsCallback(log_every_n_steps=1, ring_steps=4, trace_path=tmp_path / "t.parquet")
    trainer = L.Trainer(max_steps=12, logger=False, callbacks=[plain, cb], enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(ClampedMLP("relu"), data)
    assert cb.params.name == path
    trace = read_trace(cb.trace_path)
    j = LAYER_STATS.index("update_ratio")
    expected = np.stack([plain.rows[s][:, j] for s in trace["steps"]])
    assert (expected[1:] > 0).all()
    np.testing.assert_allclose(trace["update_ratio"], expected, rtol=2e-4, atol=1e-7)


def test_a_net_without_activation_modules(tmp_path):
    """Linear layers only: weight and signal statistics every step, no act_* keys, nothing fails."""
    class Linears(TwoLayer):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return ((self.fc2(self.fc1(x)) - y) ** 2).mean()

    logger = ListLogger()
    cb = GradientStatsCallback(log_every_n_steps=1, ring_steps=2, trace_path=tmp_path / "t.parquet")
    data = DataLoader(TensorDataset(torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32)))
    L.Trainer(max_steps=3, logger=logger, callbacks=[cb], enable_progress_bar=False, enable_checkpointing=False,
              enable_model_summary=False, accelerator="cpu").fit(Linears(), data)
    logged = stats_records(logger)
    assert [s for s, _ in logged] == [0, 1, 2]
    assert not any(k.startswith("act_") for _, m in logged for k in m)
    assert np.isnan(read_trace(cb.trace_path)["act_mean"]).all()


def test_mixed_precision_reports_unscaled_gradients_and_signal(tmp_path):
    """fp16 autocast with a loss scale of 1024: the tensor hooks see a 1024x larger signal and the weight
    gradients are unscaled before on_before_optimizer_step; both must come out at their true size."""
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    logger, _ = fit(tmp_path, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    [(_, m)] = stats_records(logger)
    h = hand_backprop()
    for k, (dW, d) in zip(("fc1", "fc2"), ((h["dW1"], h["d1"]), (h["dW2"], h["d2"]))):
        assert m[f"grad_norm/{k}"] == pytest.approx(np.linalg.norm(dW), rel=5e-3)
        assert m[f"backprop_norm/{k}"] == pytest.approx(np.linalg.norm(d), rel=5e-3)


def test_the_path_is_chosen_for_the_model_as_trained(tmp_path):
    """Lightning converts (and moves) the model after the callbacks' setup: with precision="64-true" the
    weights are float64 by the first step, so the statistics must not take the float32 kernel chosen from
    the weights as they were at setup (they would crash on the first step); they must still be right."""
    logger, cb = fit(tmp_path, precision="64-true")
    assert cb.params.name == "stacked" and cb.recorded[0].params[0].dtype == torch.float64
    [(_, m)] = stats_records(logger)
    h = hand_backprop()
    for k, dW in zip(("fc1", "fc2"), (h["dW1"], h["dW2"])):
        assert m[f"grad_norm/{k}"] == pytest.approx(np.linalg.norm(dW), rel=1e-5)
