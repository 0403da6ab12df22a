"""ModuleTaps: the hooks that see what the weights cannot tell: each recorded module's output, its gradient
dL/d(output) (the back-propagated signal) and the activation applied after it. Every callback that needs
these reads them from here.

- The signal is taken at a module's output; for a tuple output (attention, recurrent nets), at its first
  tensor. nn.MultiheadAttention applies its `out_proj` as a function, so that Linear's own hook never runs:
  its signal is the attention's output, which is exactly out_proj's.
- A module that runs several times in one forward (shared weights) gets one signal per call; their squared
  norms add up, as the calls' gradients add up in its weights. Its output and activation are the last call's.
- The activation of a module is the registry activation module that runs next after it (reused modules
  included), or, inside nn.TransformerEncoderLayer / DecoderLayer built with a string or function
  activation, that function applied to `linear1`'s output. An activation applied as a function anywhere else
  cannot be seen: such modules get no act_* statistics.
Hooks do nothing unless `armed` (a recorded training step). Tensors kept are the last micro-batch's: they
stand for the step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from src.models.registry import ACTIVATION_BY_FUNCTION, ACTIVATION_BY_TYPE, Activation
from src.stats.modules import Recorded


@dataclass(frozen=True)
class ActivationUse:
    """An activation as applied after a module: its registry entry, the function that recomputes it from
    the module's output, and a key equal for uses that compute the same function."""
    entry: Activation
    f: Callable[[Tensor], Tensor]
    key: tuple

    @classmethod
    def of_module(cls, m: nn.Module) -> "ActivationUse":
        # an in-place activation (ReLU(inplace=True)) would overwrite what it reads: give it a copy
        f = (lambda s: m(s.clone())) if getattr(m, "inplace", False) else m.forward
        return cls(ACTIVATION_BY_TYPE[type(m)], f, (type(m), m.extra_repr()))


def first_tensor(out) -> Tensor | None:
    """The tensor a module's output stands for: itself, or the first tensor of a tuple (a PackedSequence's
    data); None for anything else."""
    while isinstance(out, (tuple, list)) and len(out):
        out = out[0]
    return out if isinstance(out, Tensor) else None


def signal_sources(model: nn.Module, recorded: list[Recorded]) -> list[nn.Module]:
    """For each recorded module, the module whose output carries its signal."""
    parent = {id(m.out_proj): m for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return [parent.get(id(r.module), r.module) for r in recorded]


def functional_activations(recorded: list[Recorded], model: nn.Module) -> dict[int, ActivationUse]:
    """Recorded `linear1` layers of transformer layers whose activation is a known function, by index."""
    index = {id(r.module): i for i, r in enumerate(recorded)}
    out = {}
    for m in model.modules():
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and id(m.linear1) in index:
            entry = ACTIVATION_BY_FUNCTION.get(m.activation) if not isinstance(m.activation, nn.Module) else None
            if entry is not None:
                out[index[id(m.linear1)]] = ActivationUse(entry, m.activation, (m.activation,))
    return out


class ModuleTaps:
    def __init__(self, model: nn.Module, recorded: list[Recorded]):
        self.model, self.recorded = model, recorded
        n = len(recorded)
        self.armed = False
        self.pre: list[Tensor | None] = [None] * n          # each module's output, or its activation's input
        self.signals: list[list[Tensor]] = [[] for _ in range(n)]  # dL/d(output) of this backward, per call
        self.act_out: list[Tensor | None] = [None] * n      # the activation module's output
        self.act_of: dict[int, ActivationUse] = {}          # module index -> the activation after it
        self.direct: set[int] = set()                       # modules whose activation reads exactly their output
        self._functional = functional_activations(recorded, model)
        sources = signal_sources(model, recorded)
        self._fed: dict[int, tuple[nn.Module, list[int]]] = {}  # source module -> the indexes it feeds
        for i, src in enumerate(sources):
            self._fed.setdefault(id(src), (src, []))[1].append(i)
        self._last: int | None = None                       # the module that ran last in this forward
        self._uses: dict[int, ActivationUse] = {}            # activation module -> its use, made once
        self._module_hooks: list = []
        self._act_hooks: list = []

    def attach(self) -> "ModuleTaps":
        for src, idx in self._fed.values():
            self._module_hooks.append(src.register_forward_hook(self._module_hook(idx)))
        for m in self.model.modules():
            if type(m) in ACTIVATION_BY_TYPE:
                self._act_hooks.append(m.register_forward_hook(self._activation_hook))
        return self

    def detach(self) -> None:
        self.detach_activations()
        for h in self._module_hooks:
            h.remove()
        self._module_hooks.clear()

    def detach_activations(self) -> None:
        """Stop watching activation modules (a recorder that recomputes f(s) from `pre` needs no more)."""
        for h in self._act_hooks:
            h.remove()
        self._act_hooks.clear()

    def begin_forward(self) -> None:
        self._last = None

    def take_signals(self) -> list[list[Tensor]]:
        """This backward's signals (an empty list for a module the loss did not reach), forgotten here."""
        signals, self.signals = self.signals, [[] for _ in self.recorded]
        return signals

    def release(self) -> None:
        """Forget the step's tensors so their memory can go."""
        self.pre = [None] * len(self.recorded)
        self.act_out = [None] * len(self.recorded)

    def _module_hook(self, idx: list[int]):
        def keep_signal(g: Tensor):
            for i in idx:
                self.signals[i].append(g)

        def hook(module, inputs, out):
            if not (self.armed and module.training):
                return
            out = first_tensor(out)
            if out is None or not out.requires_grad:
                return
            self._last = idx[-1]
            for i in idx:
                self.pre[i] = out
                if i in self._functional:
                    self.act_of[i] = self._functional[i]
                    self.direct.add(i)
            # one tensor hook per output: torch's register_multi_grad_hook wraps one per tensor itself
            out.register_hook(keep_signal)

        return hook

    def _activation_hook(self, module, inputs, out):
        i = self._last
        if self.armed and module.training and i is not None and i not in self._functional:
            use = self._uses.get(id(module))
            if use is None:
                use = self._uses[id(module)] = ActivationUse.of_module(module)
            self.act_of[i] = use
            self.act_out[i] = out
            if inputs[0] is self.pre[i]:
                self.direct.add(i)
            else:  # something between the module and its activation (a norm): its real input is the pre-activation
                self.direct.discard(i)
                self.pre[i] = inputs[0]
