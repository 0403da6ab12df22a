"""ThroughTime: the back-propagated signal through time of the recorded recurrent modules (nn.RNN, nn.LSTM,
nn.GRU), on the steps GradientStatsCallback arms it for.

On such a step its hooks keep each recurrent module's input and initial state (the last micro-batch's) and
the gradient of its output sequence; before the optimizer step, src.stats.recurrent turns them into
||dL/dh_t|| for every time step t of the top layer. Each step's norms go to the time trace (one row per
step, module and t) and its loggers get `backprop_time_ratio/<module>` = ||dL/dh_1|| / ||dL/dh_T||, plus the
run-level `backprop_time_ratio` of the first recurrent module (the input side). Zeros are kept: in float32 a
signal that shrinks geometrically reaches exactly 0 within ~100 steps, and that is the finding.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from src.stats import recurrent
from src.stats.modules import Recorded
from src.stats.trace import TimeTraceWriter


class ThroughTime:
    def __init__(self, recorded: list[Recorded]):
        self.entries = [r for r in recorded if r.kind == "recurrent" and isinstance(r.module, nn.RNNBase)]
        self._step: int | None = None       # the step armed for, until finish()
        self._seen: dict[int, tuple] = {}   # entry -> (input, initial state) of its last forward
        self._grads: dict[int, object] = {}
        self._norms: dict[str, np.ndarray] = {}
        self._hooks: list = []
        self._file: TimeTraceWriter | None = None

    def open(self, path: Path, chunk_steps: int) -> None:
        if self.entries:
            self._file = TimeTraceWriter(path, chunk_steps)

    def arm(self, step: int) -> None:
        """Watch the recurrent modules during this step's forward and backward."""
        if not self.entries or self._step is not None:
            return
        self._step = step
        for i, r in enumerate(self.entries):
            self._hooks.append(r.module.register_forward_hook(self._hook(i), with_kwargs=True))

    def _hook(self, i: int):
        def hook(module, args, kwargs, out):
            if not module.training:
                return
            x = args[0] if args else kwargs.get("input")
            hx = args[1] if len(args) > 1 else kwargs.get("hx")
            seq = out[0] if isinstance(out, tuple) else out
            if not isinstance(seq, torch.Tensor) or not seq.requires_grad:
                return  # packed sequences are not unrolled
            self._seen[i] = (x, hx)
            seq.register_hook(lambda g: self._grads.__setitem__(i, g))
        return hook

    def measure(self, inv_scale: float) -> None:
        """Before the optimizer step (the weights still those of the forward): the norms of the armed step."""
        if self._step is None:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for i, r in enumerate(self.entries):
            if i in self._seen and i in self._grads:
                x, hx = self._seen[i]
                norms = recurrent.time_signal(r.module, x, hx, self._grads[i])
                if norms is not None:
                    self._norms[r.path] = (norms * inv_scale).cpu().numpy().copy()  # no tensor kept
        self._seen.clear()
        self._grads.clear()

    def finish(self) -> list[tuple[int, dict[str, float]]]:
        """After the step: its rows into the time trace, and [(step, metrics)] for the loggers (or [])."""
        if self._step is None:
            return []
        step, norms, self._step, self._norms = self._step, self._norms, None, {}
        metrics = {}
        for path, n in norms.items():
            self._file.append(step, path, n)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = float(n[0] / n[-1]) if len(n) and n[-1] > 0 else math.nan
            if math.isfinite(ratio):
                metrics[f"backprop_time_ratio/{path}"] = ratio
                metrics.setdefault("backprop_time_ratio", ratio)  # the first recurrent module's
        return [(step, metrics)] if metrics else []

    def close(self) -> Path | None:
        """The time trace, or None without recurrent modules or rows."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        return self._file.close() if self._file is not None else None
