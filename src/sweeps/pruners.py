"""VanishingPruner: stop a sweep's trial whose net cannot train, read from our statistics rather than from the
objective. A deep sigmoid net whose first layer receives a millionth of the output layer's signal, and whose
loss has not moved after an epoch, will not reach a better objective by its last epoch; Optuna's own pruners
compare objectives across trials and need several finished ones before they prune anything.

The trial's process reports, at each validation, `gradflow.backprop_ratio` (the last one logged) and
`gradflow.loss_ratio` (the last train loss over the first) as trial user attributes before it asks the pruner
(src.callbacks.pruning)."""
from __future__ import annotations

import optuna
from optuna.pruners import BasePruner

from src.callbacks.pruning import LOSS, RATIO, STEP


class VanishingPruner(BasePruner):
    def __init__(self, ratio_below: float = 1e-3, loss_above: float = 0.95, min_steps: int = 40):
        """Prune once `min_steps` optimizer steps are done, when backprop_ratio < `ratio_below` (the verdict's
        vanishing_ratio) and the train loss is still above `loss_above` of its first value."""
        if not (ratio_below > 0 and 0 < loss_above and min_steps >= 0):
            raise ValueError("VanishingPruner: ratio_below > 0, loss_above > 0 and min_steps >= 0, got "
                             f"{ratio_below}, {loss_above}, {min_steps}")
        self.ratio_below, self.loss_above, self.min_steps = ratio_below, loss_above, min_steps

    def reason(self, attrs: dict) -> str | None:
        """Why a trial with these user attributes cannot train, or None when it may."""
        ratio, loss, step = attrs.get(RATIO), attrs.get(LOSS), attrs.get(STEP, 0)
        if ratio is None or loss is None or step < self.min_steps:
            return None
        if ratio < self.ratio_below and loss > self.loss_above:
            return (f"backprop_ratio {ratio:.2g} < {self.ratio_below:g} and the loss still {loss:.2f} of its "
                    f"start at step {step}")
        return None

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return self.reason(trial.user_attrs) is not None
