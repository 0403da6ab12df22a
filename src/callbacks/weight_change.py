"""WeightChangeCallback: how much each recorded module's weights move, per step and over the whole run.

Seed 000 follows the stall and escape of a deep sigmoid net through each layer's mean |dW| per step; seed 004
compares the first layer's weights before and after training ((old - new) / lr and the percent change). The
gradient-statistics trace has ||dW|| / ||W|| but not these, so this small callback keeps them: one pre-step
copy of the weights and one reduction per module per recorded step, into weight_change.csv. It records the
modules the statistics record (the same selection), each module's weights taken together.
"""
from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import torch

from src.stats.modules import as_one, recorded_modules
from src.stats.names import module_key


class WeightChangeCallback(L.Callback):
    def __init__(self, every_n_steps: int = 1, log_every_n_steps: int = 10, csv_path: str | Path | None = None,
                 include: list[str] | None = None, exclude: list[str] | None = None, types: list[str] | None = None):
        """`csv_path` None: weight_change.csv in the Trainer's default_root_dir; include/exclude/types: which
        modules (src.stats.modules.recorded_modules)."""
        for name, v in (("every_n_steps", every_n_steps), ("log_every_n_steps", log_every_n_steps)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"weight change {name} must be a positive integer, got {v!r}")
        self.every_n_steps, self.log_every_n_steps = every_n_steps, log_every_n_steps
        self.csv_path = Path(csv_path) if csv_path else None
        self.selection = {"include": include, "exclude": exclude, "types": types}
        self.steps: list[int] = []
        self.mean_abs: list[np.ndarray] = []  # per recorded step: [modules] mean |W_after - W_before|
        self.totals: dict[str, np.ndarray] = {}
        self._before: list[torch.Tensor] | None = None

    def _weights(self) -> list[torch.Tensor]:
        """Each module's weights as one tensor (the parameter itself where it has one)."""
        return [as_one([p.detach() for p in r.params]) for r in self.recorded]

    def on_fit_start(self, trainer, pl_module):
        self.recorded = recorded_modules(pl_module, **self.selection, who=type(self).__name__)
        self.initial = [w.clone() for w in self._weights()]
        self.csv_path = self.csv_path or Path(trainer.default_root_dir) / "weight_change.csv"

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step % self.every_n_steps == 0:
            self._lr = optimizer.param_groups[0]["lr"]
            self._before = [w.clone() for w in self._weights()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._before is None:
            return
        step = trainer.global_step - 1  # the optimizer step just taken
        with torch.no_grad():
            change = torch.stack([(w - b).abs().mean() for w, b in zip(self._weights(), self._before)])
        self._before = None
        values = change.cpu().numpy()
        self.steps.append(step)
        self.mean_abs.append(values)
        if step % self.log_every_n_steps == 0:
            metrics = {module_key("weight_change/mean_abs", r.path): float(v) for r, v in zip(self.recorded, values)}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def on_fit_end(self, trainer, pl_module):
        lr = getattr(self, "_lr", None) or trainer.optimizers[0].param_groups[0]["lr"]
        with torch.no_grad():
            old = [w.double() for w in self.initial]
            new = [w.double() for w in self._weights()]
            self.totals = {
                # seed 004's "(old - new) / lr": the summed steps as if each had been lr * gradient
                "total_over_lr": np.array([((o - n) / lr).abs().mean().item() for o, n in zip(old, new)]),
                "pct_median": np.array([(100 * (o - n) / o).abs().median().item() for o, n in zip(old, new)]),
            }
        metrics = {module_key(f"weight_change/{k}", r.path): float(v)
                   for k, a in self.totals.items() for r, v in zip(self.recorded, a)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def artifacts(self) -> dict[str, Path]:
        """weight_change.csv (step, then one column per module, named by its path: its mean |dW| per recorded
        step)."""
        if self.csv_path is None or not self.steps:
            return {}
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", *(r.path for r in self.recorded)])
            for step, row in zip(self.steps, self.mean_abs):
                w.writerow([step, *(f"{v:.6g}" for v in row)])
        return {"weight_change": self.csv_path}


def read_weight_change(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(steps [T], mean |dW| [T, modules], the modules' names) from weight_change.csv."""
    with open(path) as f:
        names = f.readline().strip().split(",")[1:]
    table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    return table[:, 0].astype(np.int64), table[:, 1:], names
