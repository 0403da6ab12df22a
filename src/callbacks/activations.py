"""How GradientStatsCallback records the activation statistics (act_mean, act_std, act_saturation): two
strategies behind one protocol, chosen after the first recorded step has shown which activation follows
which module.

  layers        the modules (indexes) that have an activation, in the order of flush()'s rows
  capacity      steps it can hold
  capture(k, taps)  at the end of a recorded step, into slot k
  flush(n)      [n, len(layers), 3] float32 for the steps in slots 0..n-1
  counts(n)     [n, len(layers)] float64: the activation entries each of those statistics covers
- KernelActivations: every activation is a module the compiled kernel knows (identity, ReLU, sigmoid, tanh)
  and its outputs are float32 on the CPU: one kernel call reduces the outputs at each step's end.
- BufferedActivations: otherwise the pre-activations are copied into ring buffers, grouped by activation,
  batch and width, and f(s) is recomputed from them at flush (the same op on the same input).
"""
from __future__ import annotations

import torch
from torch import Tensor

from src.callbacks.recorders import RING_MAX_NUMEL
from src.callbacks.taps import ActivationUse, ModuleTaps
from src.stats import fused
from src.stats import reductions as stats

# Activation statistics are computed this many elements of buffered pre-activations at a time, which bounds
# their temporaries (a fraction of the buffers, not another copy of them).
ACT_CHUNK_NUMEL = 1 << 21


def activation_recorder(taps: ModuleTaps, lib, threshold: float, capacity: int, device):
    """The strategy for what the taps saw on the first recorded step (None: no activation was seen). Drops
    the activation hooks when the strategy no longer needs them."""
    idx = sorted(taps.act_of)
    entries = [taps.act_of[i].entry for i in idx]
    outs = [taps.act_out[i] for i in idx]
    if lib is not None and idx and all(e.kernel_kind is not None for e in entries) and all(
            a is not None and a.device.type == "cpu" and a.dtype == torch.float32 for a in outs):
        return KernelActivations(lib, idx, [e.kernel_kind for e in entries],
                                 [threshold * e.max_derivative for e in entries], capacity)
    recorder = BufferedActivations(taps, idx, threshold, capacity, device) if idx else None
    if len(taps.direct) == len(taps.act_of):  # each reads its layer's output, which the layer hook keeps
        taps.detach_activations()
    return recorder


class KernelActivations:
    name = "kernel"

    def __init__(self, lib, layers: list[int], kinds: list[int], limits: list[float], capacity: int):
        self.layers, self.capacity = layers, capacity
        self._kernel = fused.ActivationPass(lib, kinds, limits)
        self._sums = torch.zeros(capacity, len(layers), len(stats.FUSED_ACT_SUMS), dtype=torch.float64)

    def capture(self, k: int, taps: ModuleTaps) -> None:
        self._kernel([taps.act_out[i] for i in self.layers], self._sums[k])

    def flush(self, n: int) -> Tensor:
        return stats.activation_stats_from_sums(self._sums[:n])

    def counts(self, n: int) -> Tensor:
        return self._sums[:n, :, stats.FUSED_ACT_SUMS.index("count")]


class _Group:
    """Modules with the same activation (function and options), rows and width: one ring buffer of their
    pre-activations [capacity, modules, rows, width]."""

    def __init__(self, layers: list[int], use: ActivationUse, buf: Tensor):
        self.layers, self.buf = layers, buf
        self.entry, self.f = use.entry, use.f


class BufferedActivations:
    name = "buffered"

    def __init__(self, taps: ModuleTaps, idx: list[int], threshold: float, capacity: int, device):
        self.threshold, self.device = threshold, device
        by_key: dict[tuple, list[int]] = {}
        for i in idx:  # registry activations hold no weights: the same type and options are the same f
            pre = taps.pre[i].detach()
            key = (taps.act_of[i].key, pre.numel() // pre.shape[-1], pre.shape[-1], pre.dtype)
            by_key.setdefault(key, []).append(i)
        per_step = sum(len(g) * taps.pre[g[0]].numel() for g in by_key.values())
        # big batches x wide layers: buffer fewer steps (the gradient buffers are then only part-used)
        self.capacity = max(1, min(capacity, RING_MAX_NUMEL // max(per_step, 1)))
        self.groups = []
        for g in by_key.values():
            pre = taps.pre[g[0]]
            buf = torch.zeros(self.capacity, len(g), pre.numel() // pre.shape[-1], pre.shape[-1], dtype=pre.dtype,
                              device=device)
            self.groups.append(_Group(g, taps.act_of[g[0]], buf))
        self.layers = [i for grp in self.groups for i in grp.layers]
        self._rows = [0] * self.capacity  # real samples in each slot (a short last batch fills fewer)
        self._views()

    def _views(self) -> None:
        """Per slot, the full-batch view of every layer's buffer row: no indexing op per step."""
        self._slot = [[grp.buf[k, j] for grp in self.groups for j in range(len(grp.layers))]
                      for k in range(self.capacity)]
        self._batch = min(grp.buf.shape[2] for grp in self.groups)

    def _grow(self, batch: int) -> None:
        """A bigger batch than the buffers hold: bigger buffers, the steps already in them kept."""
        for grp in self.groups:
            old = grp.buf
            grp.buf = old.new_zeros(*old.shape[:2], batch, old.shape[3])
            grp.buf[:, :, :old.shape[2]] = old
        self._views()

    def capture(self, k: int, taps: ModuleTaps) -> None:
        """Copy the step's pre-activations (the last micro-batch's) into slot k, in one op."""
        pres = [taps.pre[i] for i in self.layers]
        pres = [p if p is None or p.dim() == 2 else p.flatten(0, -2) for p in pres]
        batch = max((p.shape[0] for p in pres if p is not None), default=0)
        if batch > self._batch:
            self._grow(batch)
        views = self._slot[k]
        if all(p is not None and p.shape[0] == self._batch for p in pres):
            srcs, dsts = pres, views
        else:  # a short batch (the last of an epoch): the rows past it are masked at flush
            srcs = [p for p in pres if p is not None]
            dsts = [v[:p.shape[0]] for p, v in zip(pres, views) if p is not None]
        if srcs:
            with torch.no_grad():
                torch._foreach_copy_(dsts, srcs)
        self._rows[k] = batch

    def counts(self, n: int) -> Tensor:
        rows = torch.tensor(self._rows[:n], dtype=torch.float64)
        widths = torch.tensor([grp.buf.shape[3] for grp in self.groups for _ in grp.layers], dtype=torch.float64)
        return rows[:, None] * widths

    def flush(self, n: int) -> Tensor:
        rows = torch.tensor(self._rows[:n], device=self.device)
        out = []
        for grp in self.groups:
            full = bool((rows == grp.buf.shape[2]).all())
            buf = grp.buf[:n]
            chunk = max(1, ACT_CHUNK_NUMEL // buf[0].numel())
            out.append(torch.cat([stats.stacked_activation_stats(
                b, grp.f, grp.entry.derivative, grp.entry.max_derivative, self.threshold,
                rows=None if full else r) for b, r in zip(buf.split(chunk), rows.split(chunk))]))
        return torch.cat(out, dim=1)
