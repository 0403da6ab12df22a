"""The fused C pass (src/stats/fused.c): its sums, turned into statistics, against the plain reference; NaN/Inf;
layer sizes that do not fill its blocks or vector lanes; building, caching and the fallback."""
from __future__ import annotations

import math

import pytest
import torch

from src.stats import fused
from src.stats import reductions as stats
from tests import reference_stats as ref


@pytest.fixture
def lib():
    lib = fused.library()
    assert lib is not None, "the fused kernel did not build (CI has a C compiler)"
    return lib


def _passes(lib, weights, grads, step, threads=1):
    """Both passes around an optimizer step that adds `step` to the weights; the resulting statistics."""
    numel = torch.tensor([w.numel() for w in weights], dtype=torch.float64)
    p = fused.FusedPasses(lib, weights, threads)
    g_sums = torch.zeros(len(weights), len(stats.FUSED_GRAD_SUMS), dtype=torch.float64)
    w_sums = torch.zeros(len(weights), len(stats.FUSED_WEIGHT_SUMS), dtype=torch.float64)
    p.grad_pass(grads, g_sums, 0)
    before = [w.clone() for w in weights]
    assert all(torch.equal(a, b) for a, b in zip(p.prev, before))  # the pre-step copy
    for w, d in zip(weights, step):
        w.add_(d)
    p.weight_pass(w_sums, 0)
    return (stats.gradient_stats_from_sums(g_sums, numel), stats.weight_stats_from_sums(w_sums, numel),
            g_sums, before)


# sizes around the 1024-entry block and the 4/8/16-float vector lanes; one layer bigger than a block
SHAPES = [[(1,)], [(3, 5), (17,), (1023,), (1025,)], [(64, 64)] * 10 + [(10, 64)], [(256, 300), (1, 7)]]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shapes", SHAPES)
def test_sums_give_the_reference_statistics(lib, shapes, threads, monkeypatch):
    """threads=3 with layers of 1000+ entries split: pieces on three threads, combined per layer."""
    monkeypatch.setattr(fused, "SPLIT_MIN_NUMEL", 1000)
    monkeypatch.setattr(fused, "PARALLEL_MIN_NUMEL", 1000)
    g = torch.Generator().manual_seed(len(shapes))
    grads = [torch.randn(s, generator=g) * 10 ** torch.randint(-6, 2, (1,), generator=g).item() for s in shapes]
    grads[-1][grads[-1].abs() < grads[-1].abs().median()] = 0  # exact zeros, as dead ReLUs give
    weights = [torch.randn(s, generator=g) + 0.5 for s in shapes]
    step = [torch.randn(s, generator=g) * 1e-3 for s in shapes]
    grad, weight, _, before = _passes(lib, weights, grads, step, threads)
    torch.testing.assert_close(grad[:, :5], ref.moments(grads), rtol=1e-5, atol=1e-7)
    assert grad[:, 5].tolist() == [0.0] * len(shapes)  # grad_nonfinite
    torch.testing.assert_close(weight[:, :2], ref.mean_std(weights), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight[:, 2], ref.update_ratio(before, weights), rtol=1e-5, atol=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_nan_and_inf_are_counted_and_propagate(lib, threads, monkeypatch):
    monkeypatch.setattr(fused, "SPLIT_MIN_NUMEL", 1000)
    monkeypatch.setattr(fused, "PARALLEL_MIN_NUMEL", 1000)  # the 2000-entry layer in two pieces
    g = torch.zeros(2000)
    g[[3, 1500]] = float("nan")
    g[[10, 11, 1999]] = torch.tensor([float("inf"), -float("inf"), 2.5])
    clean = torch.tensor([0.0, -3.0, 0.0, 1.0, 0.0])
    inf_only = torch.tensor([1.0, -float("inf")])
    grad, _, sums, _ = _passes(lib, [torch.ones(2000), torch.ones(5), torch.ones(2)], [g, clean, inf_only],
                               [torch.zeros(2000), torch.zeros(5), torch.zeros(2)], threads)
    nan_row, clean_row, inf_row = grad.tolist()
    assert all(math.isnan(v) for v in nan_row[:4])  # norm, mean, std, max |g|: never a made-up number
    assert nan_row[4] == pytest.approx(1 - 5 / 2000)  # zero fraction exact: NaN and Inf are not zeros
    assert nan_row[5] == 4 and sums[0, stats.FUSED_GRAD_SUMS.index("nan")] == 2
    assert clean_row == pytest.approx([math.sqrt(10), -0.4, math.sqrt(2 - 0.16), 3.0, 0.6, 0.0])
    assert inf_row[0] == math.inf and inf_row[3] == math.inf and inf_row[5] == 1


def test_non_contiguous_and_replaced_tensors(lib):
    w = torch.randn(8, 5)
    grad_t = torch.randn(5, 8).t()  # a transposed gradient: copied before the pass
    grad, weight, _, _ = _passes(lib, [w], [grad_t], [torch.zeros(8, 5)])
    torch.testing.assert_close(grad[:, :5], ref.moments([grad_t]), rtol=1e-5, atol=1e-7)
    p = fused.FusedPasses(lib, [w])
    out = torch.zeros(1, len(stats.FUSED_WEIGHT_SUMS), dtype=torch.float64)
    w.data = torch.full((8, 5), 2.0)  # param.data swapped for new storage: the pass follows it
    p.weight_pass(out, 0)
    assert stats.weight_stats_from_sums(out, torch.tensor([40.0]))[0, :2].tolist() == [2.0, 0.0]
    w.data = torch.zeros(3)
    with pytest.raises(RuntimeError, match="shape"):
        p.weight_pass(out, 1)


def test_eligibility():
    assert fused.eligible([torch.zeros(3, 3)])
    assert not fused.eligible([torch.zeros(3, 3, dtype=torch.float64)])
    assert not fused.eligible([torch.zeros(3, 4).t()])


def test_build_is_cached_and_disabled_or_missing_compiler_falls_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("GRADFLOW_CACHE_DIR", str(tmp_path))
    fused.library.cache_clear()
    try:
        assert fused.library() is not None
        [so] = tmp_path.glob("fused-*.so")
        built = so.stat().st_mtime_ns
        fused.library.cache_clear()
        assert fused.library() is not None and so.stat().st_mtime_ns == built  # loaded, not rebuilt
        fused.library.cache_clear()
        monkeypatch.setenv("GRADFLOW_FUSED", "0")
        assert fused.library() is None
        monkeypatch.delenv("GRADFLOW_FUSED")
        fused.library.cache_clear()
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        with caplog.at_level("WARNING"):
            assert fused.library() is None
        assert "slower torch path" in caplog.text
    finally:
        fused.library.cache_clear()


@pytest.mark.parametrize("name", ["relu", "sigmoid", "tanh", "identity"])
def test_activation_sums_give_the_reference_statistics(lib, name):
    """From the activation's output alone: mean, std and the saturated fraction where f'(s) < 5 % of max f',
    as the reference computes them from the pre-activation."""
    from src.models.registry import ACTIVATIONS

    entry = ACTIVATIONS[name]
    g = torch.Generator().manual_seed(1)
    pres = [torch.randn(32, 300, generator=g) * 4, torch.randn(5, 7, generator=g) * 4 + 2]
    outs = [entry.make()(s) for s in pres]
    kind = entry.kernel_kind  # the registry's number for fused.c's enum
    kernel = fused.ActivationPass(lib, [kind] * 3, [0.05 * entry.max_derivative] * 3)
    sums = torch.zeros(3, len(stats.FUSED_ACT_SUMS), dtype=torch.float64)
    kernel([*outs, None], sums)  # a layer whose activation did not run this step: no numbers made up
    got = stats.activation_stats_from_sums(sums)
    expected = ref.activation_stats(outs, pres, [entry.derivative] * 2, [entry.max_derivative] * 2, 0.05)
    torch.testing.assert_close(got[:2], expected, rtol=1e-5, atol=1e-6)
    assert got[2].isnan().all()
    if name == "relu":
        assert 0.3 < got[0, 2] < 0.7  # about half the units dead: the test exercises the count


def test_add_squares_accumulates_and_declines_other_dtypes(lib):
    add_squares = fused.SquareSums(lib, 2)
    row = torch.tensor([1.0, 0.0], dtype=torch.float64)
    big = torch.randn(40, 50).t()  # non-contiguous
    assert add_squares([big, torch.tensor([3.0, float("inf")])], row)
    assert row[0].item() == pytest.approx(1 + big.double().square().sum().item(), rel=1e-6)
    assert row[1].item() == math.inf
    assert not add_squares([torch.ones(3, dtype=torch.bfloat16), torch.ones(2)], row)  # left to torch


def test_big_layers_are_split_across_threads(lib, monkeypatch):
    monkeypatch.setattr(fused, "SPLIT_MIN_NUMEL", 1000)
    monkeypatch.setattr(fused, "PARALLEL_MIN_NUMEL", 1000)
    p = fused.FusedPasses(lib, [torch.zeros(3000), torch.zeros(10)], threads=3)
    assert sorted(len(g.pieces) for g in p._groups) == [1, 1, 2] and not p._whole  # 3 pieces + 1, on 3 threads
    g = torch.ones(3000)
    g[2500] = float("nan")  # in one piece only: the layer's max |g| is still NaN
    sums = torch.zeros(2, len(stats.FUSED_GRAD_SUMS), dtype=torch.float64)
    p.grad_pass([g, torch.ones(10)], sums, 0)
    absmax = stats.FUSED_GRAD_SUMS.index("absmax")
    assert math.isnan(sums[0, absmax]) and sums[1, absmax] == 1.0
    p.close()
    assert fused.FusedPasses(lib, [torch.zeros(3000), torch.zeros(10)], threads=1)._whole
    monkeypatch.setattr(fused, "PARALLEL_MIN_NUMEL", 10_000)  # a small net stays on one thread
    assert fused.FusedPasses(lib, [torch.zeros(3000), torch.zeros(10)], threads=3)._whole


@pytest.mark.parametrize("threads", [1, 3])
def test_the_weights_are_copied_before_a_step_only_when_they_may_have_changed(lib, monkeypatch, threads):
    """weight_pass leaves the weights in `prev`; the next step's grad_pass copies them again only if the
    previous step was not recorded, their storage moved or an in-place op bumped their version."""
    monkeypatch.setattr(fused, "SPLIT_MIN_NUMEL", 1000)
    monkeypatch.setattr(fused, "PARALLEL_MIN_NUMEL", 1000)
    w = [torch.randn(3000), torch.randn(10)]
    p = fused.FusedPasses(lib, w, threads)
    g_sums = torch.zeros(2, len(stats.FUSED_GRAD_SUMS), dtype=torch.float64)
    w_sums = torch.zeros(2, len(stats.FUSED_WEIGHT_SUMS), dtype=torch.float64)
    grads = [torch.ones(3000), torch.ones(10)]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    p.grad_pass(grads, g_sums, 0)  # nothing in prev yet: copied
    assert same(p.prev, w)
    with torch.no_grad():
        torch._foreach_add_(w, 0.5)  # the optimizer step
    p.weight_pass(w_sums, 0)
    assert same(p.prev, w)  # left there for step 1
    step_sq = stats.FUSED_WEIGHT_SUMS.index("step_sum_sq")
    assert w_sums[:, step_sq].tolist() == pytest.approx([0.25 * 3000, 0.25 * 10])
    for x in w:  # between the steps, a write that bumps no version counter
        x.data.add_(1.0)
    p.grad_pass(grads, g_sums, 1)
    assert not same(p.prev, w)  # not copied: that edit would count as part of step 1's update
    with torch.no_grad():
        for x in w:
            x.clamp_(-0.1, 0.1)  # an in-place op under no_grad bumps it
    p.grad_pass(grads, g_sums, 1)
    assert same(p.prev, w)
    p.weight_pass(w_sums, 1)
    with torch.no_grad():
        torch._foreach_add_(w, 1.0)  # unrecorded steps 2 and 3 (an optimizer that bumps no version, say)
    p.grad_pass(grads, g_sums, 4)
    assert same(p.prev, w)
    p.close()
