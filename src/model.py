"""The MLP and the LightningModule that trains it. Plain typed arguments only: no config objects here."""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from src import registry


def build_mlp(
    in_dim: int,
    out_dim: int,
    widths: list[int],
    activation: str,
    init: str,
    activation_params: dict | None = None,
    init_params: dict | None = None,
) -> nn.Sequential:
    """Linear -> activation blocks for each hidden width, then a Linear head (logits)."""
    if not widths or any(int(w) <= 0 for w in widths):
        raise ValueError(f"hidden widths must be positive integers, got {widths}")
    fill = registry.init_fn(init, **(init_params or {}))
    registry.activation(activation, **(activation_params or {}))  # fail before building anything
    layers: list[nn.Module] = []
    sizes = [in_dim, *widths]
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), registry.activation(activation, **(activation_params or {}))]
    layers.append(nn.Linear(sizes[-1], out_dim))
    if init != "torch_default":
        for layer in layers:
            if isinstance(layer, nn.Linear):
                fill(layer.weight)
                nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class Classifier(L.LightningModule):
    """Cross-entropy classifier around any network; logs train/* each step and val/* each epoch."""

    def __init__(self, net: nn.Module, optimizer: str, optimizer_params: dict | None = None):
        super().__init__()
        self.net = net
        self.optimizer_name = optimizer
        self.optimizer_params = dict(optimizer_params or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, prefix: str, **log_kwargs) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log_dict({f"{prefix}/loss": loss, f"{prefix}/acc": acc}, **log_kwargs)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train", on_step=True, on_epoch=False, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val", on_step=False, on_epoch=True, prog_bar=True)

    def configure_optimizers(self):
        return registry.optimizer(self.optimizer_name, self.parameters(), **self.optimizer_params)
