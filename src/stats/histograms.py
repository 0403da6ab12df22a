"""Per-layer histograms of log10|value|: the binning (a pure function: fixed bins, exact zeros and NaN/Inf
counted apart) and the Parquet file they are kept in.

The file has one row per (step, module, quantity) with columns `step`, `layer` (the module's index), `module`
(its path), `quantity` (grad | backprop | act), one count column per bin (`bin_00` ... holding log10|x| in [EDGES[i], EDGES[i+1]); the first and last
bins also take everything below/above the range), `zeros` and `nonfinite`; the bin edges are in its metadata.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from src.stats.parquet import ParquetAppender

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


class HistogramWriter:
    """Rows (step, layer, quantity, counts) appended to the histogram file in row groups of `chunk_rows`."""

    def __init__(self, path: str | Path, chunk_rows: int = 4096):
        if not isinstance(chunk_rows, int) or chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        self.path, self.chunk_rows = Path(path), chunk_rows
        self._rows: list[tuple[int, int, str, np.ndarray]] = []
        self._file = ParquetAppender(self.path)
        self.rows_written = 0

    @property
    def row_groups(self) -> int:
        return self._file.row_groups

    def append(self, step: int, layer: int, module: str, quantity: str, counts: np.ndarray) -> None:
        self._rows.append((step, layer, module, quantity, counts))
        if len(self._rows) >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        counts = np.stack([r[4] for r in self._rows])
        cols = {"step": np.array([r[0] for r in self._rows], dtype=np.int64),
                "layer": np.array([r[1] for r in self._rows], dtype=np.int16),
                "module": [r[2] for r in self._rows], "quantity": [r[3] for r in self._rows]}
        cols.update({c: counts[:, j] for j, c in enumerate(BIN_COLUMNS)})
        cols["zeros"], cols["nonfinite"] = counts[:, N_BINS], counts[:, N_BINS + 1]
        self._file.write(pa.table(cols).replace_schema_metadata({"log10_edges": ",".join(f"{e:g}" for e in EDGES)}))
        self.rows_written += len(self._rows)
        self._rows = []

    def close(self) -> Path | None:
        self.flush()
        return self._file.close()


def read_histograms(path: str | Path) -> dict[str, dict]:
    """{quantity: {"steps": [T], "layers": [L], "modules": [L], "counts": [T, L, n_bins] int64, "zeros":
    [T, L], "nonfinite": [T, L]}}, missing (step, layer) cells as zeros; plus "edges" at the top level."""
    table = pq.ParquetFile(path).read()  # read_table imports pyarrow.dataset, slower than the read
    out: dict[str, dict] = {"edges": EDGES}
    step, layer, quantity, module = (table[c].to_numpy(zero_copy_only=False)
                                     for c in ("step", "layer", "quantity", "module"))
    counts = np.stack([table[c].to_numpy() for c in (*BIN_COLUMNS, "zeros", "nonfinite")], axis=1)
    for q in QUANTITIES:
        sel = quantity == q
        if not sel.any():
            continue
        steps, layers = np.unique(step[sel]), np.unique(layer[sel])
        m = np.zeros((len(steps), len(layers), N_BINS + 2), dtype=np.int64)
        m[np.searchsorted(steps, step[sel]), np.searchsorted(layers, layer[sel])] = counts[sel]
        names = {int(i): str(n) for i, n in zip(layer[sel], module[sel])}
        out[q] = {"steps": steps, "layers": layers, "modules": [names[int(i)] for i in layers],
                  "counts": m[..., :N_BINS], "zeros": m[..., N_BINS],
                  "nonfinite": m[..., N_BINS + 1]}
    return out
