"""Which modules of a model the statistics record, in order: every nn.Linear, as registered (input to
output for nn.Sequential). The one place that decides it, for the callbacks, the theory and the gradient
check alike."""
from __future__ import annotations

from torch import nn


def recorded_layers(model: nn.Module, who: str = "the statistics") -> list[nn.Linear]:
    """The model's nn.Linear layers; a ValueError naming `who` when there is none."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError(f"{who} found no nn.Linear layer in {type(model).__name__}")
    return layers
