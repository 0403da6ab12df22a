"""GradientStatsCallback: decides *when* to record; the math is in src.stats, the transport is whatever
Lightning loggers the Trainer has (this module never imports a tracker).

Works on any LightningModule with nn.Linear layers. Layers are indexed in the order their modules are
registered (input to output for nn.Sequential). For each layer it records, on every `every_n_steps`-th
optimizer step: the weight gradient (at `on_before_optimizer_step`: accumulated, and unscaled under
mixed precision), the back-propagated signal dL/ds at the layer's output s (a tensor hook), the output
of the activation module that runs after the layer (any registry activation, reused modules included),
the weights, and the relative size of the step actually taken.

Cost. Float32 weights on the CPU go through one compiled pass on each side of the optimizer step
(src/fused.py: the gradient's sums before the step; the weights' sums and the step's size after it, which also
keeps the weights for the next step's update); only the per-layer sums are buffered. Elsewhere (GPU, other
dtypes, no C compiler) a recorded step only *captures* its raw inputs into preallocated ring buffers of
`ring_steps` steps (one `_foreach_copy_` each for the gradients and the weights before and after the step);
big nets, whose copies would cost more than the dispatch they save, reduce them at the step itself
(whole-tensor passes) and buffer only the small per-step results. Activation module hooks run on the first
recorded step, to learn which activation follows which layer. Then, on the fused path, if the kernel knows
every activation (identity, ReLU, sigmoid, tanh) they stay, and each step's activation outputs are reduced at
its end in one call; otherwise they are removed (if each reads its layer's output), the pre-activations are
buffered too, and f(s) is recomputed from the layer output s kept by the Linear hook (the same op on the same
input). Every `ring_steps` steps (and when training ends) the statistics of all buffered steps are computed in
a few stacked ops, written to the trace and handed to the loggers *with their own step numbers*.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from src import fused, stats
from src.registry import ACTIVATION_BY_TYPE
from src.trace import TraceWriter

# Gradients and weights are buffered (and reduced every `ring_steps` steps) when all layers zero-padded to
# the largest one hold at most this many elements: there per-op dispatch dominates. Above it, copying them
# costs more than reducing them at once.
STACK_MAX_NUMEL = 1 << 17
# Ring buffers hold at most this many float32 elements in all (64 MiB), and at most MAX_RING_STEPS steps,
# so a flush stays short and values reach the loggers soon.
RING_MAX_NUMEL = 1 << 24
MAX_RING_STEPS = 32
# Activation statistics are computed this many elements of buffered pre-activations at a time, which bounds
# their temporaries (8 MB, not 21 MB each for a 20x256 net's 32 steps; in isolation 19.6 against 25 ms).
ACT_CHUNK_NUMEL = 1 << 21

COL = {name: j for j, name in enumerate(stats.LAYER_STATS)}


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
        log_every_n_steps: int = 50,  # as conf/stats/default.yaml
        saturation_threshold: float = 0.05,
        trace_path: str | Path | None = None,
        trace_chunk_steps: int = 1024,
        ring_steps: int | None = None,
    ):
        for name, v in (("every_n_steps", every_n_steps), ("log_every_n_steps", log_every_n_steps),
                        ("trace_chunk_steps", trace_chunk_steps), ("ring_steps", ring_steps or 1)):
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
        self.ring_steps = ring_steps  # None: chosen from the model's size
        self.trace: TraceWriter | None = None
        self.linears: list[nn.Linear] = []
        self._handles: list = []
        self._act_handles: list = []
        self._loggers: list = []
        self._armed = False
        self._armed_step: int | None = None
        self._stepped = False  # on_before_optimizer_step ran for the armed step: the optimizer stepped
        self.act_layers: set[int] = set()

    # ---- set-up -------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        self.linears = [m for m in pl_module.modules() if isinstance(m, nn.Linear)]
        if not self.linears:
            raise ValueError("GradientStatsCallback found no nn.Linear layer in the LightningModule")
        L_ = len(self.linears)
        for i, lin in enumerate(self.linears):
            self._handles.append(lin.register_forward_hook(self._linear_hook(i)))
        for m in pl_module.modules():
            if type(m) in ACTIVATION_BY_TYPE:
                self._act_handles.append(m.register_forward_hook(self._activation_hook))
        self._discovering = True  # activation hooks run until one recorded step has shown the layout
        self._act_of: dict[int, nn.Module] = {}
        self._direct_pre: set[int] = set()  # layers whose activation input is exactly the Linear output
        self._pre: list[Tensor | None] = [None] * L_
        self._act_out: list[Tensor | None] = [None] * L_  # activation outputs of the step (fused path)
        self._act_kernel: fused.ActivationPass | None = None
        self._signals: list[Tensor | None] = [None] * L_
        self._last_linear = None
        self._act_groups: list | None = None
        self._steps: list[int] = []

    def on_fit_start(self, trainer, pl_module):
        """Buffers and the path are chosen here, not in setup: Lightning moves the model to its device
        between the two."""
        L_ = len(self.linears)
        weights = [lin.weight for lin in self.linears]
        dev = weights[0].device
        self._device = dev
        self._numel = [w.numel() for w in weights]
        width = max(self._numel)
        # the fused C pass where it applies (float32 on the CPU); else batched torch ops
        lib = fused.library() if fused.eligible(weights) else None
        self.path = "fused" if lib else "stacked" if L_ * width <= STACK_MAX_NUMEL else "per_tensor"
        self._lib = lib
        per_step = 3 * L_ * width if self.path == "stacked" else 0
        self._K = self.ring_steps or max(1, min(MAX_RING_STEPS, RING_MAX_NUMEL // max(per_step, 1)))
        K = self._K
        self._rows: list[int] = []  # real samples in each buffered step's activations
        self._inv_scale: list[float] = []
        self._bp_sq = torch.zeros(K, L_, dtype=torch.float64, device=dev)
        self._bp_rows = list(self._bp_sq.unbind(0))
        if self.path == "stacked":
            self._numel_t = torch.tensor(self._numel, dtype=torch.float64, device=dev)
            self._g = torch.zeros(K, L_, width, device=dev)  # padding stays zero forever
            self._wb = torch.zeros(K, L_, width, device=dev)
            self._wa = torch.zeros(K, L_, width, device=dev)
            views = lambda buf: [[buf[k, i, :n].view_as(w) for i, (n, w) in enumerate(zip(self._numel, weights))]
                                 for k in range(K)]
            self._g_views, self._wb_views, self._wa_views = views(self._g), views(self._wb), views(self._wa)
        elif self.path == "fused":  # per step: a row of raw sums per layer, turned into statistics at flush
            self._numel_t = torch.tensor(self._numel, dtype=torch.float64, device=dev)
            self._passes = fused.FusedPasses(lib, weights, threads=torch.get_num_threads())
            self._grad_sums = torch.zeros(K, L_, len(stats.FUSED_GRAD_SUMS), dtype=torch.float64)
            self._weight_sums = torch.zeros(K, L_, len(stats.FUSED_WEIGHT_SUMS), dtype=torch.float64)
        else:
            self._grad_rows = torch.zeros(K, L_, len(stats.GRAD_STATS) + 1, device=dev)
            self._weight_rows = torch.zeros(K, L_, len(stats.WEIGHT_STATS) + 1, device=dev)
            self._snapshot: list[Tensor] | None = None
        if self.trace_path is not None:
            self.trace = TraceWriter(self.trace_path, stats.LAYER_STATS, L_, self.trace_chunk_steps)

    def teardown(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        self.flush()
        for h in self._handles + self._act_handles:
            h.remove()
        self._handles.clear()
        self._act_handles.clear()
        if self.path == "fused":
            self._passes.close()
        if self.trace is not None:
            self.trace.close()
        self._pre = self._signals = []

    def on_train_end(self, trainer, pl_module):
        self.flush()

    def on_exception(self, trainer, pl_module, exception):
        self.flush()  # what was recorded before the failure still reaches the trace

    # ---- hooks: only do work on armed (recorded) training steps -------------------------------------
    def _linear_hook(self, i: int):
        def keep_signal(g: Tensor):
            self._signals[i] = g

        def hook(module, inputs, out):
            if self._armed and module.training and out.requires_grad:
                self._last_linear = i
                self._pre[i] = out
                # one tensor hook per layer: torch's register_multi_grad_hook (one call for all layers)
                # measured 0.15-0.35 ms slower per step on a 20-layer net, as it wraps a hook per tensor itself
                out.register_hook(keep_signal)

        return hook

    def _activation_hook(self, module, inputs, out):
        i = self._last_linear
        if self._armed and module.training and i is not None:
            self._act_of[i] = module  # the last micro-batch's activations stand for the step
            self._act_out[i] = out
            if inputs[0] is self._pre[i]:
                self._direct_pre.add(i)
            else:  # something between the layer and its activation: keep this hook for the real input
                self._direct_pre.discard(i)
                self._pre[i] = inputs[0]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self._armed = step % self.every_n_steps == 0
        if self._armed and self._armed_step != step:  # first micro-batch of this optimizer step
            self._armed_step = step
            self._bp_rows[len(self._steps)].zero_()
        self._last_linear = None

    def on_after_backward(self, trainer, pl_module):
        if not self._armed:
            return
        # fold this micro-batch's signal into the step's: ||dL/ds||^2 adds up over micro-batches
        row = self._bp_rows[len(self._steps)]
        if not all(g is not None for g in self._signals):
            # a layer the loss does not reach (frozen, unused): no signal, NaN rather than a made-up 0
            for i, g in enumerate(self._signals):
                row[i] = float("nan") if g is None else row[i] + g.double().square().sum()
        elif not (self.path == "fused" and self._passes.add_squares(self._signals, row)):  # float32 CPU: kernel
            norms = torch.stack(torch._foreach_norm(self._signals))
            row.addcmul_(norms, norms)  # into float64
        self._signals = [None] * len(self.linears)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self._armed:
            return
        weights = [lin.weight for lin in self.linears]
        grads = _grads(weights)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # tensor hooks saw the loss-scaled signal; weight gradients are unscaled here
        self._inv_scale.append(1.0 / scaler.get_scale() if scaler is not None else 1.0)
        self._capture_activations()  # may flush the buffered steps first (a batch bigger than the buffers)
        k = len(self._steps)
        self._stepped = True
        with torch.no_grad():
            if self.path == "fused":  # also keeps the weights before the step, unless the last pass left them
                self._passes.grad_pass(grads, self._grad_sums[k], self._armed_step)
                return
            if self.path == "stacked":
                torch._foreach_copy_(self._g_views[k], grads)
                torch._foreach_copy_(self._wb_views[k], weights)
                return
            rows = stats.gradient_stats(grads)
            nonfinite = torch.zeros(len(weights), 1, device=rows.device)
            if not torch.isfinite(rows[:, 0]).all():  # rare: pay for counting NaN/Inf entries (a host sync)
                nonfinite[:, 0] = stats.nonfinite_counts(grads)
                rows[:, stats.GRAD_STATS.index("grad_zero_frac")] = stats.zero_fractions(grads)
            torch.cat([rows, nonfinite], dim=1, out=self._grad_rows[k])
            if self._snapshot is None:  # the optimizer changes the weights in place: keep the pre-step copy
                self._snapshot = [w.detach().clone() for w in weights]
            else:
                torch._foreach_copy_(self._snapshot, weights)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not (self._armed and self._stepped):  # accumulating: the optimizer has not stepped yet
            return
        self._stepped = False
        k = len(self._steps)
        weights = [lin.weight for lin in self.linears]
        with torch.no_grad():
            if self.path == "fused":
                self._passes.weight_pass(self._weight_sums[k], self._armed_step)
            elif self.path == "stacked":
                torch._foreach_copy_(self._wa_views[k], weights)
            else:
                torch._foreach_sub_(self._snapshot, weights)  # in place: W_before - W_after, no allocation
                self._weight_rows[k] = stats.weight_stats(weights, self._snapshot)
        self._steps.append(self._armed_step)
        self._loggers = trainer.loggers
        if self._act_kernel is not None:
            self._act_kernel([self._act_out[i] for i in self._act_idx], self._act_sums[k])
        if self._discovering:
            self._end_discovery()
        self._act_out = [None] * len(self.linears)  # release the step's activations
        if len(self._steps) == self._K:
            self.flush()

    # ---- activations ----------------------------------------------------------------------------------
    def _end_discovery(self):
        """After one recorded step. On the fused path, when every activation is one the kernel knows, with
        float32 outputs: keep the activation hooks and reduce their outputs at each step's end. Otherwise group
        the layers with an activation by (activation type and options, batch, width) into ring buffers of their
        pre-activations, and drop the activation hooks if every activation reads its layer's output."""
        self._discovering = False
        self.act_layers = set(self._act_of)
        idx = sorted(self._act_of)
        kinds = [fused.ACT_KINDS.get(type(self._act_of[i])) for i in idx]
        if self._lib and idx and None not in kinds and all(
                self._act_out[i].device.type == "cpu" and self._act_out[i].dtype == torch.float32 for i in idx):
            limits = [self.threshold * ACTIVATION_BY_TYPE[type(self._act_of[i])].max_derivative for i in idx]
            self._act_kernel, self._act_idx = fused.ActivationPass(self._lib, kinds, limits), idx
            self._act_sums = torch.zeros(self._K, len(idx), len(stats.FUSED_ACT_SUMS), dtype=torch.float64)
            self._act_groups = []
            self._act_views()
            self._act_kernel([self._act_out[i] for i in idx], self._act_sums[len(self._steps) - 1])
            return
        if self._act_groups is None:
            self._act_groups = []
            by_key: dict[tuple, list[int]] = {}
            for i in sorted(self._act_of):
                pre = self._pre_of(i)
                m = self._act_of[i]  # registry activations hold no weights: same type and options, same f
                key = (type(m), m.extra_repr(), pre.numel() // pre.shape[-1], pre.shape[-1], pre.dtype)
                by_key.setdefault(key, []).append(i)
            per_step = 0
            for idx in by_key.values():
                pre = self._pre_of(idx[0])
                batch = pre.numel() // pre.shape[-1]
                per_step += len(idx) * pre.numel()
                self._act_groups.append(self._new_group(idx, batch, pre.shape[-1], pre.dtype))
            # big batches x wide layers: buffer fewer steps (the gradient buffers are then only part-used)
            self._K = max(1, min(self._K, RING_MAX_NUMEL // max(per_step, 1)))
            self._act_views()
            # the step just captured had no buffers yet: capture its activations now
            self._capture_activations(slot=len(self._steps) - 1)
        if len(self._direct_pre) == len(self._act_of):
            for h in self._act_handles:
                h.remove()
            self._act_handles.clear()

    def _pre_of(self, i: int) -> Tensor:
        return self._pre[i].detach()

    def _new_group(self, idx: list[int], batch: int, width: int, dtype) -> dict:
        buf = torch.zeros(self._K, len(idx), batch, width, dtype=dtype, device=self._device)
        module = self._act_of[idx[0]]
        # an in-place activation (ReLU(inplace=True)) would overwrite the buffer it reads: give it a copy
        f = (lambda s: module(s.clone())) if getattr(module, "inplace", False) else module.forward
        return dict(idx=idx, buf=buf, f=f, entry=ACTIVATION_BY_TYPE[type(module)])

    def _act_views(self):
        """Per slot, the full-batch view of every activation layer's buffer row: no indexing op per step."""
        self._act_layers_flat = [i for grp in self._act_groups for i in grp["idx"]]
        self._act_slot_views = [[grp["buf"][k, j] for grp in self._act_groups for j in range(len(grp["idx"]))]
                                for k in range(self._K)]
        self._act_batch = min((grp["buf"].shape[2] for grp in self._act_groups), default=0)

    def _capture_activations(self, slot: int | None = None):
        """Copy the step's pre-activations (the last micro-batch's) into its slot, in one op."""
        if self._act_groups is None:  # first recorded step: the buffers are built at its end
            self._rows.append(0)
            return
        pres = [self._pre[i] for i in self._act_layers_flat]
        pres = [p if p is None or p.dim() == 2 else p.flatten(0, -2) for p in pres]
        batch = max((p.shape[0] for p in pres if p is not None), default=0)
        if batch > self._act_batch:  # a bigger batch than the buffers hold: compute what is there, grow
            self.flush(keep_current=True)
            for grp in self._act_groups:
                grp["buf"] = grp["buf"].new_zeros(*grp["buf"].shape[:2], batch, grp["buf"].shape[3])
            self._act_views()
        k = len(self._steps) if slot is None else slot
        views = self._act_slot_views[k]
        if all(p is not None and p.shape[0] == self._act_batch for p in pres):
            srcs, dsts = pres, views
        else:  # a short batch (the last of an epoch): the rows past it are masked when computing
            srcs = [p for p in pres if p is not None]
            dsts = [v[:p.shape[0]] for p, v in zip(pres, views) if p is not None]
        if srcs:
            with torch.no_grad():
                torch._foreach_copy_(dsts, srcs)
        if k < len(self._rows):
            self._rows[k] = batch
        else:
            self._rows.append(batch)
        self._pre = [None] * len(self.linears)

    # ---- the stacked computation -------------------------------------------------------------------------
    @torch.no_grad()
    def flush(self, keep_current: bool = False):
        """Compute the statistics of every buffered step, append them to the trace and hand the logged steps
        to the loggers. `keep_current`: the step being captured (no step number yet) stays buffered."""
        n = len(self._steps)
        if n == 0:
            return
        L_ = len(self.linears)
        if self.path == "fused":
            grad = stats.gradient_stats_from_sums(self._grad_sums[:n], self._numel_t)
            weight = stats.weight_stats_from_sums(self._weight_sums[:n], self._numel_t)
        elif self.path == "stacked":
            grad = stats.stacked_gradient_stats(self._g[:n], self._numel_t)
            grad = torch.cat([grad, torch.zeros(n, L_, 1, device=grad.device)], dim=2)
            weight = stats.stacked_weight_stats(self._wb[:n], self._wa[:n], self._numel_t)
        else:
            grad, weight = self._grad_rows[:n], self._weight_rows[:n]
        inv_scale = torch.tensor(self._inv_scale[:n], dtype=torch.float64, device=self._device)
        bp = (self._bp_sq[:n].sqrt() * inv_scale[:, None]).float()
        act = torch.full((n, L_, len(stats.ACT_STATS)), float("nan"), device=self._device)
        rows = torch.tensor(self._rows[:n], device=self._device)
        if self._act_kernel is not None:
            act[:, self._act_idx] = stats.activation_stats_from_sums(self._act_sums[:n]).to(act.device)
        for grp in self._act_groups or []:
            full = bool((rows == grp["buf"].shape[2]).all())
            buf = grp["buf"][:n]
            chunk = max(1, ACT_CHUNK_NUMEL // buf[0].numel())
            act[:, grp["idx"]] = torch.cat([stats.stacked_activation_stats(
                b, grp["f"], grp["entry"].derivative, grp["entry"].max_derivative,
                self.threshold, rows=None if full else r) for b, r in zip(buf.split(chunk), rows.split(chunk))])
        values = torch.cat([grad, bp[:, :, None], act, weight], dim=2).cpu().numpy()  # one sync for n steps
        if self.path == "stacked":
            broken = ~np.isfinite(values[:, :, COL["grad_norm"]]).all(axis=1)
            if broken.any():  # rare: pay for counting the NaN/Inf entries
                g = self._g[torch.from_numpy(np.flatnonzero(broken)).to(self._device)]
                values[broken, :, COL["grad_nonfinite"]] = stats.stacked_nonfinite_counts(g).cpu().numpy()
                zeros = stats.stacked_zero_counts(g, self._numel_t) / self._numel_t
                values[broken, :, COL["grad_zero_frac"]] = zeros.cpu().numpy()
        self._emit(values)
        # keep only what belongs to a step not yet complete
        self._steps.clear()
        self._inv_scale = self._inv_scale[n:]
        self._rows = self._rows[n:]
        if keep_current:  # the step being captured has only folded in its signal so far: move it to slot 0
            self._bp_sq[0] = self._bp_sq[n]
        else:
            self._inv_scale, self._rows = [], []

    def _emit(self, values: np.ndarray):
        for step, v in zip(self._steps, values):
            if self.trace is not None:
                self.trace.append(step, v)
            if step % self.log_every_n_steps == 0 and self._loggers:
                metrics = self.metrics(v, self.act_layers)
                for logger in self._loggers:
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
        ratio = float(stats.backprop_ratio(torch.from_numpy(values[:, COL["backprop_norm"]])))
        if not np.isnan(ratio):
            out["backprop_ratio"] = ratio
        return out
