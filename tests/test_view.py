"""The curated runs view: the experiment tag the MLflow UI restores, read back from a real store; and, in
headless Chromium, the page `make ui` prints showing a multirun's children and our columns without a click."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from src.tracking import view
from tests.conftest import ROOT, free_port


def test_the_view_tag_reads_back_with_columns_charts_and_a_filter_mlflow_accepts(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("gradflow")
    for name, verdict in (("parent", None), ("activation=relu", "converged"), ("activation=sigmoid", "vanishing")):
        run = client.create_run(exp, run_name=name, tags={"verdict": verdict} if verdict else {}).info.run_id
        for module in ("layer_00", "layer_01", "encoder.layers.0.linear1"):
            for stat in ("grad_norm", "backprop_norm", "act_saturation", "update_ratio", "grad_mean"):
                client.log_metric(run, f"{stat}/{module}", 0.5, step=0)
        client.log_metric(run, "val/acc", 0.9, step=0)
    view.share(client, exp)

    state = view.decode(client.get_experiment(exp).tags[view.TAG])
    assert state["selectedColumns"][:3] == ["tags.`verdict`", "metrics.`val/acc`", "metrics.`backprop_ratio`"]
    assert state["orderByKey"] == "metrics.`val/acc`" and state["orderByAsc"] is False
    shown = {c["displayName"]: c["selectedMetricKeys"] for c in state["compareRunCharts"] if not c["deleted"]}
    modules = ["encoder.layers.0.linear1", "layer_00", "layer_01"]
    for stat in ("backprop_norm", "grad_norm", "act_saturation", "update_ratio"):
        assert shown[stat] == [f"{stat}/{m}" for m in modules]  # one chart, every module
    hidden = {c["metricKey"] for c in state["compareRunCharts"] if c["deleted"]}
    assert {f"grad_mean/{m}" for m in modules} <= hidden and "val/acc" not in hidden
    sections = {s["uuid"] for s in state["compareRunSections"]}
    assert {c["metricSectionId"] for c in state["compareRunCharts"]} <= sections
    # the table's filter is one MLflow accepts, and it leaves the runs with a verdict
    found = client.search_runs([exp], state["searchFilter"])
    assert sorted(r.info.run_name for r in found) == ["activation=relu", "activation=sigmoid"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium package (headless browser)")
def test_make_ui_opens_on_the_children_and_the_columns(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "BROWSER": "true"}  # BROWSER: no window from make ui
    grid = subprocess.run(
        [sys.executable, "-m", "src.train", "-m", "activation=sigmoid,relu", "init=xavier,he", "trainer.max_epochs=1",
         "trainer.log_every_n_steps=5", "trainer.enable_progress_bar=false", "tracking.plots=false",
         f"hydra.sweep.dir={tmp_path / 'multirun'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert grid.returncode == 0, grid.stderr[-3000:]

    log = open(tmp_path / "ui.log", "w")
    ui = subprocess.Popen([sys.executable, "-m", "src.tracking.ui", "--port", str(free_port())], cwd=ROOT, env=env,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, url = time.monotonic() + 240, None
        while url is None and time.monotonic() < deadline and ui.poll() is None:
            time.sleep(1)
            url = next(iter(re.findall(r"MLflow UI: (\S+)", (tmp_path / "ui.log").read_text())), None)
        assert url and "viewStateShareKey=gradflow" in url and "workflowType=machine_learning" in url, \
            (tmp_path / "ui.log").read_text()[-2000:]
        dom = subprocess.run(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                              "--virtual-time-budget=30000", "--window-size=1600,1000", "--dump-dom", url],
                             capture_output=True, text=True, timeout=180).stdout
        # every child has its HTML report, served by the UI (as text: its artifact viewer draws it in a sandboxed
        # frame; tests/test_report.py draws the same page in Chromium)
        children = MlflowClient(uri).search_runs([runs_experiment(uri)], "tags.verdict LIKE '%'")
        assert len(children) == 4
        for child in children:
            served = urllib.request.urlopen(f"{url.split('/#')[0]}/get-artifact?path=report.html&run_uuid="
                                            f"{child.info.run_id}", timeout=30).read().decode()
            assert f"<b>{child.data.tags['verdict']}</b>" in served and "gradflow-data" in served
    finally:
        os.killpg(ui.pid, signal.SIGTERM)  # make ui's process group: the UI server and its helpers
        ui.wait(timeout=30)
    for child in ("activation=sigmoid,init=xavier", "activation=sigmoid,init=he", "activation=relu,init=xavier",
                  "activation=relu,init=he"):
        assert f">{child}<" in dom, child
    for column in ("tags.`verdict`", "metrics.`val/acc`", "metrics.`backprop_ratio`"):
        assert f'col-id="{column}"' in dom, column


def runs_experiment(uri: str) -> str:
    return MlflowClient(uri).get_experiment_by_name("gradflow").experiment_id


@pytest.mark.slow
def test_a_multirun_to_a_server_leaves_the_view_on_its_experiment(mlflow_server, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    done = subprocess.run(
        [sys.executable, "-m", "src.train", "-m", "activation=sigmoid,relu", "trainer.max_steps=10",
         "trainer.log_every_n_steps=5", "trainer.enable_progress_bar=false", "tracking.plots=false",
         f"hydra.sweep.dir={tmp_path / 'multirun'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("gradflow")
    state = view.decode(exp.tags[view.TAG])
    assert sorted(r.info.run_name for r in client.search_runs([exp.experiment_id], state["searchFilter"])) == \
        ["activation=relu", "activation=sigmoid"]
    charted = {c["displayName"]: c["selectedMetricKeys"] for c in state["compareRunCharts"] if not c["deleted"]}
    assert len(charted["grad_norm"]) == 11  # every Linear of the default 10-layer MLP
    for run in client.search_runs([exp.experiment_id], state["searchFilter"]):  # the reports reached the server
        page = open(client.download_artifacts(run.info.run_id, "report.html")).read()
        assert f"<b>{run.data.tags['verdict']}</b>" in page
    assert f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs?viewStateShareKey=gradflow" in done.stdout
