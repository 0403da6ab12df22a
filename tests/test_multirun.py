"""Tier (e): the documented multirun as a subprocess against a real SQLite MLflow store."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from src.stats.names import LAYER_STATS
from tests.conftest import ROOT, runs_of


@pytest.mark.slow
def test_multirun_nests_four_children_under_one_parent(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    cmd = [sys.executable, "-m", "src.train", "-m", "activation=sigmoid,relu", "init=xavier,he",
           "trainer.max_steps=10", "trainer.log_every_n_steps=5", "trainer.enable_progress_bar=false",
           "tracking.plots=false", f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # one line per finished child, then their table and where to look
    lines = done.stdout.splitlines()
    at = next(i for i, line in enumerate(lines)
              if line.split() == ["run", "status", "verdict", "val/acc", "val/loss", "backprop_ratio"])
    table, look = lines[at + 1:at + 5], lines[at + 5]
    names = ["activation=sigmoid,init=xavier", "activation=sigmoid,init=he", "activation=relu,init=xavier",
             "activation=relu,init=he"]
    assert [row.split()[:2] for row in table] == [[n, "FINISHED"] for n in names]
    assert look.startswith("look: ") and look.endswith("/runs?viewStateShareKey=gradflow&workflowType=machine_learning")
    verdicts = [next(line for line in lines if line.startswith(f"{n}: ")).split()[1] for n in names]
    assert verdicts == [row.split()[2] for row in table]

    client, runs = runs_of(uri)
    parents = [r for r in runs if r.data.tags.get("gradflow.multirun") == "true"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == [
        "activation=relu,init=he", "activation=relu,init=xavier",
        "activation=sigmoid,init=he", "activation=sigmoid,init=xavier"]
    assert len(runs) == 5
    for child in children:
        assert child.info.status == "FINISHED"
        families = {k.split("/")[0] for k in child.data.metrics if "/layer_" in k}
        assert families == set(LAYER_STATS) | {"theory"}  # theory/chi1/layer_LL: the mean-field prediction
        assert {"train/loss", "train/acc", "backprop_ratio"} <= set(child.data.metrics)
        act, init = child.info.run_name.replace("activation=", "").replace("init=", "").split(",")
        assert (child.data.params["activation"], child.data.params["init"]) == (act, init)
        assert "hydra" in {a.path for a in client.list_artifacts(child.info.run_id)}
