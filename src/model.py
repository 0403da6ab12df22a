"""The MLP and the LightningModules that train it. Plain typed arguments only: no config objects here."""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from src import registry

NORMS = ("none", "batch", "layer")


class Residual(nn.Module):
    """x + body(x): a skip connection around one hidden block (only where input and output widths match)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _norm(kind: str, width: int) -> list[nn.Module]:
    if kind not in NORMS:
        raise ValueError(f"unknown norm {kind!r}; valid: {', '.join(NORMS)}")
    return {"none": [], "batch": [nn.BatchNorm1d(width)], "layer": [nn.LayerNorm(width)]}[kind]


def build_mlp(
    in_dim: int,
    out_dim: int,
    widths: list[int],
    activation: str,
    init: str,
    activation_params: dict | None = None,
    init_params: dict | None = None,
    norm: str = "none",
    residual: bool = False,
    head_activation: str | None = None,
) -> nn.Sequential:
    """One hidden block per width, then a Linear head (logits, or `head_activation` of them).

    A hidden block is Linear -> norm -> activation: the norm (BatchNorm1d or LayerNorm, `norm`) acts on
    the pre-activation, where Ioffe & Szegedy put it, so it keeps sigmoid/tanh inputs out of saturation.
    With `residual`, a block whose input and output widths are equal computes x + block(x); a block that
    changes the width (always the first, from the input) has no skip, as there is nothing of its size to
    add. `widths=[]` is a net with no hidden layer (a linear or, with `head_activation`, a GLM-like model).
    """
    if any(int(w) <= 0 for w in widths):
        raise ValueError(f"hidden widths must be positive integers, got {widths}")
    fill = registry.init_fn(init, **(init_params or {}))
    registry.activation(activation, **(activation_params or {}))  # fail before building anything
    if head_activation is not None:
        registry.activation(head_activation)
    _norm(norm, 1)
    layers: list[nn.Module] = []
    sizes = [in_dim, *widths]
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        block = [nn.Linear(fan_in, fan_out), *_norm(norm, fan_out),
                 registry.activation(activation, **(activation_params or {}))]
        if residual and fan_in == fan_out:
            layers.append(Residual(nn.Sequential(*block)))
        else:
            layers += block
    layers.append(nn.Linear(sizes[-1], out_dim))
    if head_activation is not None:
        layers.append(registry.activation(head_activation))
    if init != "torch_default":
        for module in nn.Sequential(*layers).modules():
            if isinstance(module, nn.Linear):
                fill(module.weight)
                nn.init.zeros_(module.bias)
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
        self._step(batch, "val", on_step=False, on_epoch=True, prog_bar=True)

    def configure_optimizers(self):
        return registry.optimizer(self.optimizer_name, self.parameters(), **self.optimizer_params)


class Regressor(Classifier):
    """Mean squared error on real-valued targets (train/loss, val/loss; no accuracy)."""

    def _metrics(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": F.mse_loss(out, y.view_as(out))}
