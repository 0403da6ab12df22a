"""HistogramCallback: every `every_n_steps` optimizer steps, log10|x| histograms of each recorded module's
weight gradient, back-propagated signal dL/ds and activation output (src.stats.histograms), into
histograms.parquet. It records the modules the statistics record (the same selection). Its taps are attached
on the steps it records only and detached after, so the steps in between cost nothing."""
from __future__ import annotations

from pathlib import Path

import lightning as L

from src.callbacks.taps import ModuleTaps
from src.stats.histograms import HistogramWriter, log10_histograms
from src.stats.modules import as_one, recorded_modules


class HistogramCallback(L.Callback):
    def __init__(self, every_n_steps: int, path: str | Path | None = None, chunk_rows: int = 4096,
                 include: list[str] | None = None, exclude: list[str] | None = None, types: list[str] | None = None):
        """`path` None: histograms.parquet in the Trainer's default_root_dir; include/exclude/types: which
        modules (src.stats.modules.recorded_modules)."""
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps <= 0:
            raise ValueError(f"stats.histogram_every_n_steps must be a positive integer, got {every_n_steps!r}")
        self.every_n_steps, self.path, self.chunk_rows = every_n_steps, path, chunk_rows
        self.selection = {"include": include, "exclude": exclude, "types": types}
        self.writer: HistogramWriter | None = None
        self.taps: ModuleTaps | None = None
        self._step: int | None = None  # the step being recorded, None between recorded steps
        self._pending: dict = {}

    def setup(self, trainer, pl_module, stage):
        if stage == "fit":
            recorded = recorded_modules(pl_module, **self.selection, who=type(self).__name__)
            self.taps = ModuleTaps(pl_module, recorded)
            self.taps.armed = True  # attached only while a step is recorded
            self.path = Path(self.path or Path(trainer.default_root_dir) / "histograms.parquet")
            self.writer = HistogramWriter(self.path, self.chunk_rows)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if self._step is None and step % self.every_n_steps == 0:
            self._step, self._pending = step, {}
            self.taps.attach()
        if self._step is not None:
            self.taps.begin_forward()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self._step is None:
            return
        tensors = {}
        for i, r in enumerate(self.taps.recorded):  # the last micro-batch's signal and outputs stand for it
            if self.taps.signals[i]:
                tensors[(i, "backprop")] = as_one(self.taps.signals[i])
            if self.taps.act_out[i] is not None:
                tensors[(i, "act")] = self.taps.act_out[i]
            grads = [p.grad for p in r.params if p.grad is not None]
            if grads:  # before clipping, which would change them in place
                tensors[(i, "grad")] = as_one(grads)
        keys = sorted(tensors)
        if keys:
            self._pending = dict(zip(keys, log10_histograms([tensors[k] for k in keys])))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._step is None or trainer.global_step == self._step:  # mid-accumulation: keep the hooks
            return
        self.taps.detach()
        self.taps.take_signals()
        self.taps.release()
        for (i, quantity), counts in sorted(self._pending.items()):
            self.writer.append(self._step, i, self.taps.recorded[i].path, quantity, counts)
        self._pending, self._step = {}, None

    def teardown(self, trainer, pl_module, stage):
        if self.taps is not None:
            self.taps.detach()
        if self.writer is not None:
            self.writer.close()

    def on_exception(self, trainer, pl_module, exception):
        self.teardown(trainer, pl_module, "fit")  # the hooks go; what was written stays

    def artifacts(self) -> dict[str, Path]:
        """The files this callback wrote, by role: the histograms (closed first)."""
        path = self.writer.close() if self.writer is not None else None
        return {"histograms": path} if path else {}
