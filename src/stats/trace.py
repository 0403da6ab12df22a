"""The dense per-step, per-layer trace: a Parquet file written in bounded chunks.

One row per (step, layer); columns `step`, `layer` and one float32 column per name in
src.stats.names.LAYER_STATS. Memory holds at most `chunk_steps` steps; each chunk becomes one Parquet row
group, so a 1M-step run costs disk, not RAM.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from src.stats.parquet import ParquetAppender


class TraceWriter:
    def __init__(self, path: str | Path, columns: tuple[str, ...], n_layers: int, chunk_steps: int = 1024):
        if chunk_steps <= 0:
            raise ValueError(f"chunk_steps must be positive, got {chunk_steps}")
        self.path = Path(path)
        self.columns, self.n_layers, self.chunk_steps = columns, n_layers, chunk_steps
        self._steps = np.empty(chunk_steps, dtype=np.int64)
        self._values = np.empty((chunk_steps, n_layers, len(columns)), dtype=np.float32)
        self._n = 0
        self._file = ParquetAppender(self.path)
        self.rows_written = 0

    def append(self, step: int, values: np.ndarray) -> None:
        """values: [n_layers, n_columns] for one optimizer step."""
        self._steps[self._n] = step
        self._values[self._n] = values
        self._n += 1
        if self._n == self.chunk_steps:
            self.flush()

    def flush(self) -> None:
        if self._n == 0:
            return
        n, L = self._n, self.n_layers
        arrays = {
            "step": np.repeat(self._steps[:n], L),
            "layer": np.tile(np.arange(L, dtype=np.int16), n),
        }
        flat = self._values[:n].reshape(n * L, len(self.columns))
        arrays.update({c: flat[:, j] for j, c in enumerate(self.columns)})
        self._file.write(pa.table(arrays))
        self.rows_written += n * L
        self._n = 0

    def close(self) -> Path | None:
        self.flush()
        return self._file.close()


def read_trace(path: str | Path) -> dict[str, np.ndarray]:
    """{'steps': [T], 'layers': [L], stat: [T, L] for each stat column}: the trace as dense matrices."""
    table = pq.read_table(path)
    steps = np.unique(table["step"].to_numpy())
    layers = np.unique(table["layer"].to_numpy())
    row = np.searchsorted(steps, table["step"].to_numpy())
    col = table["layer"].to_numpy().astype(np.int64)
    out: dict[str, np.ndarray] = {"steps": steps, "layers": layers}
    for name in table.column_names:
        if name in ("step", "layer"):
            continue
        m = np.full((len(steps), len(layers)), np.nan, dtype=np.float32)
        m[row, col] = table[name].to_numpy(zero_copy_only=False)
        out[name] = m
    return out
