"""GradientStatsCallback: decides *when* to record; the math is in src.stats, the transport is whatever
Lightning loggers the Trainer has (this module never imports a tracker).

Works on any LightningModule with nn.Linear layers. Layers are indexed in the order their modules are
registered (input to output for nn.Sequential). For each layer it records, on every `every_n_steps`-th
optimizer step: the weight gradient (at `on_before_optimizer_step`: accumulated, and unscaled under
mixed precision), the back-propagated signal dL/ds at the layer's output s (a tensor hook), the output
of the activation module that runs after the layer (any registry activation, reused modules included),
the weights, and the relative size of the step actually taken.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from src import stats
from src.registry import ACTIVATION_BY_TYPE
from src.trace import TraceWriter


def layer_key(stat: str, layer: int) -> str:
    """The stable metric name of one statistic of one layer, e.g. grad_norm/layer_03."""
    return f"{stat}/layer_{layer:02d}"


class GradientStatsCallback(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 1,
        log_every_n_steps: int = 10,
        saturation_threshold: float = 0.05,
        trace_path: str | Path | None = None,
        trace_chunk_steps: int = 1024,
    ):
        for name, v in (("every_n_steps", every_n_steps), ("log_every_n_steps", log_every_n_steps),
                        ("trace_chunk_steps", trace_chunk_steps)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"stats.{name} must be a positive integer, got {v!r}")
        if not 0.0 < saturation_threshold < 1.0:
            raise ValueError(f"stats.saturation_threshold must be in (0, 1), got {saturation_threshold!r}")
        if log_every_n_steps % every_n_steps:
            raise ValueError(
                f"stats.log_every_n_steps ({log_every_n_steps}) must be a multiple of "
                f"stats.every_n_steps ({every_n_steps}): only recorded steps can be logged"
            )
        self.every_n_steps, self.log_every_n_steps = every_n_steps, log_every_n_steps
        self.threshold = saturation_threshold
        self.trace_path = Path(trace_path) if trace_path else None
        self.trace_chunk_steps = trace_chunk_steps
        self.trace: TraceWriter | None = None
        self.linears: list[nn.Linear] = []
        self._handles: list = []
        self._armed = False
        self.act_layers: set[int] = set()

    # ---- set-up -------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        self.linears = [m for m in pl_module.modules() if isinstance(m, nn.Linear)]
        if not self.linears:
            raise ValueError("GradientStatsCallback found no nn.Linear layer in the LightningModule")
        for i, lin in enumerate(self.linears):
            self._handles.append(lin.register_forward_hook(self._linear_hook(i)))
        for m in pl_module.modules():
            if type(m) in ACTIVATION_BY_TYPE:
                self._handles.append(m.register_forward_hook(self._activation_hook))
        if self.trace_path is not None:
            self.trace = TraceWriter(self.trace_path, stats.LAYER_STATS, len(self.linears), self.trace_chunk_steps)

    def teardown(self, trainer, pl_module, stage):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.trace is not None:
            self.trace.close()

    # ---- hooks: only do work on armed (recorded) training steps -------------------------------------
    def _linear_hook(self, i: int):
        def hook(module, inputs, out):
            if not self._armed or not module.training or not out.requires_grad:
                return
            self._last_linear = i

            def on_grad(g: Tensor):
                sq = g.detach().float().pow(2).sum()
                # micro-batches of one optimizer step add up: the norm of the whole step's signal
                self._bp_sq[i] = sq if self._bp_sq[i] is None else self._bp_sq[i] + sq

            out.register_hook(on_grad)

        return hook

    def _activation_hook(self, module, inputs, out):
        if self._armed and module.training and self._last_linear is not None:
            # the last micro-batch's activations stand for the step
            self._acts[self._last_linear] = (inputs[0], out, ACTIVATION_BY_TYPE[type(module)])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self._armed = step % self.every_n_steps == 0
        if self._armed and getattr(self, "_armed_step", None) != step:
            # first micro-batch of this optimizer step
            self._armed_step = step
            self._bp_sq: list[Tensor | None] = [None] * len(self.linears)
            self._acts: dict[int, tuple] = {}
            self._pending = None
        self._last_linear = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self._armed:
            return
        weights = [lin.weight for lin in self.linears]
        grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in weights]
        n_layers = len(self.linears)
        nan = torch.full((n_layers,), float("nan"), device=weights[0].device)
        bp = torch.stack([s if s is not None else nan[0] for s in self._bp_sq]).sqrt()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # tensor hooks see the loss-scaled signal; weight grads are unscaled here
            bp = bp / scaler.get_scale()
        act = torch.full((n_layers, len(stats.ACT_STATS)), float("nan"), device=nan.device)
        if self._acts:
            idx = sorted(self._acts)
            self.act_layers.update(idx)
            a = [self._acts[i] for i in idx]
            act[idx] = stats.activation_stats(
                [x[1] for x in a], [x[0] for x in a], [x[2].derivative for x in a],
                [x[2].max_derivative for x in a], self.threshold,
            ).to(act.device)
        self._pending = (trainer.global_step, stats.moments(grads), bp, act,
                         [w.detach().clone() for w in weights])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._armed or self._pending is None:
            return
        step, g, bp, act, before = self._pending
        self._pending = None
        after = [lin.weight.detach() for lin in self.linears]
        table = torch.cat([
            g, bp[:, None], act, stats.mean_std(after), stats.update_ratio(before, after)[:, None],
        ], dim=1)
        values = table.cpu().numpy()  # the one host sync of this step
        if self.trace is not None:
            self.trace.append(step, values)
        if step % self.log_every_n_steps == 0 and trainer.loggers:
            metrics = self.metrics(values, self.act_layers)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    @staticmethod
    def metrics(values: np.ndarray, act_layers: set[int]) -> dict[str, float]:
        """Browsable metric dict from one step's [n_layers, n_stats] table; layers without an
        activation module after them (the output layer) get no act_* keys."""
        out = {}
        for j, stat in enumerate(stats.LAYER_STATS):
            for i in range(values.shape[0]):
                v = float(values[i, j])
                if stat.startswith("act_") and i not in act_layers:
                    continue
                out[layer_key(stat, i)] = v
        ratio = float(stats.backprop_ratio(torch.from_numpy(values[:, stats.LAYER_STATS.index("backprop_norm")])))
        if not np.isnan(ratio):
            out["backprop_ratio"] = ratio
        return out
