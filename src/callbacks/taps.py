"""LayerTaps: the hooks that see what the weights cannot tell: each recorded layer's output (the
pre-activation s), its gradient dL/ds (the back-propagated signal) and the output of the activation module
that runs after it. Every callback that needs these reads them from here.

Hooks do nothing unless `armed` (a recorded training step). A layer's output gets a tensor hook for its
gradient; the activation module that runs next after a layer (any registry activation, reused modules
included) is taken as that layer's. Tensors kept are the last micro-batch's: they stand for the step.
"""
from __future__ import annotations

from torch import Tensor, nn

from src.models.registry import ACTIVATION_BY_TYPE


class LayerTaps:
    def __init__(self, model: nn.Module, layers: list[nn.Module]):
        self.model, self.layers = model, layers
        n = len(layers)
        self.armed = False
        self.pre: list[Tensor | None] = [None] * n       # each layer's output, or its activation's input
        self.signals: list[Tensor | None] = [None] * n   # dL/d(layer output) of the last backward
        self.act_out: list[Tensor | None] = [None] * n   # the activation module's output
        self.act_of: dict[int, nn.Module] = {}           # layer -> the activation module after it
        self.direct: set[int] = set()                    # layers whose activation reads exactly their output
        self._last: int | None = None                    # the layer that ran last in this forward
        self._layer_hooks: list = []
        self._act_hooks: list = []

    def attach(self) -> "LayerTaps":
        for i, layer in enumerate(self.layers):
            self._layer_hooks.append(layer.register_forward_hook(self._layer_hook(i)))
        for m in self.model.modules():
            if type(m) in ACTIVATION_BY_TYPE:
                self._act_hooks.append(m.register_forward_hook(self._activation_hook))
        return self

    def detach(self) -> None:
        self.detach_activations()
        for h in self._layer_hooks:
            h.remove()
        self._layer_hooks.clear()

    def detach_activations(self) -> None:
        """Stop watching activation modules (a recorder that recomputes f(s) from `pre` needs no more)."""
        for h in self._act_hooks:
            h.remove()
        self._act_hooks.clear()

    def begin_forward(self) -> None:
        self._last = None

    def take_signals(self) -> list[Tensor | None]:
        """This backward's signals (None for a layer the loss did not reach), forgotten here."""
        signals, self.signals = self.signals, [None] * len(self.layers)
        return signals

    def release(self) -> None:
        """Forget the step's tensors so their memory can go."""
        self.pre = [None] * len(self.layers)
        self.act_out = [None] * len(self.layers)

    def _layer_hook(self, i: int):
        def keep_signal(g: Tensor):
            self.signals[i] = g

        def hook(module, inputs, out):
            if self.armed and module.training and out.requires_grad:
                self._last = i
                self.pre[i] = out
                # one tensor hook per layer: torch's register_multi_grad_hook wraps one per tensor itself
                out.register_hook(keep_signal)

        return hook

    def _activation_hook(self, module, inputs, out):
        i = self._last
        if self.armed and module.training and i is not None:
            self.act_of[i] = module
            self.act_out[i] = out
            if inputs[0] is self.pre[i]:
                self.direct.add(i)
            else:  # something between the layer and its activation (a norm): its real input is the pre-activation
                self.direct.discard(i)
                self.pre[i] = inputs[0]
