"""A run's report.html: what it holds, read back from its embedded data; that it is self-contained and stays
small for a long run; and, in headless Chromium, that it draws."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from src.analysis.verdict import Verdict
from src.report import run
from src.report.page import numbers, to_json

MODULES = [f"layer_{i:02d}" for i in range(10)] + ["head"]


def fake_trace(steps: int, modules: list[str] = MODULES) -> dict:
    rng = np.random.default_rng(0)
    values = lambda: rng.lognormal(-4, 2, (steps, len(modules))).astype(np.float32)  # noqa: E731
    trace = {"steps": np.arange(steps), "layers": np.arange(len(modules)), "modules": np.array(modules, dtype=object),
             "kinds": np.array(["linear"] * len(modules), dtype=object)}
    for stat, _ in run.CURVES + (("act_saturation", False),):
        trace[stat] = values()
    return trace


def page_data(path: Path) -> dict:
    text = path.read_text()
    return json.loads(re.search(r"<script type='application/json' id='gradflow-data'>(.*?)</script>", text,
                                re.S).group(1).replace("<\\/", "</"))


HISTORY = {"train/loss": [(s, 2.3 - s / 1000) for s in range(0, 1000, 10)],
           "val/loss": [(s, 2.2) for s in range(44, 1000, 45)], "val/acc": [(s, 0.5) for s in range(44, 1000, 45)]}


def test_the_report_holds_the_verdict_the_recorded_values_and_the_config(tmp_path):
    trace = fake_trace(1000)
    trace["backprop_norm"][0, 0] = 0.0      # an exact zero is kept as 0, a NaN becomes null (JSON has no NaN)
    trace["backprop_norm"][0, 1] = np.nan
    path = run.write(tmp_path / "report.html", "sigmoid-xavier-d10",
                     Verdict("vanishing", "layer_00's signal is 1e-7 of the output's", 0),
                     {"val/acc": 0.1, "backprop_ratio": 2.2e-6}, trace, HISTORY, config="activation:\n  name: sigmoid\n")
    text, data = path.read_text(), page_data(path)
    assert "<b>vanishing</b>layer_00&#x27;s signal is 1e-7" in text and "name: sigmoid" in text
    flow = next(h for h in data["heatmaps"] if h["into"] == "flow")
    assert flow["rows"] == MODULES and len(flow["x"]) <= run.MAX_COLUMNS + 1 and flow["x"][-1] == 999
    cols = np.asarray(flow["x"])
    got = np.array([[np.nan if v is None else v for v in row] for row in flow["values"]])
    want = trace["backprop_norm"][cols].T.astype(np.float64)
    assert got[0, 0] == 0.0 and flow["values"][1][0] is None
    np.testing.assert_allclose(got, want, rtol=1e-3)  # 4 significant digits of the recorded values, no averages
    charts = {c["title"]: c for c in data["charts"]}
    assert {stat for stat, _ in run.CURVES} | {"loss", "acc"} <= set(charts)
    assert [s["label"] for s in charts["grad_norm"]["series"]] == MODULES and data["layers"] == MODULES
    loss_steps = charts["loss"]["x"]
    assert all(s in loss_steps for s, _ in HISTORY["val/loss"])  # every validation point is drawn


def test_self_contained_and_a_few_hundred_kb_for_a_long_run(tmp_path):
    for steps in (1000, 100_000):  # thinned to a fixed number of columns: the size does not grow with steps
        path = run.write(tmp_path / f"{steps}.html", "t", Verdict("healthy", "ok", None), {}, fake_trace(steps),
                         HISTORY)
        text = path.read_text()
        assert len(text.encode()) < 400_000, (steps, len(text))
        assert not re.search(r"<(script|link|img)[^>]+(src|href)=['\"]?(https?:)?//", text)  # nothing fetched


def test_numbers_are_compact_and_valid_json():
    assert numbers([1.0, 0.0, float("nan"), float("inf"), 1.23456789e-7]) == "[1,0,null,null,1.235e-07]"
    assert json.loads(to_json({"a": numbers([2.5]), "b": "</script>"})) == {"a": [2.5], "b": "</script>"}
    assert "</script>" not in to_json({"b": "</script>"})


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium package (headless browser)")
def test_the_report_draws_in_a_browser(tmp_path):
    trace = fake_trace(300)
    path = run.write(tmp_path / "report.html", "t", Verdict("healthy", "ok", None), {"val/acc": 0.9}, trace, HISTORY,
                     chi1=[1.0] * 10)
    dom = subprocess.run(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--virtual-time-budget=5000", "--dump-dom", path.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'data-drawn="true"' in dom  # report.js ran to its end
    assert dom.count('class="heat"') == 2  # gradient flow and saturation
    assert dom.count("class=\"uplot") == len(run.CURVES) + 2 + 2  # statistics, loss/acc, theory
    assert all(f"> {m}</label>" in dom for m in MODULES)  # the module selector
