"""OptunaPruning: in a sweep's trial, report the objective to the study after each validation and stop the
trial cleanly when the study's pruner says so. A pruned trial records the epoch in its user attribute
`pruned_at_epoch`, which is how its worker learns of it, and why in `pruned_reason`. For a pruner that reads
our statistics (src.sweeps.pruners.VanishingPruner) it first reports the run's signal as user attributes. The sweep worker names the trial of a process in
$GRADFLOW_TRIAL (src/sweeps/trial.py builds this callback from it)."""
from __future__ import annotations

import lightning as L

TRIAL_ENV = "GRADFLOW_TRIAL"
PRUNED_AT = "pruned_at_epoch"
PRUNED_REASON = "pruned_reason"
# the run's signal as trial user attributes, for a pruner that reads it
RATIO, LOSS, STEP = "gradflow.backprop_ratio", "gradflow.loss_ratio", "gradflow.step"


class OptunaPruning(L.Callback):
    def __init__(self, trial, metric: str):
        """`trial`: the optuna.Trial this run is; `metric`: the objective it reports."""
        self.trial, self.metric = trial, metric

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        prune = self._prune(trainer) if trainer.is_global_zero else False
        if trainer.world_size > 1:  # rank 0 asks the study; every rank must stop at the same step
            prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            trainer.should_stop = True  # a clean stop: the MLflow run ends FINISHED; the worker tags it

    def _prune(self, trainer) -> bool:
        """Report the objective; True when the study's pruner stops this trial (recorded in its attributes)."""
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            return False
        pruner = self.trial.study.pruner
        signal = _signal(trainer) if hasattr(pruner, "reason") else {}  # a pruner that reads our statistics
        for key, v in signal.items():
            self.trial.set_user_attr(key, v)
        self.trial.report(float(value), step=trainer.current_epoch)
        if self.trial.should_prune():
            self.trial.set_user_attr(PRUNED_AT, trainer.current_epoch)
            why = pruner.reason(signal) if signal else None
            self.trial.set_user_attr(PRUNED_REASON, why or f"{type(pruner).__name__} at epoch {trainer.current_epoch}")
            return True
        return False


def _signal(trainer) -> dict:
    """The run's latest backprop_ratio and its train loss relative to the first, from our logger's history."""
    history = getattr(trainer.logger, "history", None) or {}
    out: dict = {STEP: trainer.global_step}
    if history.get("backprop_ratio"):
        out[RATIO] = history["backprop_ratio"][-1][1]
    loss = history.get("train/loss")
    if loss and loss[0][1] > 0:
        out[LOSS] = loss[-1][1] / loss[0][1]
    return out
