"""Several processes training at once against one new embedded SQLite store."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, runs_of

STEPS = 100


@pytest.mark.slow
def test_four_parallel_runs_on_a_fresh_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # does not exist yet: all four race to create it
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "src.train", f"seed={i}", f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1",
         "stats.log_every_n_steps=1",
         "trainer.enable_progress_bar=false", "tracking.plots=false", f"hydra.run.dir={tmp_path / str(i)}"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(4)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(e[-1500:] for e in errors)
    client, runs = runs_of(uri)
    assert len(runs) == 4
    for run in runs:
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == STEPS
        assert len(client.get_metric_history(run.info.run_id, "grad_norm/layer_00")) == STEPS
