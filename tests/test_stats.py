"""Tier (b): the statistics as pure functions, against values computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from src import stats
from src.registry import ACTIVATIONS


def test_moments_by_hand():
    (row,) = stats.moments([torch.tensor([3.0, 0.0, -4.0, 0.0])])
    norm, mean, std, absmax, zero_frac = row.tolist()
    assert norm == pytest.approx(5.0)
    assert mean == pytest.approx(-0.25)
    assert std == pytest.approx(math.sqrt(25 / 4 - 1 / 16))
    assert absmax == pytest.approx(4.0)
    assert zero_frac == pytest.approx(0.5)


def test_moments_one_row_per_tensor_any_shape():
    out = stats.moments([torch.ones(2, 3), torch.zeros(4)])
    assert out.shape == (2, len(stats.GRAD_STATS))
    assert out[0].tolist() == pytest.approx([math.sqrt(6), 1.0, 0.0, 1.0, 0.0])
    assert out[1].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0, 1.0])


def test_moments_keep_non_finite_values_visible():
    (row,) = stats.moments([torch.tensor([1.0, float("nan")])])
    assert math.isnan(row[0]) and math.isnan(row[1])


def test_activation_stats_sigmoid_saturation_by_hand():
    s = torch.tensor([[0.0, 10.0], [-10.0, 1.0]])
    a = torch.sigmoid(s)
    sig = ACTIVATIONS["sigmoid"]
    ((mean, std, sat),) = stats.activation_stats([a], [s], [sig.derivative], [sig.max_derivative], 0.05).tolist()
    # sigmoid'(+-10) = 4.5e-5 < 0.05 * 0.25; sigmoid'(0) = 0.25 and sigmoid'(1) = 0.197 are not
    assert sat == pytest.approx(0.5)
    assert mean == pytest.approx(a.mean().item())
    assert std == pytest.approx(a.std(correction=0).item())


def test_activation_stats_dead_relu_by_hand():
    s = torch.tensor([-1.0, 2.0, 0.0, 3.0])
    relu = ACTIVATIONS["relu"]
    ((mean, std, dead),) = stats.activation_stats([s.clamp_min(0)], [s], [relu.derivative], [1.0], 0.05).tolist()
    assert dead == pytest.approx(0.5)
    assert mean == pytest.approx(1.25)


def test_update_ratio_by_hand():
    before, after = [torch.tensor([3.0, 4.0])], [torch.tensor([3.0, 4.5])]
    assert stats.update_ratio(before, after).tolist() == pytest.approx([0.1])


def test_mean_std_and_norms():
    t = torch.tensor([1.0, 3.0])
    assert stats.mean_std([t]).tolist() == [pytest.approx([2.0, 1.0])]
    assert stats.norms([t]).tolist() == pytest.approx([math.sqrt(10)])


def test_backprop_ratio_is_first_over_last_hidden_layer():
    # three Linear layers: two hidden ones, then the output layer (ignored)
    assert stats.backprop_ratio(torch.tensor([1e-4, 1e-2, 5.0])).item() == pytest.approx(1e-2)
    assert math.isnan(stats.backprop_ratio(torch.tensor([1.0, 2.0])).item())
