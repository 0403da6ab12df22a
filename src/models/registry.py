"""Names in config -> callables: activations, weight inits and optimizers. Unknown names fail and list the
valid ones.

Everything the product knows about an activation lives in its entry here: the module, its derivative as a
function of the pre-activation and that derivative's maximum (saturated and dead units are counted from them
without a second backward pass), which failure its flat regions mean to the diagnosis, and its number in the
compiled statistics kernel (src/stats/fused.c), which computes f' from the activation's output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class UnknownNameError(ValueError):
    """A config names an activation/init/optimizer that the registry does not know."""


def lookup(table: dict, kind: str, name: str):
    """table[name], or an UnknownNameError listing the valid names."""
    if name not in table:
        raise UnknownNameError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]


@dataclass(frozen=True)
class Activation:
    make: Callable[..., nn.Module]
    derivative: Callable[[Tensor], Tensor]  # f'(s) for pre-activation s
    max_derivative: float
    # what "f' near 0" means for a unit: "saturated" (a bounded unit on its flat tail), "dead" (a rectifier
    # that passes no gradient), or None (no flat region: never judged)
    family: str | None
    # the activation's number in fused.c (IDENTITY, RELU, SIGMOID, TANH), where f' is computed from f(s);
    # None: the kernel does not know it, and its statistics are recomputed from the buffered pre-activations
    kernel_kind: int | None = None

    @property
    def kinked(self) -> bool:
        """f' jumps at 0 (relu, leaky_relu, selu): a difference quotient across 0 measures neither side."""
        d = self.derivative(torch.tensor([-1e-9, 1e-9], dtype=torch.float64))
        return bool(abs(d[1] - d[0]) > 1e-6)


def _gelu_prime(s: Tensor) -> Tensor:
    cdf = 0.5 * (1.0 + torch.erf(s / math.sqrt(2.0)))
    return cdf + s * torch.exp(-0.5 * s * s) / math.sqrt(2.0 * math.pi)


_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772, 1.0507009873554805

ACTIVATIONS: dict[str, Activation] = {
    # p - p^2 and 1 - t^2 computed in the one new tensor: the statistics call these on big buffers
    "sigmoid": Activation(nn.Sigmoid, lambda s: (p := torch.sigmoid(s)).addcmul_(p, p, value=-1), 0.25,
                          "saturated", kernel_kind=2),
    "tanh": Activation(nn.Tanh, lambda s: (t := torch.tanh(s)).mul_(t).neg_().add_(1), 1.0, "saturated",
                       kernel_kind=3),
    # 1 where s > 0, else 0 (NaN stays NaN): one new tensor, 4x cheaper than a boolean mask made float
    "relu": Activation(nn.ReLU, lambda s: torch.sign(s).clamp_min_(0), 1.0, "dead", kernel_kind=1),
    # derivative uses the default slope; the saturation threshold (5% of max) counts leaky units < 0 as dead
    "leaky_relu": Activation(nn.LeakyReLU, lambda s: torch.where(s > 0, 1.0, 0.01).to(s.dtype), 1.0, "dead"),
    "elu": Activation(nn.ELU, lambda s: torch.where(s > 0, torch.ones_like(s), torch.exp(s)), 1.0, "dead"),
    "selu": Activation(
        nn.SELU,
        lambda s: _SELU_SCALE * torch.where(s > 0, torch.ones_like(s), _SELU_ALPHA * torch.exp(s)),
        _SELU_SCALE * _SELU_ALPHA, "dead",
    ),
    "gelu": Activation(nn.GELU, _gelu_prime, 1.1289, "dead"),  # max of GELU' at s ~ 1.414
    "softsign": Activation(nn.Softsign, lambda s: 1.0 / (1.0 + s.abs()) ** 2, 1.0, "saturated"),
    "identity": Activation(nn.Identity, torch.ones_like, 1.0, None, kernel_kind=0),
}

# nn.Module class -> registry entry, so the statistics can recognise activations in any user model.
ACTIVATION_BY_TYPE: dict[type, Activation] = {a.make: a for a in ACTIVATIONS.values()}
# The same activations as functions, as torch's transformer layers apply them (activation="relu" or F.gelu):
# only where the statistics know which module's output they are applied to (src/callbacks/taps.py).
ACTIVATION_BY_FUNCTION: dict[Callable, Activation] = {
    F.relu: ACTIVATIONS["relu"], torch.relu: ACTIVATIONS["relu"], F.gelu: ACTIVATIONS["gelu"],
    torch.tanh: ACTIVATIONS["tanh"], F.tanh: ACTIVATIONS["tanh"], torch.sigmoid: ACTIVATIONS["sigmoid"],
    F.sigmoid: ACTIVATIONS["sigmoid"], F.elu: ACTIVATIONS["elu"], F.selu: ACTIVATIONS["selu"],
    F.softsign: ACTIVATIONS["softsign"],
}


def activation(name: str, **params) -> nn.Module:
    return lookup(ACTIVATIONS, "activation", name).make(**params)


def _lecun_normal(w: Tensor) -> None:
    _scaled_normal(w, 1.0)


def _scaled_normal(w: Tensor, weight_var: float = 1.0) -> None:
    """N(0, weight_var / fan_in): the mean-field papers' sigma_w^2 = weight_var."""
    nn.init.normal_(w, 0.0, math.sqrt(weight_var / nn.init._calculate_fan_in_and_fan_out(w)[0]))


# Each takes the weight tensor plus the option's parameters and fills it in place; biases are drawn from
# N(0, bias_std^2) by init_weights, zero by default (torch_default keeps PyTorch's own bias init too).
INITS: dict[str, Callable[..., None]] = {
    "xavier_uniform": lambda w: nn.init.xavier_uniform_(w),
    "xavier_normal": lambda w: nn.init.xavier_normal_(w),
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu"),
    "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, mode="fan_in", nonlinearity="relu"),
    "lecun_normal": _lecun_normal,
    "scaled_normal": _scaled_normal,
    "normal": lambda w, std=1.0: nn.init.normal_(w, 0.0, std),
    "orthogonal": lambda w, gain=1.0: nn.init.orthogonal_(w, gain=gain),
    "torch_default": lambda w: None,
    "constant": lambda w, value=0.5: nn.init.constant_(w, value),
}


def init_fn(name: str, **params) -> Callable[[Tensor], None]:
    fn = lookup(INITS, "init", name)
    return lambda w: fn(w, **params)


# The modules whose weight matrices an init fills (and whose biases it zeroes): those that mix their inputs.
# Embeddings are lookup tables and norms start as the identity; both keep torch's init.
INIT_TYPES = (nn.Linear, nn.modules.conv._ConvNd, nn.RNNBase, nn.MultiheadAttention)


def init_weights(net: nn.Module, name: str, bias_std: float = 0.0, **params) -> None:
    """Fill every weight matrix (or kernel) of net's INIT_TYPES modules with init `name` and draw their
    biases from N(0, bias_std^2) (zero by default); torch_default changes nothing (PyTorch's own init, biases
    included)."""
    fill = init_fn(name, **params)
    if name == "torch_default":
        return
    for m in net.modules():
        if isinstance(m, INIT_TYPES):
            for pname, p in m.named_parameters(recurse=False):
                if p.dim() >= 2:
                    fill(p)
                elif "bias" in pname:
                    nn.init.normal_(p, 0.0, bias_std) if bias_std else nn.init.zeros_(p)


OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam,
}


def optimizer(name: str, params, **kwargs) -> torch.optim.Optimizer:
    return lookup(OPTIMIZERS, "optimizer", name)(params, **kwargs)
