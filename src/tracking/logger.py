"""MlflowAsyncLogger: the Lightning logger of a run, handing metrics to the run's AsyncRunWriter and keeping
the run-level scalars (train/*, val/*) in memory for the end-of-run figures and the verdict."""
from __future__ import annotations

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from src.stats.names import is_module_key
from src.tracking.writer import AsyncRunWriter


class MlflowAsyncLogger(Logger):
    def __init__(self, writer: AsyncRunWriter, experiment: str):
        super().__init__()
        self.writer, self._experiment = writer, experiment
        self.history: dict[str, list[tuple[int, float]]] = {}

    @property
    def name(self) -> str:
        return self._experiment

    @property
    def version(self) -> str:
        return self.writer.run_id

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = int(step or 0)
        for k, v in metrics.items():
            if not is_module_key(k):
                self.history.setdefault(k, []).append((step, float(v)))
        self.writer.log_metrics(metrics, step)

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the resolved Hydra config is logged as params when the run starts
