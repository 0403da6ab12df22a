"""Callbacks that end a run early for a stated reason: a non-finite loss (without failing the run), Ctrl-C.

Lightning's own options do not fit: `EarlyStopping(check_finite=True)` looks at a monitored metric only at
epoch or validation ends (hundreds of NaN steps late on digits), and `Trainer(detect_anomaly=True)`
raises, which would fail the run and the sweep trial. So this is a few lines of our own.
"""
from __future__ import annotations

import math
import signal
import sys
import threading

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class StopOnNonFiniteLoss(L.Callback):
    """Asks the Trainer to stop after the first training batch whose loss is NaN or infinite; the reason
    (with the optimizer step) is kept in `stop_reason` for the caller to record."""

    def __init__(self) -> None:
        self.stop_reason: str | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or self.stop_reason is not None:
            return
        value = float(loss.detach())
        broken = not math.isfinite(value)
        if trainer.world_size > 1:  # each rank has its own loss; all must stop at the same step, or the others
            broken = trainer.strategy.reduce_boolean_decision(broken, all=False)  # wait in the next all-reduce
        if broken:
            step = max(trainer.global_step - 1, 0)  # global_step already counts this batch's update
            where = f"({value})" if not math.isfinite(value) else "(on another process)"
            self.stop_reason = f"non-finite train/loss {where} at step {step}"
            trainer.should_stop = True
            _say(f"stopping: {self.stop_reason} (callbacks.nonfinite_guard=null trains on)")

    def tags(self) -> dict[str, str]:
        """The MLflow tag stop_reason, when the run was stopped."""
        return {"stop_reason": self.stop_reason} if self.stop_reason else {}


class CtrlCAtStepEnd(L.Callback):
    """Ctrl-C during fit takes effect at the end of the current batch, where Lightning's graceful shutdown (and
    ours: the run marked KILLED, exit 130) always starts. Python raises KeyboardInterrupt wherever the main
    thread is; inside a finalizer it is printed and ignored, and training went on. A second Ctrl-C interrupts
    at once, as usual."""

    def __init__(self) -> None:
        self._pressed = False
        self._previous = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._pressed, self._previous = False, signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        if self._pressed:
            raise KeyboardInterrupt
        self._pressed = True

    def on_train_batch_end(self, *_) -> None:
        if self._pressed:
            raise KeyboardInterrupt

    on_validation_batch_end = on_train_batch_end

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore()

    def _restore(self) -> None:
        # only our own handler: on Ctrl-C Lightning has already ignored SIGINT for its shutdown, and keeps that
        if self._previous is not None and signal.getsignal(signal.SIGINT) == self._on_sigint:
            signal.signal(signal.SIGINT, self._previous)
        self._previous = None


@rank_zero_only
def _say(message: str) -> None:
    print(message, file=sys.stderr)
