"""OptunaPruning: in a sweep's trial, report the objective to the study after each validation and stop the
trial cleanly when the study's pruner says so.

The sweep worker names the trial in $GRADFLOW_TRIAL (JSON: storage, study, trial id, objective, pruner) of
the trial's process, so train() finds it without a global; outside a sweep the variable is unset. A pruned
trial records the epoch in its user attribute `pruned_at_epoch`, which is how the worker learns of it.
"""
from __future__ import annotations

import json
import os

import lightning as L
import optuna

TRIAL_ENV = "GRADFLOW_TRIAL"
PRUNED_AT = "pruned_at_epoch"


class OptunaPruning(L.Callback):
    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial, self.metric = trial, metric

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if trainer.sanity_checking or value is None:
            return
        self.trial.report(float(value), step=trainer.current_epoch)
        if self.trial.should_prune():
            self.trial.set_user_attr(PRUNED_AT, trainer.current_epoch)
            trainer.should_stop = True  # a clean stop: the MLflow run ends FINISHED; the worker tags it


def trial_spec(storage: str | None, study: str, trial_id: int, metric: str, pruner: dict | None) -> str:
    """The value of $GRADFLOW_TRIAL for one trial."""
    return json.dumps({"storage": storage, "study": study, "trial_id": trial_id, "metric": metric,
                       "pruner": pruner})


def from_environment() -> list[L.Callback]:
    """[OptunaPruning] for the trial this process runs, when its study has a pruner; else []."""
    spec = os.environ.get(TRIAL_ENV)
    if not spec or not json.loads(spec).get("pruner"):
        return []
    from hydra.utils import instantiate

    from src.sweeps.storage import open_storage

    spec = json.loads(spec)
    study = optuna.load_study(study_name=spec["study"], storage=open_storage(spec["storage"]),
                              pruner=instantiate(spec["pruner"]))
    return [OptunaPruning(optuna.Trial(study, spec["trial_id"]), spec["metric"])]
