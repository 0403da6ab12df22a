"""RunProgressBar: one progress bar for the whole run, counted in optimizer steps, with the loss and the live
`backprop_ratio`. No sanity-check or validation bars: Lightning's default draws one of those per epoch,
which buries the one line a person watches."""
from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, _update_n, convert_inf


class RunProgressBar(TQDMProgressBar):
    def init_sanity_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def on_train_epoch_start(self, trainer, *_) -> None:
        bar = self.train_progress_bar
        if trainer.current_epoch == 0 or bar.total is None:  # one bar, set up once, over every step of the run
            bar.reset(total=convert_inf(trainer.estimated_stepping_batches))
        bar.set_description(f"epoch {trainer.current_epoch}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n, bar = trainer.global_step, self.train_progress_bar
        if self._should_update(n, bar.total) and n != bar.n:  # n stays put while gradients accumulate
            _update_n(bar, n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer, pl_module) -> dict:
        """What Lightning shows (the metrics logged with prog_bar=True) without its version number, plus the
        last `backprop_ratio` the statistics logged (our logger keeps the run-level history)."""
        shown = {k: v for k, v in super().get_metrics(trainer, pl_module).items() if k != "v_num"}
        history = getattr(trainer.logger, "history", None) or {}
        if history.get("backprop_ratio"):
            shown["backprop_ratio"] = f"{history['backprop_ratio'][-1][1]:.2g}"
        return shown


class LastValidation(L.Callback):
    """The optimizer step of the run's latest validation (None before the first), known to every rank alike,
    unlike the metrics history only global rank 0 keeps."""

    def __init__(self):
        self.step: int | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step
