"""The sweep report's page (src.report.sweep): self-contained, every point with its verdict and a link to its
MLflow run, heatmap facets titled once, a sortable table; drawn in headless Chromium; and attached to a plain
Hydra multirun's parent run."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from src.sweeps import report
from src.tracking.multirun import swept_values
from tests.conftest import ROOT, runs_of

AXES = {"activation": ["sigmoid", "tanh", "relu"], "init": ["xavier", "he"], "model.depth": [2, 5, 10]}
URI = "sqlite:////tmp/mlflow.db"


def _study() -> optuna.Study:
    """The main grid, 18 points: one retried after a failure, one failed in its only attempt, one with no run."""
    study = optuna.create_study(direction="maximize", study_name="grid")
    dist = {k: CategoricalDistribution(v) for k, v in AXES.items()}
    for act in AXES["activation"]:
        for init in AXES["init"]:
            for depth in AXES["model.depth"]:
                p, ratio = {"activation": act, "init": init, "model.depth": depth}, 0.5 ** (depth * (act != "relu"))
                run = "" if (act, init, depth) == ("relu", "he", 2) else uuid.uuid4().hex
                failed = (act, init, depth) in (("relu", "he", 10), ("tanh", "xavier", 10))
                if failed:
                    study.add_trial(optuna.create_trial(state=TrialState.FAIL, params=p, distributions=dist,
                                                        user_attrs={"error": "worker died", "mlflow_run_id": run}))
                if not failed or act == "relu":
                    study.add_trial(optuna.create_trial(value=1 - ratio / 2, params=p, distributions=dist, user_attrs={
                        "verdict": "vanishing" if ratio < 1e-2 else "converged", "backprop_ratio_init": ratio,
                        "mlflow_run_id": run}))
    return study


@pytest.fixture
def page(tmp_path) -> tuple[Path, optuna.Study]:
    study = _study()
    paths, _ = report.write(study, tmp_path, "val/acc", URI, "7")
    assert [p.name for p in paths] == ["report.csv", "report.html"]
    return tmp_path / "report.html", study


def test_the_page_is_self_contained_and_links_every_point_with_a_run_to_it(page):
    path, study = page
    text = path.read_text()
    assert not re.search(r"<(script|link|img)[^>]*\s(src|href)=", text)
    base = "http://127.0.0.1:5000/#/experiments/7/runs/"
    assert {u[:len(base)] for u in re.findall(r"https?://[^\s'\"<>]+", text)} == {base}  # the run links only
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", text.split("<h2>Points")[1])]
    by_point = {tuple(cells[:3]): "".join(cells) for cells in rows[1:]}
    assert len(by_point) == 18
    for t in study.trials:  # a point's row: the verdict of its COMPLETE trial, a link where it has a run
        row, run = by_point[tuple(str(v) for v in t.params.values())], t.user_attrs["mlflow_run_id"]
        assert t.user_attrs.get("verdict", "") in row
        assert (f"data-route='/#/experiments/7/runs/{run}?workflowType=machine_learning'" in row) == bool(run)
        if run:  # and both heatmaps' cells
            assert text.count(f"data-route='/#/experiments/7/runs/{run}?") >= 3  # the best one: the summary too
    assert "<table class='sortable'>" in text
    assert len(text.encode()) < 60_000  # a few tens of KB for 18 points


def test_facets_are_titled_once_on_one_colour_scale_and_failures_say_so(page):
    text = page[0].read_text()
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", text)
    assert captions == [f"model.depth={d}" for d in AXES["model.depth"]] * 2  # objective, backprop_ratio
    assert text.count("rows activation, columns init, one table per model.depth") == 2
    heats = re.findall(r"<table class='heat' ([^>]*)>", text)
    assert len(heats) == 6 and len(set(heats[:3])) == 1 and len(set(heats[3:])) == 1 and heats[0] != heats[3]
    assert "data-log='true'" in heats[3]
    assert ">fail</a></td>" in text  # tanh, xavier, depth 10: no value, its state instead


def test_a_servers_password_stays_out_of_the_links(tmp_path):
    report.write(_study(), tmp_path, "val/acc", "https://me:secret@mlflow.example.org/", "7")
    text = (tmp_path / "report.html").read_text()
    assert "secret" not in text and "href='https://me:***@mlflow.example.org/#/experiments/7/runs/" in text


def test_a_multiruns_point_comes_from_its_params_or_else_its_runs_name():
    run = SimpleNamespace(info=SimpleNamespace(run_name="model=resnet,+cure=clip,activation=relu"),
                          data=SimpleNamespace(params={"activation": "relu", "model.depth": "5"}))
    assert swept_values(run, ["model", "cure", "activation", "model.depth"]) == {
        "model": "resnet", "cure": "clip", "activation": "relu", "model.depth": "5"}


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("chromium"), reason="needs chromium")
def test_chromium_draws_the_page(page):
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", page[0].as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert re.search(r"<body[^>]*data-drawn=\"true\"", dom)
    heatmaps = dom.split("<h2>Points")[0]
    cells = re.findall(r"<td data-v=\"([^\"]*)\"[^>]*>", heatmaps)
    coloured = re.findall(r"<td data-v=\"[^\"]+\"[^>]*style=\"background: rgb", heatmaps)
    assert len(coloured) == sum(v != "" for v in cells) == 2 * 17  # every point with a value, in both heatmaps
    assert dom.count("class=\"legend\"") == 2  # the shared colour scale of each heatmap


@pytest.mark.slow
def test_a_multiruns_parent_gets_the_report(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "src.train", "-m", "activation=sigmoid,relu", "init=xavier,he", "model.depth=2",
           "model.width=16", "trainer.max_epochs=1", "+trainer.limit_train_batches=8", "+trainer.limit_val_batches=2",
           "trainer.enable_progress_bar=false", "tracking.plots=false", f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "could not attach" not in done.stderr
    client, runs = runs_of(uri)
    parent = next(r for r in runs if r.data.tags.get("gradflow.multirun") == "true")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert "report.html" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    text = Path(client.download_artifacts(parent.info.run_id, "report.html")).read_text()
    assert text == (tmp_path / "multirun" / "report.html").read_text()
    assert len(children) == 4 and parent.info.status == "FINISHED"
    for child in children:
        assert f"/#/experiments/{parent.info.experiment_id}/runs/{child.info.run_id}?" in text
        assert child.data.tags["verdict"] in text
    assert re.findall(r"<figcaption>(.*?)</figcaption>", text) == []  # two axes: one table per heatmap, no facets
    assert text.count("<table class='heat'") == 2 and "rows activation, columns init;" in text


def test_a_phase_sweep_gets_the_diagram_with_the_theory_line_and_a_spectrum_sweep_its_charts(tmp_path):
    """Axes sigma_w^2 x depth: a table of the objective with the cells beyond 6 xi_c outlined and the line's
    depth per column; step-0 Jacobian metrics over depth: the spread chart, one line per other axis."""
    import json

    import pandas as pd

    from src.report import sweep as sweep_page

    rows = [{"init.weight_var": w, "model.depth": d, "state": "COMPLETE", "objective": acc, "verdict": "healthy",
             "backprop_ratio_init": 1.0, "seconds": 1.0, "attempts": 1, "error": "", "mlflow_run_id": uuid.uuid4().hex}
            for w, d, acc in ((1.0, 10, 0.9), (1.0, 80, 0.1), (1.76, 10, 0.9), (1.76, 80, 0.7))]
    page = sweep_page.write(tmp_path / "phase.html", "trainability", pd.DataFrame(rows),
                            ["init.weight_var", "model.depth"], "val/acc", "maximize",
                            context={"activation.name": "tanh", "init.bias_std": "0.2236"}).read_text()
    assert "<h2>Phase diagram</h2>" in page and "critical σ_w² 1.76" in page
    assert page.count("class='beyond'") == 1  # depth 80 at sigma_w^2 = 1 (6 xi_c = 22)
    assert "<th>6 ξ_c</th><td>21.8</td>" in page and "4 of 4 points are on the side the theory predicts" in page
    assert "Jacobian spectrum" not in page

    spec = [{"activation": a, "model.depth": d, "state": "COMPLETE", "objective": 0.9, "verdict": "healthy",
             "backprop_ratio_init": 1.0, "seconds": 1.0, "attempts": 1, "error": "", "mlflow_run_id": "",
             "jacobian/max_sv": top, "jacobian/mean_sq_sv": 1.0}
            for a, d, top in (("tanh", 2, 1.2), ("tanh", 32, 1.9), ("relu", 2, 1.5), ("relu", 32, 12.0))]
    page = sweep_page.write(tmp_path / "spectrum.html", "isometry", pd.DataFrame(spec), ["activation", "model.depth"],
                            "val/acc", "maximize").read_text()
    data = json.loads(re.search(r"id='gradflow-data'>(.*?)</script>", page, re.S)[1])
    spread = next(c for c in data["charts"] if c["title"].startswith("max σ²"))
    assert spread["x"] == [2, 32] and [s["label"] for s in spread["series"]] == ["activation=relu", "activation=tanh"]
    assert spread["series"][0]["y"] == [2.25, 144] and "Phase diagram" not in page
