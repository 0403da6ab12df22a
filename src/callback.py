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


def _grads(weights: list[Tensor]) -> list[Tensor]:
    """Each weight's gradient; zeros for a weight the loss did not reach this step."""
    return [w.grad if w.grad is not None else torch.zeros_like(w) for w in weights]


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
        self._armed_step: int | None = None
        self._before: list[Tensor] | None = None
        self._pending = None
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
        self._before = self._pending = None

    # ---- hooks: only do work on armed (recorded) training steps -------------------------------------
    def _linear_hook(self, i: int):
        def keep_signal(g: Tensor):
            self._signals[i] = g

        def hook(module, inputs, out):
            if self._armed and module.training and out.requires_grad:
                self._last_linear = i
                out.register_hook(keep_signal)

        return hook

    def _activation_hook(self, module, inputs, out):
        if self._armed and module.training and self._last_linear is not None:
            # the last micro-batch's activations stand for the step
            self._acts[self._last_linear] = (inputs[0], out, ACTIVATION_BY_TYPE[type(module)])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self._armed = step % self.every_n_steps == 0
        if self._armed and self._armed_step != step:  # first micro-batch of this optimizer step
            self._armed_step = step
            self._bp_sq = torch.zeros(len(self.linears), dtype=torch.float64, device=pl_module.device)
            self._acts: dict[int, tuple] = {}
        self._signals: list[Tensor | None] = [None] * len(self.linears)
        self._last_linear = None

    def on_after_backward(self, trainer, pl_module):
        if not self._armed:
            return
        # fold this micro-batch's signal into the step's: ||dL/ds||^2 adds up over micro-batches
        if all(g is not None for g in self._signals):
            self._bp_sq += stats.backprop_sq_norms(self._signals)
        else:  # a layer the loss does not reach (frozen, unused): no signal, NaN rather than a made-up 0
            for i, g in enumerate(self._signals):
                self._bp_sq[i] = float("nan") if g is None else self._bp_sq[i] + stats.backprop_sq_norms([g])[0]
        self._signals = [None] * len(self.linears)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self._armed:
            return
        weights = [lin.weight for lin in self.linears]
        grads = _grads(weights)
        bp = self._bp_sq.sqrt()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # tensor hooks saw the loss-scaled signal; weight grads are unscaled here
            bp = bp / scaler.get_scale()
        act = torch.full((len(weights), len(stats.ACT_STATS)), float("nan"), device=bp.device)
        if self._acts:
            idx = sorted(self._acts)
            self.act_layers.update(idx)
            a = [self._acts[i] for i in idx]
            act[idx] = stats.activation_stats(
                [x[1] for x in a], [x[0] for x in a], [x[2].derivative for x in a],
                [x[2].max_derivative for x in a], self.threshold,
            )
        self._acts = {}
        with torch.no_grad():  # the optimizer changes the weights in place: keep the pre-step copy
            if self._before is None:
                self._before = [w.clone() for w in weights]
            else:
                torch._foreach_copy_(self._before, weights)
        nonfinite = torch.zeros(len(weights), 1, device=bp.device)
        self._pending = (trainer.global_step, torch.cat([
            stats.gradient_stats(grads), nonfinite, bp.float()[:, None], act], dim=1))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._armed or self._pending is None:
            return
        step, head = self._pending
        self._pending = None
        after = [lin.weight for lin in self.linears]
        values = torch.cat([head, stats.weight_stats(self._before, after)], dim=1).cpu().numpy()  # one sync
        col = stats.LAYER_STATS.index("grad_norm")
        if not np.isfinite(values[:, col]).all():  # rare: pay for counting the NaN/Inf entries
            grads = _grads(after)
            values[:, stats.LAYER_STATS.index("grad_nonfinite")] = stats.nonfinite_counts(grads).cpu().numpy()
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
