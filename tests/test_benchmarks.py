"""The benchmark scripts run and print the lines their docs promise (a few steps each: their figures are not
checked here, only that the scripts do not rot; docs/performance.md has the measured figures)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def bench(*args: str, timeout: int = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def ratio(out: str, key: str) -> float:
    m = re.search(rf"^{key}=([\d.]+)$", out, re.M)
    assert m, f"{key} missing from:\n{out}"
    return float(m.group(1))


def test_overhead_mlp_and_models():
    out = bench("benchmarks/overhead.py", "--steps", "8", "--warmup", "2", "--repeats", "1", "--no-slow-server",
                "--models", "small,lstm,transformer,cnn")
    for key in ("overhead_ratio_small", "overhead_ratio_lstm", "overhead_ratio_transformer", "overhead_ratio_cnn",
                "vs_lightning_ratio"):
        assert ratio(out, key) > 0
    for label in ("10x64 sigmoid", "lstm 50 steps", "transformer 4x64", "cnn 10x16"):
        assert re.search(rf"^\| {label}[^|]* \| stats \|", out, re.M), label


def test_overhead_under_ddp():
    out = bench("benchmarks/overhead.py", "--ddp", "2", "--models", "small", "--steps", "6", "--warmup", "2",
                "--repeats", "1")
    assert ratio(out, "overhead_ratio_ddp2_small") > 0
    assert re.search(r"^\| 10x64 sigmoid \| stats \| [\d.]+ \|", out, re.M)


def test_overhead_rejects_an_unknown_model():
    out = subprocess.run([sys.executable, "benchmarks/overhead.py", "--models", "small,vgg"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown model vgg" in out.stderr


def test_writer_variants():
    out = bench("benchmarks/writer.py", "--model", "small", "--repeats", "1", "--steps", "40")
    assert out.startswith("10x64 sigmoid, 1 torch thread(s)")
    assert len(re.findall(r"^\| (off|forked process|writer thread)", out, re.M)) == 4


def test_ab_against_this_commit():
    out = bench("benchmarks/ab.py", "--baseline", "HEAD", "--rounds", "1", "--models", "small", "--",
                "--steps", "8", "--warmup", "2")
    assert ratio(out, "ab_small_stats_now_vs_base") > 0


def test_after_fit():
    out = bench("benchmarks/after_fit.py", "--repeats", "1", "trainer.max_steps=20", "model.depth=3")
    assert ratio(out, "after_fit_vs_fit") > 0 and ratio(out, "png_vs_report") > 0
    assert re.search(r"^\| tracking.plots=true \(report \+ PNGs\) \|", out, re.M)


def test_pruner():
    out = bench("benchmarks/pruner.py", "--workers", "1", "activation=sigmoid,relu", "init=he", "model.depth=10",
                "trainer.max_epochs=2")
    assert ratio(out, "pruner_wall_ratio") > 0 and "pruned: 1 of 2 points" in out
