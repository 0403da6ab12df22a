"""Tier (c) for any model: the statistics of convolutions and recurrent nets against hand-computed values (numpy,
no autograd), torch's own recurrent kernels against our unrolled copy, and LightningModules written the way a
user writes them (around nn.Transformer and nn.LSTM) recorded module by module, by name."""
from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from src.callbacks.gradient_stats import GradientStatsCallback
from src.stats import recurrent
from src.stats.modules import recorded_modules
from src.stats.names import LAYER_STATS
from src.stats.trace import read_time_trace, read_trace
from tests.test_callback import ListLogger, stats_records

LR = 0.1


def fit(module, x, y, tmp_path, steps=1, batch_size=None, **cb_kwargs):
    data = DataLoader(TensorDataset(x, y), batch_size=batch_size or len(x))
    logger = ListLogger()
    cb = GradientStatsCallback(log_every_n_steps=1, trace_path=tmp_path / "t.parquet", **cb_kwargs)
    L.Trainer(max_steps=steps, logger=logger, callbacks=[cb], enable_progress_bar=False, enable_checkpointing=False,
              enable_model_summary=False, accelerator="cpu").fit(module, data)
    return logger, cb


class Plain(L.LightningModule):
    """A user's module: `net`, a loss of its output, plain SGD."""

    def __init__(self, net, loss):
        super().__init__()
        self.net, self.loss = net, loss

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


# ---- a convolution by hand ------------------------------------------------------------------------------
W = np.array([[0.5, -1.0], [0.25, 2.0]])
XS = np.array([[[1.0, 2.0, 0.0], [-1.0, 0.5, 3.0], [2.0, -2.0, 1.0]],
               [[0.0, 1.0, -1.0], [1.5, 0.0, 2.0], [-0.5, 1.0, 0.5]]])


def conv_by_hand():
    """s = W * x (2x2 kernel, valid, bias 0.3) for two 3x3 images; loss = 0.5 sum s^2, so dL/ds = s."""
    s = np.zeros((2, 2, 2))
    for n in range(2):
        for i in range(2):
            for j in range(2):
                s[n, i, j] = (W * XS[n, i:i + 2, j:j + 2]).sum() + 0.3
    dW = np.zeros((2, 2))
    for a in range(2):
        for b in range(2):
            dW[a, b] = sum(s[n, i, j] * XS[n, i + a, j + b] for n in range(2) for i in range(2) for j in range(2))
    return s, dW


def test_a_convolution_by_hand(tmp_path):
    conv = nn.Conv2d(1, 1, 2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(W).view(1, 1, 2, 2))
        conv.bias.fill_(0.3)
    x = torch.tensor(XS, dtype=torch.float32).unsqueeze(1)
    logger, cb = fit(Plain(conv, lambda out, y: 0.5 * (out ** 2).sum()), x, torch.zeros(2), tmp_path)
    [(_, m)] = stats_records(logger)
    s, dW = conv_by_hand()
    new = W - LR * dW
    expected = {"grad_norm": np.linalg.norm(dW), "grad_mean": dW.mean(), "grad_std": dW.std(),
                "grad_absmax": np.abs(dW).max(), "grad_zero_frac": 0.0, "grad_nonfinite": 0.0,
                "backprop_norm": np.linalg.norm(s), "weight_mean": new.mean(), "weight_std": new.std(),
                "update_ratio": LR * np.linalg.norm(dW) / np.linalg.norm(new)}
    for stat, v in expected.items():
        assert m[f"{stat}/net"] == pytest.approx(v, rel=1e-5, abs=1e-7), stat
    trace = read_trace(cb.trace_path)
    assert trace["modules"].tolist() == ["net"] and trace["kinds"].tolist() == ["conv"]


# ---- a recurrent net through time, by hand -------------------------------------------------------------
W_IH, W_HH = np.array([[0.5], [-1.0]]), np.array([[0.8, -0.6], [0.3, 0.9]])
B_IH, B_HH = np.array([0.1, -0.2]), np.array([0.05, 0.0])
XR = np.array([[[1.0], [0.5], [-1.0]], [[-0.5], [2.0], [0.25]]])  # [batch 2, time 3, 1 feature]


def rnn_by_hand():
    """h_t = tanh(W_ih x_t + b_ih + W_hh h_(t-1) + b_hh), h_0 = 0; loss = 0.5 ||h_3||^2 (the last output).
    Back through time: d_3 = h_3, d_(t-1) = (d_t * (1 - h_t^2)) W_hh (the total dL/dh_t)."""
    h = [np.zeros((2, 2))]
    for t in range(3):
        h.append(np.tanh(XR[:, t] @ W_IH.T + B_IH + h[-1] @ W_HH.T + B_HH))
    d = {3: h[3]}
    for t in (3, 2):
        d[t - 1] = (d[t] * (1 - h[t] ** 2)) @ W_HH
    dW_ih = sum((d[t] * (1 - h[t] ** 2)).T @ XR[:, t - 1] for t in (1, 2, 3))
    dW_hh = sum((d[t] * (1 - h[t] ** 2)).T @ h[t - 1] for t in (1, 2, 3))
    return h, d, dW_ih, dW_hh


class LastOutput(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0][:, -1]


def test_a_recurrent_net_through_time_by_hand(tmp_path):
    rnn = nn.RNN(1, 2, batch_first=True)
    with torch.no_grad():
        for name, v in (("weight_ih_l0", W_IH), ("weight_hh_l0", W_HH), ("bias_ih_l0", B_IH), ("bias_hh_l0", B_HH)):
            getattr(rnn, name).copy_(torch.tensor(v))
    x = torch.tensor(XR, dtype=torch.float32)
    logger, cb = fit(Plain(LastOutput(rnn), lambda out, y: 0.5 * (out ** 2).sum()), x, torch.zeros(2), tmp_path)
    h, d, dW_ih, dW_hh = rnn_by_hand()
    [(_, m)] = stats_records(logger)
    both = np.concatenate([dW_ih.ravel(), dW_hh.ravel()])  # the module's weights, taken together
    assert m["grad_norm/rnn"] == pytest.approx(np.linalg.norm(both), rel=1e-5)
    assert m["grad_mean/rnn"] == pytest.approx(both.mean(), rel=1e-5)
    assert m["grad_std/rnn"] == pytest.approx(both.std(), rel=1e-5)
    # the signal at the output sequence: only its last step reaches the loss, directly
    assert m["backprop_norm/rnn"] == pytest.approx(np.linalg.norm(h[3]), rel=1e-5)
    through = read_time_trace(tmp_path / "time_trace.parquet")["rnn"]
    assert through["steps"].tolist() == [0]
    np.testing.assert_allclose(through["norms"][0], [np.linalg.norm(d[t]) for t in (1, 2, 3)], rtol=1e-5)
    timed = [mm for _, mm in logger.records if "backprop_time_ratio" in mm]
    assert timed == [{"backprop_time_ratio/rnn": pytest.approx(np.linalg.norm(d[1]) / np.linalg.norm(d[3]),
                                                                   rel=1e-5),
                      "backprop_time_ratio": pytest.approx(np.linalg.norm(d[1]) / np.linalg.norm(d[3]), rel=1e-5)}]


@pytest.mark.parametrize("cell,kwargs", [("RNN", {"nonlinearity": "relu"}), ("RNN", {}), ("LSTM", {}), ("GRU", {}),
                                         ("LSTM", {"num_layers": 2}), ("GRU", {"num_layers": 2, "batch_first": True}),
                                         ("LSTM", {"bias": False, "batch_first": True})])
def test_the_unrolled_copy_is_torchs_own_module(cell, kwargs):
    """Our step-by-step copy gives torch's output, and its ||dL/dh_t|| equals the total derivative taken
    through torch's own kernel run one step at a time (each h_t a leaf of its own step)."""
    torch.manual_seed(0)
    module = getattr(nn, cell)(3, 5, **kwargs)
    batch_first = kwargs.get("batch_first", False)
    x = torch.randn(4, 7, 3) if batch_first else torch.randn(7, 4, 3)
    out, _ = module(x)
    copy, hs = recurrent.unroll(module, x)
    torch.testing.assert_close(copy, out.transpose(0, 1) if batch_first else out, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    norms = recurrent.time_signal(module, x, None, g)
    # the reference: torch's kernel, one step at a time. The top layer's h_t is then two tensors of the same
    # value, the step's output and the state handed to the next step: dL/dh_t is the sum of their gradients.
    top, states, state, seq = [], [], None, x.transpose(0, 1) if batch_first else x
    for t in range(seq.shape[0]):
        step_out, state = module(seq[t:t + 1].transpose(0, 1) if batch_first else seq[t:t + 1], state)
        h_n = state[0] if isinstance(state, tuple) else state
        for v in (step_out, h_n):
            v.retain_grad()
        top.append(step_out)
        states.append(h_n)
    full = torch.cat([o.transpose(0, 1) if batch_first else o for o in top])  # time-major
    full.backward((g.transpose(0, 1) if batch_first else g))
    expected = [torch.linalg.vector_norm((o.grad.reshape(-1, 5) + (h.grad[-1] if h.grad is not None else 0)).double())
                for o, h in zip(top, states)]
    torch.testing.assert_close(norms, torch.stack(expected), rtol=1e-4, atol=1e-9)


def test_zeros_through_time_are_kept_not_dropped(tmp_path):
    """A tanh RNN whose recurrent weights are tiny: in float32 the signal reaches exactly 0 a few dozen steps
    back. The trace keeps the zeros and the ratio is logged as 0."""
    torch.manual_seed(0)
    rnn = nn.RNN(1, 4, batch_first=True)
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(1e-3)
    x = torch.randn(8, 60, 1)
    logger, _ = fit(Plain(LastOutput(rnn), lambda out, y: (out ** 2).sum()), x, torch.zeros(8), tmp_path)
    norms = read_time_trace(tmp_path / "time_trace.parquet")["rnn"]["norms"][0]
    assert len(norms) == 60 and norms[-1] > 0 and (norms[:30] == 0).all()
    [ratio] = [m["backprop_time_ratio"] for _, m in logger.records if "backprop_time_ratio" in m]
    assert ratio == 0.0


# ---- modules written as users write them ----------------------------------------------------------------
class Translator(L.LightningModule):
    """A user's sequence-to-sequence model around nn.Transformer."""

    def __init__(self, vocab=11, width=16):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.model = nn.Transformer(width, nhead=2, num_encoder_layers=2, num_decoder_layers=1,
                                    dim_feedforward=32, dropout=0.0, batch_first=True)
        self.out = nn.Linear(width, vocab)

    def training_step(self, batch, batch_idx):
        src, tgt = batch
        h = self.model(self.embed(src), self.embed(tgt))
        return nn.functional.cross_entropy(self.out(h).flatten(0, 1), tgt.flatten())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class Forecaster(L.LightningModule):
    """A user's model around a two-layer nn.LSTM."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lstm = nn.LSTM(3, 8, num_layers=2, batch_first=True)
        self.decoder = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.decoder(self.lstm(x)[0][:, -1]), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _owners(module) -> set[str]:
    """Paths of the modules that own trainable parameters directly."""
    return {p for p, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))}


def test_a_users_transformer_is_recorded_module_by_module(tmp_path):
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(0, 11, (12, 6), generator=g), torch.randint(0, 11, (12, 5), generator=g)
    logger, cb = fit(Translator(), src, tgt, tmp_path, steps=3, batch_size=4)
    trace = read_trace(cb.trace_path)
    names = trace["modules"].tolist()
    assert set(names) == _owners(Translator()) and len(names) == 25  # every module that owns parameters: 2 x 6 + 9 + 2 norms + 2
    for path, kind in (("model.encoder.layers.0.self_attn", "attention"), ("model.encoder.layers.0.self_attn.out_proj",
                       "linear"), ("model.decoder.layers.0.multihead_attn", "attention"), ("embed", "embedding"),
                       ("model.encoder.layers.1.norm2", "norm"), ("model.encoder.norm", "norm"), ("out", "linear")):
        assert trace["kinds"][names.index(path)] == kind, path
    for stat in LAYER_STATS:
        if not stat.startswith("act_"):
            assert np.isfinite(trace[stat]).all(), stat  # out_proj's signal included: the attention's output
    out_proj, attn = names.index("model.encoder.layers.0.self_attn.out_proj"), names.index("model.encoder.layers.0.self_attn")
    np.testing.assert_array_equal(trace["backprop_norm"][:, out_proj], trace["backprop_norm"][:, attn])
    # the feed-forward's relu is a function inside nn.TransformerEncoderLayer: seen from linear1's output
    acts = [n for n in names if np.isfinite(trace["act_mean"][:, names.index(n)]).all()]
    assert sorted(acts) == sorted(n for n in names if n.endswith("linear1"))
    [(_, m)] = stats_records(logger)[:1]
    assert "grad_norm/model.encoder.layers.0.self_attn.out_proj" in m and "act_saturation/model.encoder.layers.0.linear1" in m


def test_a_users_lstm_is_recorded_with_its_signal_through_time(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 9, 3, generator=g), torch.randn(16, 1, generator=g)
    logger, cb = fit(Forecaster(), x, y, tmp_path, steps=2, batch_size=8, time_every_n_steps=1)
    trace = read_trace(cb.trace_path)
    assert trace["modules"].tolist() == ["lstm", "decoder"] and trace["kinds"].tolist() == ["recurrent", "linear"]
    assert all(np.isfinite(trace[s]).all() for s in LAYER_STATS if not s.startswith("act_"))
    lstm = Forecaster().lstm
    numel = sum(p.numel() for n, p in lstm.named_parameters() if "bias" not in n)
    assert numel == 4 * 8 * (3 + 8) + 4 * 8 * (8 + 8)  # both layers' input and recurrent weights
    through = read_time_trace(tmp_path / "time_trace.parquet")["lstm"]
    assert through["steps"].tolist() == [0, 1] and through["norms"].shape == (2, 9) and (through["norms"] > 0).all()
    assert [s for s, m in logger.records if "backprop_time_ratio/lstm" in m] == [0, 1]


# ---- selection -----------------------------------------------------------------------------------------
def test_selection_by_path_and_kind():
    model = Translator()
    everything = [r.path for r in recorded_modules(model)]
    enc = [r.path for r in recorded_modules(model, include=[r"^model\.encoder\."], exclude=["norm"])]
    assert enc and all(p.startswith("model.encoder.") and "norm" not in p for p in enc)
    assert [r.path for r in recorded_modules(model, types=["embedding"])] == ["embed"]
    assert {r.kind for r in recorded_modules(model, types=["attention", "norm"])} == {"attention", "norm"}
    frozen = Translator()
    frozen.embed.requires_grad_(False)
    assert "embed" in everything and "embed" not in [r.path for r in recorded_modules(frozen)]


def test_a_module_called_twice_adds_its_signals(tmp_path):
    """Weight sharing: the same Linear applied twice. Its gradient is the sum over both calls; its signal's
    squared norm the sum of both calls' (the two outputs taken as one)."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(3, 3)

        def forward(self, x):
            return self.shared(torch.tanh(self.shared(x)))

    torch.manual_seed(0)
    net, x = Twice(), torch.randn(5, 3)
    h1 = net.shared(x)
    h2 = net.shared(torch.tanh(h1))
    h1.retain_grad(), h2.retain_grad()
    (h2 ** 2).sum().backward()
    expected = float(torch.sqrt(h1.grad.square().sum() + h2.grad.square().sum()))
    module = Plain(Twice(), lambda out, y: (out ** 2).sum())
    module.net.load_state_dict(net.state_dict())
    logger, cb = fit(module, x, torch.zeros(5), tmp_path)
    [(_, m)] = stats_records(logger)
    assert m["backprop_norm/shared"] == pytest.approx(expected, rel=1e-5)
    assert m["grad_norm/shared"] == pytest.approx(float(net.shared.weight.grad.norm()), rel=1e-5)


# ---- robustness ----------------------------------------------------------------------------------------
def test_hooks_are_removed_when_fit_ends_and_a_second_fit_records_once(tmp_path):
    from tests.test_callback import MLP

    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)),
                      batch_size=16)
    module = MLP("tanh")
    cb = GradientStatsCallback(log_every_n_steps=1, trace_path=tmp_path / "t.parquet")
    hooks = lambda: sum(len(m._forward_hooks) for m in module.modules())  # noqa: E731
    for _ in range(2):
        logger = ListLogger()
        L.Trainer(max_steps=5, logger=logger, callbacks=[cb], enable_progress_bar=False, enable_checkpointing=False,
                  enable_model_summary=False, accelerator="cpu").fit(module, data)
        assert hooks() == 0
        assert [s for s, _ in stats_records(logger)] == [0, 1, 2, 3, 4]  # each step once, not once per fit
        assert read_trace(cb.trace_path)["steps"].tolist() == [0, 1, 2, 3, 4]


class FailsAtOnce(Plain):
    def training_step(self, batch, batch_idx):
        raise RuntimeError("the user's own bug")


def test_an_error_before_the_first_step_surfaces_unchanged(tmp_path):
    module = FailsAtOnce(nn.Linear(2, 1), None)
    cb = GradientStatsCallback(trace_path=tmp_path / "t.parquet")
    with pytest.raises(RuntimeError, match="^the user's own bug$"):
        L.Trainer(max_steps=2, logger=False, callbacks=[cb], enable_progress_bar=False, enable_checkpointing=False,
                  accelerator="cpu").fit(module, DataLoader(TensorDataset(torch.randn(4, 2), torch.zeros(4))))
    assert sum(len(m._forward_hooks) for m in module.modules()) == 0
    assert cb.artifacts() == {}  # nothing was recorded, nothing is claimed


@pytest.mark.slow
def test_memory_stays_bounded_over_10k_steps(tmp_path):
    """10,000 recorded steps of a small LSTM model, every step: the callback holds a fixed number of tensors
    (its buffers), whatever the step count; the trace is on disk in row groups."""
    import gc

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(2, 4, batch_first=True), nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.head(self.rnn(x)[0][:, -1]), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    counts = []

    class Count(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step in (2000, 10000):
                counts.append(live_tensors())

    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 5, 2, generator=g), torch.randn(64, 1, generator=g)), batch_size=8)
    cb = GradientStatsCallback(log_every_n_steps=100, time_every_n_steps=10, trace_path=tmp_path / "t.parquet",
                               trace_chunk_steps=512)
    L.Trainer(max_steps=10_000, logger=False, callbacks=[cb, Count()], enable_progress_bar=False,
              enable_checkpointing=False, enable_model_summary=False, accelerator="cpu").fit(Tiny(), data)
    assert len(counts) == 2 and counts[1] <= counts[0] + 5, counts
    assert len(read_trace(cb.trace_path)["steps"]) == 10_000
    assert len(read_time_trace(tmp_path / "time_trace.parquet")["rnn"]["steps"]) == 1000
