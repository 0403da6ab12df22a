"""The LightningModules that train a network: cross-entropy classification and mean-squared-error
regression. They log train/* every step and val/* every epoch. Under several processes (DDP) train/* is global
rank 0's part of each batch; val/* is averaged over the ranks."""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from src.models import registry


class Classifier(L.LightningModule):
    """Cross-entropy classifier around any network."""

    def __init__(self, net: nn.Module, optimizer: str, optimizer_params: dict | None = None):
        super().__init__()
        self.net = net
        self.optimizer_name = optimizer
        self.optimizer_params = dict(optimizer_params or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _metrics(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": F.cross_entropy(out, y), "acc": (out.argmax(dim=1) == y).float().mean()}

    def _step(self, batch, prefix: str, **log_kwargs) -> torch.Tensor:
        x, y = batch
        metrics = self._metrics(self(x), y)
        self.log_dict({f"{prefix}/{k}": v for k, v in metrics.items()}, **log_kwargs)
        return metrics["loss"]

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train", on_step=True, on_epoch=False, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        # several processes: the mean over the ranks' parts of the set (one all-reduce per epoch); the objective
        # of a sweep must not be rank 0's part alone
        self._step(batch, "val", on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        return registry.optimizer(self.optimizer_name, self.parameters(), **self.optimizer_params)


class Regressor(Classifier):
    """Mean squared error on real-valued targets (train/loss, val/loss; no accuracy)."""

    def _metrics(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": F.mse_loss(out, y.view_as(out))}


TASKS: dict[str, type[Classifier]] = {"classification": Classifier, "regression": Regressor}
