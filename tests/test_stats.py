"""Tier (b): the statistics as pure functions, against values computed by hand and against the plain
per-tensor reference implementation (tests/reference_stats.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from src.stats import reductions as stats
from src.stats.names import GRAD_STATS, backprop_ratio
from src.models.registry import ACTIVATIONS
from tests import reference_stats as ref


def test_gradient_stats_by_hand():
    (row,) = stats.gradient_stats([torch.tensor([3.0, 0.0, -4.0, 0.0])])
    norm, mean, std, absmax, zero_frac = row.tolist()
    assert norm == pytest.approx(5.0)
    assert mean == pytest.approx(-0.25)
    assert std == pytest.approx(math.sqrt(25 / 4 - 1 / 16))
    assert absmax == pytest.approx(4.0)
    assert zero_frac == pytest.approx(0.5)


def test_gradient_stats_one_row_per_tensor_any_shape():
    out = stats.gradient_stats([torch.ones(2, 3), torch.zeros(4)])
    assert out.shape == (2, len(GRAD_STATS))
    # documented precision: std of a constant tensor is within 1e-3 * |mean| of 0
    assert out[0].tolist() == pytest.approx([math.sqrt(6), 1.0, 0.0, 1.0, 0.0], abs=1e-3)
    assert out[1].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0, 1.0])


@pytest.mark.parametrize("shapes", [[(64, 64)] * 10 + [(10, 64)], [(256, 64), (256, 256), (3, 256)], [(5,)]])
def test_gradient_stats_match_reference(shapes):
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(s, generator=g) * 10 ** torch.randint(-8, 2, (1,), generator=g).item() for s in shapes]
    ts[0][ts[0].abs() < ts[0].abs().median()] = 0  # some exact zeros, as dead ReLUs give
    torch.testing.assert_close(stats.gradient_stats(ts), ref.moments(ts), rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_fraction_is_exact(dtype):
    """Non-zeros are counted as ||sign g||^2: exact for big layers, and in bfloat16 (whose own norm could
    not count exactly past 256)."""
    g = torch.randn(300, 301, generator=torch.Generator().manual_seed(4)).to(dtype)
    g[:97] = 0
    expected = 1 - torch.count_nonzero(g).item() / g.numel()
    assert stats.gradient_stats([g])[0, 4].item() == pytest.approx(expected, abs=1e-7)
    stacked = stats.stacked_gradient_stats(g.float().reshape(1, -1), torch.tensor([float(g.numel())]))
    assert stacked[0, 4].item() == pytest.approx(expected, abs=1e-7)


def test_non_finite_gradients_are_visible_and_counted():
    g = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    (row,) = stats.gradient_stats([g])
    assert math.isnan(row[0]) and math.isnan(row[1]) and math.isnan(row[2])
    assert stats.nonfinite_counts([g, torch.ones(3)]).tolist() == [2.0, 0.0]
    assert stats.zero_fractions([torch.tensor([0.0, float("nan"), 1.0, 0.0])]).tolist() == [0.5]


def _padded(tensors):
    """[L, max numel] zero-padded rows, as the callback's ring buffers hold them, and the true sizes."""
    width = max(t.numel() for t in tensors)
    out = torch.zeros(len(tensors), width)
    for i, t in enumerate(tensors):
        out[i, :t.numel()] = t.reshape(-1)
    return out, torch.tensor([t.numel() for t in tensors], dtype=torch.float64)


@pytest.mark.parametrize("shapes", [[(64, 64)] * 10 + [(10, 64)], [(256, 64), (256, 256), (3, 256)], [(5,)]])
def test_stacked_gradient_stats_match_reference_step_by_step(shapes):
    g = torch.Generator().manual_seed(3)
    steps = []
    for _ in range(3):
        ts = [torch.randn(s, generator=g) * 10 ** torch.randint(-8, 2, (1,), generator=g).item() for s in shapes]
        ts[-1][ts[-1].abs() < ts[-1].abs().median()] = 0
        steps.append(ts)
    stacked, numel = zip(*(_padded(ts) for ts in steps))
    got = stats.stacked_gradient_stats(torch.stack(stacked), numel[0])
    assert got.shape == (3, len(shapes), len(GRAD_STATS))
    for k, ts in enumerate(steps):
        torch.testing.assert_close(got[k], ref.moments(ts), rtol=1e-4, atol=0)


def test_stacked_nonfinite_counts():
    x, _ = _padded([torch.tensor([1.0, float("nan"), float("inf"), 2.0]), torch.ones(3)])
    assert stats.stacked_nonfinite_counts(x[None]).tolist() == [[2.0, 0.0]]
    (row,) = stats.stacked_gradient_stats(x, torch.tensor([4.0, 3.0]))[:1]
    assert math.isnan(row[0]) and math.isnan(row[1]) and math.isnan(row[2])


def test_weight_stats_by_hand():
    before, after = [torch.tensor([3.0, 4.0])], [torch.tensor([3.0, 4.5])]
    ((mean, std, ratio),) = stats.weight_stats(after, [b - a for a, b in zip(after, before)]).tolist()
    assert mean == pytest.approx(3.75) and std == pytest.approx(0.75)
    assert ratio == pytest.approx(0.5 / math.hypot(3.0, 4.5))


def test_weight_stats_match_reference_both_layouts():
    g = torch.Generator().manual_seed(1)
    before = [torch.randn(64, 32, generator=g) + 0.1, torch.randn(10, 64, generator=g)]
    after = [b - 1e-3 * torch.randn(b.shape, generator=g) for b in before]
    expected_ratio = ref.norms([a - b for a, b in zip(after, before)]) / ref.norms(after)
    per_tensor = stats.weight_stats(after, [b - a for a, b in zip(after, before)])
    (pb, numel), (pa, _) = _padded(before), _padded(after)
    stacked = stats.stacked_weight_stats(pb[None], pa[None], numel)[0]
    for got in (per_tensor, stacked):
        torch.testing.assert_close(got[:, :2], ref.mean_std(after), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got[:, 2], expected_ratio, rtol=1e-4, atol=0)


SIG, RELU = ACTIVATIONS["sigmoid"], ACTIVATIONS["relu"]


def _act(pre, entry, module, rows=None):
    return stats.stacked_activation_stats(pre, module, entry.derivative, entry.max_derivative, 0.05, rows)


def test_activation_std_is_exact_when_saturated():
    s = torch.full((32, 16), 12.0) + torch.linspace(0, 1e-2, 16)  # every unit deep in saturation
    ((mean, std, sat),) = _act(s[None], SIG, torch.sigmoid).tolist()
    assert sat == 1.0
    assert std == pytest.approx(torch.sigmoid(s).double().std(correction=0).item(), rel=1e-3, abs=1e-9)


def test_activation_stats_sigmoid_saturation_by_hand():
    s = torch.tensor([[0.0, 10.0], [-10.0, 1.0]])
    a = torch.sigmoid(s)
    ((mean, std, sat),) = _act(s[None], SIG, torch.sigmoid).tolist()
    # sigmoid'(+-10) = 4.5e-5 < 0.05 * 0.25; sigmoid'(0) = 0.25 and sigmoid'(1) = 0.197 are not
    assert sat == pytest.approx(0.5)
    assert mean == pytest.approx(a.mean().item())
    assert std == pytest.approx(a.std(correction=0).item())


def test_activation_stats_dead_relu_by_hand():
    s = torch.tensor([[-1.0, 2.0], [0.0, 3.0]])
    ((mean, std, dead),) = _act(s[None], RELU, torch.relu).tolist()
    assert dead == pytest.approx(0.5)
    assert mean == pytest.approx(1.25)


@pytest.mark.parametrize("name", ["sigmoid", "relu", "tanh", "gelu", "elu"])
def test_stacked_activation_stats_match_reference_with_short_batches(name):
    """Steps x layers at once; a step whose batch is short (the last of an epoch) ignores the stale rows."""
    g = torch.Generator().manual_seed(2)
    entry, module = ACTIVATIONS[name], ACTIVATIONS[name].make()
    pre = torch.randn(4, 3, 32, 16, generator=g) * 4  # steps x layers x batch x width
    rows = torch.tensor([32, 7, 32, 1])
    got = _act(pre, entry, module, rows)
    for k, r in enumerate(rows.tolist()):
        s = list(pre[k, :, :r])
        expected = ref.activation_stats([module(x) for x in s], s, [entry.derivative] * 3, [entry.max_derivative] * 3, 0.05)
        torch.testing.assert_close(got[k], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(_act(pre, entry, module)[0], got[0])  # all rows real: the same numbers


def test_activation_stats_leave_the_buffer_alone():
    """The statistics work in place on f(s) and f'(s); an identity activation returns s itself, which must
    come back untouched (it is the callback's ring buffer)."""
    entry = ACTIVATIONS["identity"]
    pre = torch.randn(2, 3, 8, 4, generator=torch.Generator().manual_seed(3))
    kept = pre.clone()
    got = _act(pre, entry, entry.make())
    assert torch.equal(pre, kept)
    expected = ref.activation_stats(list(kept[0]), list(kept[0]), [entry.derivative] * 3, [1.0] * 3, 0.05)
    torch.testing.assert_close(got[0], expected, rtol=1e-4, atol=1e-6)


def test_backprop_ratio_is_first_over_last_hidden_layer():
    # three Linear layers: two hidden ones, then the output layer (ignored)
    assert backprop_ratio(np.array([1e-4, 1e-2, 5.0]), [0, 1, 2]) == pytest.approx(1e-2)
    assert math.isnan(backprop_ratio(np.array([1.0, 2.0]), [0, 1]))
    # only the layers count: a norm between them (index 1 here) is not the first or last hidden layer
    assert backprop_ratio(np.array([1e-4, 7.0, 1e-2, 3.0, 5.0]), [0, 2, 4]) == pytest.approx(1e-2)
