"""VanishingPruner: a sweep's trial whose net cannot train is stopped after its first validation, recorded
PRUNED with the reason and its verdict; one that trains runs to its end."""
from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from src.callbacks.pruning import LOSS, RATIO, STEP
from src.sweeps.pruners import VanishingPruner
from tests.conftest import ROOT, runs_of


def test_the_rule():
    p = VanishingPruner(ratio_below=1e-3, loss_above=0.95, min_steps=40)
    assert "backprop_ratio 2.2e-06 < 0.001" in p.reason({RATIO: 2.2e-6, LOSS: 1.0, STEP: 44})
    assert p.reason({RATIO: 2.2e-6, LOSS: 1.0, STEP: 20}) is None  # too early to tell
    assert p.reason({RATIO: 2.2e-6, LOSS: 0.6, STEP: 44}) is None  # the loss moves: it trains, slowly
    assert p.reason({RATIO: 0.5, LOSS: 1.0, STEP: 44}) is None  # the signal arrives: not this pruner's case
    assert p.reason({LOSS: 1.0, STEP: 44}) is None  # no statistics recorded: never pruned on a guess
    with pytest.raises(ValueError, match="ratio_below > 0"):
        VanishingPruner(ratio_below=0)


@pytest.mark.slow
def test_a_grid_with_the_pruner_stops_the_deep_sigmoid_and_runs_the_relu(tmp_path):
    storage, uri = f"journal:{tmp_path}/o.journal", f"sqlite:///{tmp_path}/mlflow.db"
    done = subprocess.run(
        [sys.executable, "-m", "src.train", "-m", "hparams_search=grid", "activation=sigmoid,relu", "init=he",
         "model.depth=10", "trainer.max_epochs=3", f"hydra.sweeper.storage={storage}",
         "hydra.sweeper.pruner={_target_: src.sweeps.pruners.VanishingPruner}", f"hydra.sweep.dir={tmp_path}/s"],
        cwd=ROOT, env=dict(os.environ, MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from src.sweeps.storage import open_storage

    trials = {t.params["activation"]: t for t in
              optuna.load_study(study_name="gradflow-grid", storage=open_storage(storage)).get_trials()}
    sigmoid, relu = trials["sigmoid"], trials["relu"]
    assert sigmoid.state == TrialState.PRUNED and sigmoid.user_attrs["pruned_at_epoch"] == 0
    assert sigmoid.user_attrs["pruned_reason"].startswith("backprop_ratio")
    assert relu.state == TrialState.COMPLETE and "pruned_reason" not in relu.user_attrs
    _, runs = runs_of(uri)
    pruned_run = next(r for r in runs if r.info.run_id == sigmoid.user_attrs["mlflow_run_id"])
    assert pruned_run.data.tags["verdict"] == "vanishing" and pruned_run.data.tags["optuna.pruned"] == "true"
