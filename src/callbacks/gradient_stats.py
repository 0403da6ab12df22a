"""GradientStatsCallback: every `every_n_steps` optimizer steps, the per-module statistics (src.stats.names) of
every recorded module (src.stats.modules) into the dense trace and, every `log_every_n_steps` steps, to the
Trainer's loggers, whatever they are (this module imports no tracker).

The callback decides *when*: which steps are recorded, when the buffered steps become statistics (when the
buffers are full and when training ends), and that each reaches the loggers with its own step number. What
a step shows comes from the taps (taps.py); how it is kept and reduced, from strategies chosen once for the
model as trained (recorders.py for the weights and the signal, activations.py for the activations); what
recurrent modules show through time, from through_time.py. Weight gradients are read at
`on_before_optimizer_step`: accumulated over micro-batches, unscaled under mixed precision, before clipping.

Under several processes (DDP) the callback runs on every rank: the weight gradients are all-reduced already,
the activations and the signal are the rank's shard's, so at each flush every rank gathers its shard's
columns (one collective for all buffered steps and modules) and src.stats.across_ranks makes them the global
batch's. Only global rank 0 writes the trace and has loggers.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from src.callbacks.activations import activation_recorder
from src.callbacks.recorders import SignalNorms, gradients, param_recorder
from src.callbacks.taps import ModuleTaps
from src.callbacks.through_time import ThroughTime
from src.stats import across_ranks
from src.stats.modules import LAYER_KINDS, recorded_modules
from src.stats.names import ACT_STATS, GRAD_STATS, LAYER_STATS, module_metrics
from src.stats.trace import TraceWriter

GRAD_COLUMNS = len(GRAD_STATS) + 1  # and grad_nonfinite: the first columns of a recorder's flush


def _positive(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"stats.{name} must be a positive integer, got {v!r}")


class GradientStatsCallback(L.Callback):
    across_ranks = True  # takes part in a collective at every flush: every rank of a training must run it

    def __init__(
        self,
        every_n_steps: int = 1,
        log_every_n_steps: int = 50,
        saturation_threshold: float = 0.05,
        trace_chunk_steps: int = 1024,
        trace_path: str | Path | None = None,  # None: trace.parquet in the Trainer's default_root_dir
        ring_steps: int | None = None,          # steps buffered before a flush; None: chosen for the model
        include: list[str] | None = None,       # regular expressions on module paths (src/stats/modules.py)
        exclude: list[str] | None = None,
        types: list[str] | None = None,         # kinds of modules to record (src.stats.modules.KINDS)
        time_every_n_steps: int | None = None,  # the signal through time of recurrent modules; None: at logging
    ):
        for name, v in (("every_n_steps", every_n_steps), ("log_every_n_steps", log_every_n_steps),
                        ("trace_chunk_steps", trace_chunk_steps), ("ring_steps", ring_steps or 1),
                        ("time_every_n_steps", time_every_n_steps or 1)):
            _positive(name, v)
        if not 0.0 < saturation_threshold < 1.0:
            raise ValueError(f"stats.saturation_threshold must be in (0, 1), got {saturation_threshold!r}")
        if log_every_n_steps % every_n_steps:
            raise ValueError(
                f"stats.log_every_n_steps ({log_every_n_steps}) must be a multiple of "
                f"stats.every_n_steps ({every_n_steps}): only recorded steps can be logged"
            )
        if time_every_n_steps and time_every_n_steps % every_n_steps:
            raise ValueError(
                f"stats.time_every_n_steps ({time_every_n_steps}) must be a multiple of "
                f"stats.every_n_steps ({every_n_steps}): the signal through time is taken on recorded steps"
            )
        self.every_n_steps, self.log_every_n_steps = every_n_steps, log_every_n_steps
        self.threshold, self.trace_chunk_steps, self.ring_steps = saturation_threshold, trace_chunk_steps, ring_steps
        self.selection = {"include": include, "exclude": exclude, "types": types}
        self.time_every_n_steps = time_every_n_steps or log_every_n_steps
        self.trace_path = Path(trace_path) if trace_path else None
        self.taps: ModuleTaps | None = None
        self.params = self.signals = self.activations = self.trace = self.through_time = None
        self._steps: list[int] = []          # the recorded steps in the buffers, slot by slot
        self._inv_scale: list[float] = []    # per slot: 1 / the loss scale of mixed precision
        self._step: int | None = None        # the optimizer step being recorded
        self._stepped = False                # the optimizer has stepped for it (not mid-accumulation)
        self._gather = None                  # several processes: the strategy's all_gather
        self._shards_lost = False            # a failure broke the collective: the shards cannot be combined

    def select(self, model) -> list:
        """The modules this callback records in `model` (src.stats.modules.NothingToRecord if none)."""
        return recorded_modules(model, **self.selection, who=type(self).__name__)

    def setup(self, trainer, pl_module, stage):
        if stage == "fit":
            self.recorded = self.select(pl_module)
            self.modules = [r.path for r in self.recorded]
            self.layers = [i for i, r in enumerate(self.recorded) if r.kind in LAYER_KINDS]
            self.taps = ModuleTaps(pl_module, self.recorded).attach()
            self.through_time = ThroughTime(self.recorded)
            self._discovering = True  # the first recorded step shows which activation follows which module

    def on_fit_start(self, trainer, pl_module):
        """The strategies are chosen here, not in setup: Lightning moves and converts the model in between."""
        groups = [r.params for r in self.recorded]
        self.params = param_recorder(groups, self.ring_steps)
        self.capacity = self.params.capacity
        self.device = groups[0][0].device
        self.signals = SignalNorms(self.capacity, len(groups), self.device, self.params.lib)
        self._gather = trainer.strategy.all_gather if trainer.world_size > 1 else None
        self._shards_lost = False
        self._loggers = trainer.loggers
        if not trainer.is_global_zero:  # it reduces its shard with the others; rank 0 writes what they make
            self.through_time = ThroughTime([])  # the signal through time is rank 0's shard's alone
            return
        self.trace_path = self.trace_path or Path(trainer.default_root_dir) / "trace.parquet"
        self.trace = TraceWriter(self.trace_path, LAYER_STATS, self.modules, [r.kind for r in self.recorded],
                                 self.trace_chunk_steps)
        self.through_time.open(self.trace_path.with_name("time_trace.parquet"), self.trace_chunk_steps)

    # ---- one recorded step: signal after each backward, gradients before the step, the rest after it --------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.taps.armed = step % self.every_n_steps == 0
        self.taps.begin_forward()
        if self.taps.armed and self._step != step:  # the first micro-batch of this optimizer step
            self._step = step
            self.signals.zero(len(self._steps))
            if step % self.time_every_n_steps == 0:
                self.through_time.arm(step)

    def on_after_backward(self, trainer, pl_module):
        if self.taps.armed:  # ||dL/ds||^2 adds up over the step's micro-batches
            self.signals.add(len(self._steps), self.taps.take_signals())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.taps.armed:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # the tensor hooks saw the loss-scaled signal; the weight gradients are unscaled by now
        self._inv_scale.append(1.0 / scaler.get_scale() if scaler is not None else 1.0)
        self._stepped = True
        with torch.no_grad():
            self.params.before_step(len(self._steps), self._step, gradients(self.params.tensors))
        self.through_time.measure(self._inv_scale[-1])  # before the weights change

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not (self.taps.armed and self._stepped):  # accumulating: the optimizer has not stepped yet
            return
        self._stepped = False
        k = len(self._steps)
        with torch.no_grad():
            self.params.after_step(k, self._step)
        if self._discovering:
            self._discovering = False
            self.activations = activation_recorder(self.taps, self.params.lib, self.threshold, self.capacity,
                                                   self.device)
            if self.activations is not None:
                self.capacity = min(self.capacity, self.activations.capacity)
            if self._gather is not None:  # every rank flushes at the same steps (a shard's batch may differ)
                self.capacity = int(self._gather(torch.tensor([self.capacity], device=self.device)).min())
        if self.activations is not None:
            self.activations.capture(k, self.taps)
        self._steps.append(self._step)
        self.taps.release()
        for step, metrics in self.through_time.finish():
            self._log(metrics, step)
        if len(self._steps) >= self.capacity:
            self.flush()

    # ---- the buffered steps become statistics --------------------------------------------------------------
    @torch.no_grad()
    def flush(self) -> None:
        """Compute the statistics of every buffered step, append them to the trace and hand the logged steps
        to the loggers, each with its own step number."""
        n = len(self._steps)
        if n == 0:
            return
        params = self.params.flush(n)
        act = torch.full((n, len(self.recorded), len(ACT_STATS)), float("nan"), device=params.device)
        if self.activations is not None:
            act[:, self.activations.layers] = self.activations.flush(n).to(act.device)
        squares = self.signals.squares(n).to(params.device)
        if self._gather is not None:
            squares, act = self._global_batch(n, squares, act)
        signal = SignalNorms.norms(squares, self._inv_scale)
        values = torch.cat([params[..., :GRAD_COLUMNS], signal[..., None], act, params[..., GRAD_COLUMNS:]],
                           dim=2).cpu().numpy()  # one host sync for n steps
        steps, self._steps, self._inv_scale = self._steps, [], []
        for step, v in zip(steps, values):
            if self.trace is not None:
                self.trace.append(step, v)
            if step % self.log_every_n_steps == 0:
                self._log(module_metrics(v, self.modules, self.act_rows, self.layers), step)

    def _global_batch(self, n: int, squares, act):
        """The signal squares and activation statistics of the global batch from every rank's shard."""
        if self._shards_lost:  # after a failure the other ranks are out of reach: not known, rather than a shard's
            return torch.full_like(squares, float("nan")), torch.full_like(act, float("nan"))
        count = torch.zeros(n, len(self.recorded), dtype=torch.float64, device=act.device)
        if self.activations is not None:
            count[:, self.activations.layers] = self.activations.counts(n).to(act.device)
        return across_ranks.combine(self._gather(across_ranks.shard_columns(squares, act, count)))

    def _log(self, metrics: dict[str, float], step: int) -> None:
        for logger in self._loggers:
            logger.log_metrics(metrics, step=step)

    @property
    def act_rows(self) -> set[int]:
        """The modules an activation follows (they get act_* statistics)."""
        return set(self.activations.layers) if self.activations is not None else set()

    def on_train_end(self, trainer, pl_module):
        self.flush()

    def on_exception(self, trainer, pl_module, exception):
        self._shards_lost = True  # the other ranks may be gone: no collective from here
        self._finish()  # what was recorded before the failure still reaches the trace; the hooks go

    def teardown(self, trainer, pl_module, stage):
        if stage == "fit":
            self._finish()

    def _finish(self) -> None:
        """Flush, close the files and remove every hook (once; a later fit attaches its own)."""
        if self.taps is None:
            return
        if self.params is not None:
            self.flush()
            self.params.close()
        self.taps.detach()
        self.taps.release()
        self.through_time.close()
        if self.trace is not None:
            self.trace.close()
        self.taps = None

    def artifacts(self) -> dict[str, Path]:
        """The files this callback wrote, by role: the dense trace and, with recurrent modules, the signal
        through time (closed first)."""
        out = {}
        if self.trace is not None and (path := self.trace.close()):
            out["trace"] = path
        if self.through_time is not None and (path := self.through_time.close()):
            out["time_trace"] = path
        return out
