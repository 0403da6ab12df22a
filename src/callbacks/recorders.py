"""How GradientStatsCallback records the weight family: three strategies behind one protocol, one chosen when
fit starts for the model as trained; and the back-propagated signal's norms.

A recorded module's weight family covers one or more tensors (a Linear's weight; an LSTM's input and
recurrent weights), taken together as one. Every strategy keeps `capacity` steps in slots 0..capacity-1:
  before_step(k, step, grads)  before optimizer step `step`: its gradients, one per tensor of `tensors`
  after_step(k, step)          after it: the weights and the step taken
  flush(n)                     [n, modules, 9] float32: grad_* and grad_nonfinite, then weight_* and
                               update_ratio (src.stats.names), of the steps in slots 0..n-1
  close()
- FusedParams: float32 weights on the CPU with the compiled kernel: one read of each tensor per pass, and
  only a row of sums per module and step is kept.
- StackedParams: small nets elsewhere (a GPU, other dtypes, no C compiler): each step's gradients and
  weights before and after are copied into ring buffers and reduced at flush in a few stacked ops, since
  there the dispatch of many small ops costs more than their arithmetic.
- PerTensorParams: big nets elsewhere: reduced whole at the step, where copying them would cost more than
  the dispatch it saves.
"""
from __future__ import annotations

import torch
from torch import Tensor

from src.stats import fused
from src.stats import reductions as stats
from src.stats.modules import as_one
from src.stats.names import GRAD_STATS

# Gradients and weights are buffered (and reduced at flush) when all modules zero-padded to the largest one
# hold at most this many elements: there per-op dispatch dominates. Above it, copying them costs more than
# reducing them at once.
STACK_MAX_NUMEL = 1 << 17
# Ring buffers hold at most this many float32 elements in all (64 MiB), and at most MAX_RING_STEPS steps,
# so a flush stays short and values reach the loggers soon.
RING_MAX_NUMEL = 1 << 24
MAX_RING_STEPS = 32
ZERO_FRAC = GRAD_STATS.index("grad_zero_frac")


def gradients(weights: list[Tensor]) -> list[Tensor]:
    """Each weight's gradient; zeros for a weight the loss did not reach this step."""
    return [w.grad if w.grad is not None else torch.zeros_like(w) for w in weights]


def param_recorder(groups: list[list[Tensor]], ring_steps: int | None = None):
    """The strategy for these modules' tensors (`groups[i]`: module i's) as they are now, after Lightning
    moved and converted the model."""
    flat = [t for g in groups for t in g]
    numel = [sum(t.numel() for t in g) for g in groups]
    lib = fused.library() if fused.eligible(flat) else None
    if lib is not None:
        return FusedParams(groups, ring_steps or MAX_RING_STEPS, lib)
    if len(groups) * max(numel) <= STACK_MAX_NUMEL:
        per_step = 3 * len(groups) * max(numel)
        return StackedParams(groups, ring_steps or max(1, min(MAX_RING_STEPS, RING_MAX_NUMEL // per_step)))
    return PerTensorParams(groups, ring_steps or MAX_RING_STEPS)


def _owners(groups: list[list[Tensor]]) -> list[int]:
    return [i for i, g in enumerate(groups) for _ in g]


class FusedParams:
    name = "fused"

    def __init__(self, groups: list[list[Tensor]], capacity: int, lib):
        self.tensors = [t for g in groups for t in g]
        self.capacity, self.lib, n = capacity, lib, len(groups)
        self._numel = torch.tensor([sum(t.numel() for t in g) for g in groups], dtype=torch.float64)
        # keeps the weights before the step itself, unless its last weight pass left them in place
        self._passes = fused.FusedPasses(lib, self.tensors, threads=torch.get_num_threads(), owner=_owners(groups))
        self._grad_sums = torch.zeros(capacity, n, len(stats.FUSED_GRAD_SUMS), dtype=torch.float64)
        self._weight_sums = torch.zeros(capacity, n, len(stats.FUSED_WEIGHT_SUMS), dtype=torch.float64)

    def before_step(self, k: int, step: int, grads: list[Tensor]) -> None:
        self._passes.grad_pass(grads, self._grad_sums[k], step)

    def after_step(self, k: int, step: int) -> None:
        self._passes.weight_pass(self._weight_sums[k], step)

    def flush(self, n: int) -> Tensor:
        return torch.cat([stats.gradient_stats_from_sums(self._grad_sums[:n], self._numel),
                          stats.weight_stats_from_sums(self._weight_sums[:n], self._numel)], dim=2)

    def close(self) -> None:
        self._passes.close()


class StackedParams:
    name = "stacked"

    def __init__(self, groups: list[list[Tensor]], capacity: int):
        self.tensors, self.capacity, self.lib = [t for g in groups for t in g], capacity, None
        self._modules = len(groups)
        numel = [sum(t.numel() for t in g) for g in groups]
        dev, width = self.tensors[0].device, max(numel)
        self._numel = torch.tensor(numel, dtype=torch.float64, device=dev)
        self._g, self._wb, self._wa = (torch.zeros(capacity, len(groups), width, device=dev) for _ in range(3))
        # each tensor's place in its module's row: the module's tensors one after another, padding zero
        place, offset = [], {}
        for i, t in zip(_owners(groups), self.tensors):
            a = offset.get(i, 0)
            place.append((i, a, t))
            offset[i] = a + t.numel()

        def views(buf):  # per slot, each tensor's part of the buffer shaped like it
            return [[buf[k, i, a:a + t.numel()].view_as(t) for i, a, t in place] for k in range(capacity)]

        self._g_at, self._wb_at, self._wa_at = views(self._g), views(self._wb), views(self._wa)

    def before_step(self, k: int, step: int, grads: list[Tensor]) -> None:
        torch._foreach_copy_(self._g_at[k], grads)
        torch._foreach_copy_(self._wb_at[k], self.tensors)

    def after_step(self, k: int, step: int) -> None:
        torch._foreach_copy_(self._wa_at[k], self.tensors)

    def flush(self, n: int) -> Tensor:
        g = self._g[:n]
        grad = stats.stacked_gradient_stats(g, self._numel)
        nonfinite = torch.zeros(n, self._modules, 1, device=grad.device)
        broken = (~torch.isfinite(grad[..., 0]).all(dim=1)).nonzero().squeeze(1)
        if len(broken):  # rare: pay for counting the NaN/Inf entries, and the zeros exactly
            nonfinite[broken, :, 0] = stats.stacked_nonfinite_counts(g[broken])
            grad[broken, :, ZERO_FRAC] = (stats.stacked_zero_counts(g[broken], self._numel) / self._numel).float()
        weight = stats.stacked_weight_stats(self._wb[:n], self._wa[:n], self._numel)
        return torch.cat([grad, nonfinite, weight], dim=2)

    def close(self) -> None:
        pass


class PerTensorParams:
    name = "per_tensor"

    def __init__(self, groups: list[list[Tensor]], capacity: int):
        self.tensors, self.capacity, self.lib = [t for g in groups for t in g], capacity, None
        self._sizes = [len(g) for g in groups]
        dev = self.tensors[0].device
        self._grad_rows = torch.zeros(capacity, len(groups), 6, device=dev)
        self._weight_rows = torch.zeros(capacity, len(groups), 3, device=dev)
        self._before: list[Tensor] | None = None

    def _by_module(self, tensors: list[Tensor]) -> list[Tensor]:
        """One tensor per module: its own, or its tensors flattened into one (a copy, for modules of several)."""
        if len(tensors) == len(self._sizes):
            return tensors
        out, at = [], 0
        for n in self._sizes:
            part = tensors[at:at + n]
            out.append(as_one(part))
            at += n
        return out

    def before_step(self, k: int, step: int, grads: list[Tensor]) -> None:
        grads = self._by_module(grads)
        rows = stats.gradient_stats(grads)
        nonfinite = torch.zeros(len(grads), 1, device=rows.device)
        if not torch.isfinite(rows[:, 0]).all():  # rare: pay for counting NaN/Inf entries (a host sync)
            nonfinite[:, 0] = stats.nonfinite_counts(grads)
            rows[:, ZERO_FRAC] = stats.zero_fractions(grads)
        torch.cat([rows, nonfinite], dim=1, out=self._grad_rows[k])
        if self._before is None:  # the optimizer changes the weights in place: keep the pre-step copy
            self._before = [w.detach().clone() for w in self.tensors]
        else:
            torch._foreach_copy_(self._before, self.tensors)

    def after_step(self, k: int, step: int) -> None:
        torch._foreach_sub_(self._before, self.tensors)  # in place: W_before - W_after, no allocation
        self._weight_rows[k] = stats.weight_stats(self._by_module(self.tensors), self._by_module(self._before))

    def flush(self, n: int) -> Tensor:
        return torch.cat([self._grad_rows[:n], self._weight_rows[:n]], dim=2)

    def close(self) -> None:
        pass


class SignalNorms:
    """||dL/ds||^2 of every module's output per step, summed over the step's micro-batches (and over the
    calls of a module that runs more than once) in float64."""

    def __init__(self, capacity: int, n_modules: int, device, lib=None):
        self._sq = torch.zeros(capacity, n_modules, dtype=torch.float64, device=device)
        self._rows = list(self._sq.unbind(0))
        self._kernel = fused.SquareSums(lib, n_modules) if lib is not None else None

    def zero(self, k: int) -> None:
        self._rows[k].zero_()

    def add(self, k: int, signals: list[list[Tensor]]) -> None:
        """signals[i]: module i's signal tensors of this backward (empty: the loss did not reach it)."""
        row = self._rows[k]
        if any(len(s) != 1 for s in signals):
            # a module the loss does not reach (frozen, unused): no signal, NaN rather than a made-up 0
            for i, s in enumerate(signals):
                row[i] = float("nan") if not s else row[i] + sum(g.double().square().sum() for g in s)
            return
        flat = [s[0] for s in signals]
        if not (self._kernel is not None and self._kernel(flat, row)):  # float32 CPU: the kernel
            norms = torch.stack(torch._foreach_norm(flat))
            row.addcmul_(norms, norms)  # into float64

    def squares(self, n: int) -> Tensor:
        """[n, layers] float64: ||dL/ds||^2 of the steps in slots 0..n-1, as the hooks saw it (loss-scaled)."""
        return self._sq[:n]

    @staticmethod
    def norms(squares: Tensor, inv_scale: list[float]) -> Tensor:
        """[n, layers] float32 norms from `squares`; the tensor hooks saw the loss-scaled signal, `inv_scale`
        undoes it."""
        scale = torch.tensor(inv_scale[:len(squares)], dtype=torch.float64, device=squares.device)
        return (squares.sqrt() * scale[:, None]).float()
