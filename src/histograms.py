"""Per-layer histograms of log10|value| over time: weight gradients, the back-propagated signal, activations.

`log10_histogram` is a pure function (fixed bins, exact zeros and NaN/Inf counted apart). `HistogramCallback`
records them every `every_n_steps` optimizer steps into a Parquet file next to the trace: one row per
(step, layer, quantity) with columns `step`, `layer`, `quantity` (grad | backprop | act), one count column per
bin (`bin_00` ... holding log10|x| in [EDGES[i], EDGES[i+1]); the first and last bins also take everything
below/above the range), `zeros` and `nonfinite`. It registers its hooks on the steps it records only and
removes them afterwards, so the steps in between cost nothing.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

from src.registry import ACTIVATION_BY_TYPE

# Half-decade bins from 1e-12 to 1e+4: float32 gradients of a vanished layer sit at 1e-8..1e-12, activations
# and exploded gradients at 1e0..1e4.
EDGES = np.arange(-12.0, 4.0 + 1e-9, 0.5)
N_BINS = len(EDGES) - 1
BIN_COLUMNS = tuple(f"bin_{i:02d}" for i in range(N_BINS))
QUANTITIES = ("grad", "backprop", "act")


@torch.no_grad()
def log10_histograms(tensors: list[Tensor], edges: np.ndarray = EDGES) -> np.ndarray:
    """int64 [len(tensors), n_bins + 2]: per tensor, the counts of log10|x| per bin for finite non-zero x
    (out-of-range values go to the first/last bin), then the number of exact zeros, then of NaN/Inf entries.
    All tensors in a handful of ops and one host sync (per-op dispatch, not arithmetic, dominates here)."""
    n_bins = len(edges) - 1
    flat = [t.detach().reshape(-1) for t in tensors]
    x = torch.cat([f.double() for f in flat])
    owner = torch.repeat_interleave(torch.arange(len(flat), device=x.device),
                                    torch.tensor([f.numel() for f in flat], device=x.device))
    inner = torch.as_tensor(edges[1:-1], dtype=torch.float64, device=x.device)
    bins = torch.bucketize(torch.log10(x.abs()), inner, right=True)  # log10(0) = -inf: overwritten below
    finite = torch.isfinite(x)
    code = torch.where(finite, torch.where(x == 0, n_bins, bins), n_bins + 1)
    counts = torch.bincount(owner * (n_bins + 2) + code, minlength=len(flat) * (n_bins + 2))
    return counts.view(len(flat), n_bins + 2).cpu().numpy().astype(np.int64)


def log10_histogram(t: Tensor, edges: np.ndarray = EDGES) -> np.ndarray:
    """int64 [n_bins + 2] for one tensor (see log10_histograms)."""
    return log10_histograms([t], edges)[0]


class HistogramCallback(L.Callback):
    """Every `every_n_steps` optimizer steps, the histograms of every nn.Linear layer's weight gradient and
    back-propagated signal dL/ds, and of the output of the activation module after it; appended to `path`
    in row groups of `chunk_rows` rows."""

    def __init__(self, every_n_steps: int, path: str | Path, chunk_rows: int = 4096):
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps <= 0:
            raise ValueError(f"stats.histogram_every_n_steps must be a positive integer, got {every_n_steps!r}")
        self.every_n_steps, self.path, self.chunk_rows = every_n_steps, Path(path), chunk_rows
        self.linears: list[nn.Linear] = []
        self._handles: list = []
        self._rows: list[tuple[int, int, str, np.ndarray]] = []
        self._writer: pq.ParquetWriter | None = None
        self._step: int | None = None  # the step being recorded, None between recorded steps
        self._pending: dict[tuple[int, str], np.ndarray] = {}
        self._tensors: dict[tuple[int, str], Tensor] = {}
        self.rows_written = 0

    def setup(self, trainer, pl_module, stage):
        if stage == "fit":
            self.linears = [m for m in pl_module.modules() if isinstance(m, nn.Linear)]
            if not self.linears:
                raise ValueError("HistogramCallback found no nn.Linear layer in the LightningModule")
            self._acts = [m for m in pl_module.modules() if type(m) in ACTIVATION_BY_TYPE]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if step % self.every_n_steps or self._handles:
            return
        self._step, self._last, self._pending, self._tensors = step, None, {}, {}
        for i, lin in enumerate(self.linears):
            self._handles.append(lin.register_forward_hook(self._linear_hook(i)))
        for m in self._acts:
            self._handles.append(m.register_forward_hook(self._act_hook))

    def _linear_hook(self, i: int):
        def hook(module, inputs, out):
            if module.training and out.requires_grad:
                self._last = i
                out.register_hook(lambda g: self._keep(i, "backprop", g))
        return hook

    def _act_hook(self, module, inputs, out):
        if module.training and self._last is not None:
            self._keep(self._last, "act", out)

    def _keep(self, layer: int, quantity: str, t: Tensor) -> None:
        self._tensors[(layer, quantity)] = t  # the last micro-batch's stands for the step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self._step is None:
            return
        for i, lin in enumerate(self.linears):
            if lin.weight.grad is not None:  # before clipping, which would change it in place
                self._tensors[(i, "grad")] = lin.weight.grad
        keys = sorted(self._tensors)
        if keys:
            self._pending = dict(zip(keys, log10_histograms([self._tensors[k] for k in keys])))
        self._tensors = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._step is None or trainer.global_step == self._step:  # mid-accumulation: keep the hooks
            return
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for (layer, quantity), counts in sorted(self._pending.items()):
            self._rows.append((self._step, layer, quantity, counts))
        self._pending, self._step = {}, None
        if len(self._rows) >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        counts = np.stack([r[3] for r in self._rows])
        cols = {"step": np.array([r[0] for r in self._rows], dtype=np.int64),
                "layer": np.array([r[1] for r in self._rows], dtype=np.int16),
                "quantity": [r[2] for r in self._rows]}
        cols.update({c: counts[:, j] for j, c in enumerate(BIN_COLUMNS)})
        cols["zeros"], cols["nonfinite"] = counts[:, N_BINS], counts[:, N_BINS + 1]
        table = pa.table(cols).replace_schema_metadata({"log10_edges": ",".join(f"{e:g}" for e in EDGES)})
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.path, table.schema, compression="zstd")
        self._writer.write_table(table)
        self.rows_written += len(self._rows)
        self._rows = []

    def close(self) -> Path | None:
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.path if self.path.exists() else None

    def teardown(self, trainer, pl_module, stage):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.close()


def read_histograms(path: str | Path) -> dict[str, dict]:
    """{quantity: {"steps": [T], "layers": [L], "counts": [T, L, n_bins] int64, "zeros": [T, L],
    "nonfinite": [T, L]}}, missing (step, layer) cells as zeros; plus "edges" at the top level."""
    table = pq.read_table(path)
    out: dict[str, dict] = {"edges": EDGES}
    step, layer, quantity = (table[c].to_numpy(zero_copy_only=False) for c in ("step", "layer", "quantity"))
    counts = np.stack([table[c].to_numpy() for c in (*BIN_COLUMNS, "zeros", "nonfinite")], axis=1)
    for q in QUANTITIES:
        sel = quantity == q
        if not sel.any():
            continue
        steps, layers = np.unique(step[sel]), np.unique(layer[sel])
        m = np.zeros((len(steps), len(layers), N_BINS + 2), dtype=np.int64)
        m[np.searchsorted(steps, step[sel]), np.searchsorted(layers, layer[sel])] = counts[sel]
        out[q] = {"steps": steps, "layers": layers, "counts": m[..., :N_BINS], "zeros": m[..., N_BINS],
                  "nonfinite": m[..., N_BINS + 1]}
    return out
