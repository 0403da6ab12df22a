"""OptunaPruning: in a sweep's trial, report the objective to the study after each validation and stop the
trial cleanly when the study's pruner says so. A pruned trial records the epoch in its user attribute
`pruned_at_epoch`, which is how its worker learns of it. The sweep worker names the trial of a process in
$GRADFLOW_TRIAL (src/sweeps/trial.py builds this callback from it)."""
from __future__ import annotations

import lightning as L

TRIAL_ENV = "GRADFLOW_TRIAL"
PRUNED_AT = "pruned_at_epoch"


class OptunaPruning(L.Callback):
    def __init__(self, trial, metric: str):
        """`trial`: the optuna.Trial this run is; `metric`: the objective it reports."""
        self.trial, self.metric = trial, metric

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if trainer.sanity_checking or value is None:
            return
        self.trial.report(float(value), step=trainer.current_epoch)
        if self.trial.should_prune():
            self.trial.set_user_attr(PRUNED_AT, trainer.current_epoch)
            trainer.should_stop = True  # a clean stop: the MLflow run ends FINISHED; the worker tags it
