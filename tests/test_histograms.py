"""log10|x| histograms: exact counts (tier b) and the callback on a tiny real Trainer (tier c)."""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from src.analysis import plots
from src.callbacks.histograms import HistogramCallback
from src.stats import histograms
from src.stats.histograms import EDGES, N_BINS, log10_histogram
from src.models.modules import Classifier


def bin_of(log10: float) -> int:
    return int(np.clip(np.searchsorted(EDGES, log10, side="right") - 1, 0, N_BINS - 1))


def test_exact_counts_on_a_hand_made_tensor():
    t = torch.tensor([0.0, -0.0, 1.0, -1.0, 3e-9, 5e-9, 1e-20, 1e9, float("nan"), float("inf"), -float("inf"), 0.02])
    h = log10_histogram(t)
    assert h.shape == (N_BINS + 2,) and h.dtype == np.int64
    expect = np.zeros(N_BINS + 2, dtype=np.int64)
    for v in (1.0, 1.0, 3e-9, 5e-9, 1e-20, 1e9, 0.02):
        expect[bin_of(np.log10(v))] += 1
    expect[N_BINS], expect[N_BINS + 1] = 2, 3  # two zeros (signed), NaN + two infinities
    np.testing.assert_array_equal(h, expect)
    # by hand: |1.0|, |-1.0| -> log 0 -> [0, 0.5); 3e-9 -> -8.52 -> [-9, -8.5); 5e-9 -> -8.30 -> [-8.5, -8);
    # 0.02 -> -1.70 -> [-2, -1.5); 1e-20 -> below the range -> first bin; 1e9 -> above -> last bin
    start = {e: i for i, e in enumerate(EDGES)}
    assert (h[start[0.0]], h[start[-9.0]], h[start[-8.5]], h[start[-2.0]]) == (2, 1, 1, 1)
    assert h[0] == 1 and h[N_BINS - 1] == 1 and h[:N_BINS].sum() == 7
    assert h.sum() == t.numel()


def _tiny_trainer(tmp_path, every: int, steps: int, probe=None, chunk_rows: int = 4096):
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    module = Classifier(net, "sgd", {"lr": 0.1})
    cb = HistogramCallback(every, tmp_path / "trace" / "histograms.parquet", chunk_rows=chunk_rows)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[cb, *([probe] if probe else [])],
                        default_root_dir=str(tmp_path))
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    return cb, net


class HookProbe(L.Callback):
    """Counts forward hooks on the first Linear at every batch start (after the histogram callback's)."""

    def __init__(self):
        self.seen: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, len(pl_module.net[0]._forward_hooks)))


def test_callback_writes_the_expected_rows_and_hooks_only_recorded_steps(tmp_path):
    probe = HookProbe()
    cb, net = _tiny_trainer(tmp_path, every=3, steps=8, probe=probe)
    path = cb.artifacts()["histograms"]
    assert path == tmp_path / "trace" / "histograms.parquet"
    assert probe.seen == [(s, 1 if s % 3 == 0 else 0) for s in range(8)]  # hooked on steps 0, 3, 6 only
    assert not net[0]._forward_hooks and not net[1]._forward_hooks  # nothing left behind

    h = histograms.read_histograms(path)
    for q in ("grad", "backprop", "act"):
        assert list(h[q]["steps"]) == [0, 3, 6]
    assert list(h["grad"]["layers"]) == [0, 1, 2] and list(h["backprop"]["layers"]) == [0, 1, 2]
    assert list(h["act"]["layers"]) == [0, 1]  # no activation after the output layer
    total = lambda q: h[q]["counts"].sum(axis=2) + h[q]["zeros"] + h[q]["nonfinite"]  # noqa: E731
    np.testing.assert_array_equal(total("grad"), np.tile([4 * 5, 5 * 6, 6 * 3], (3, 1)))  # weight numel
    np.testing.assert_array_equal(total("backprop"), np.tile([8 * 5, 8 * 6, 8 * 3], (3, 1)))  # batch x width
    np.testing.assert_array_equal(total("act"), np.tile([8 * 5, 8 * 6], (3, 1)))
    assert (h["act"]["zeros"][:, 1] > 0).all()  # ReLU outputs exact zeros, counted apart
    assert (h["act"]["zeros"][:, 0] == 0).all() and (h["grad"]["nonfinite"] == 0).all()

    paths = plots.draw_all(None, {}, tmp_path / "plots", "tiny", hist=h)
    assert {p.name for p in paths} == {"curves.png", "hist_grad.png", "hist_backprop.png", "hist_act.png"}


def test_rows_are_flushed_in_chunks(tmp_path):
    """8 rows a recorded step (3 layers' gradients and signals, 2 activations) in chunks of 12 rows: a row
    group is written as each chunk fills during training (after steps 1 and 2), the rest by teardown."""
    import pyarrow.parquet as pq

    cb, _ = _tiny_trainer(tmp_path, every=1, steps=4, chunk_rows=12)
    assert cb.writer.rows_written == 4 * 8 and cb.writer.row_groups == 3
    f = pq.ParquetFile(cb.artifacts()["histograms"])
    assert f.metadata.num_row_groups == 3
    assert [f.metadata.row_group(i).num_rows for i in range(3)] == [12, 12, 8]
    assert f.schema_arrow.metadata[b"log10_edges"].startswith(b"-12,-11.5")


def test_batched_histograms_equal_one_at_a_time():
    torch.manual_seed(0)
    ts = [torch.randn(7, 3) * 1e-6, torch.zeros(4), torch.tensor([float("nan"), 2.0]), torch.randn(50).double() * 1e3]
    batched = histograms.log10_histograms(ts)
    np.testing.assert_array_equal(batched, np.stack([log10_histogram(t) for t in ts]))
    np.testing.assert_array_equal(batched.sum(axis=1), [21, 4, 2, 50])
