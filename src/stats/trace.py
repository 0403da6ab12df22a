"""The dense traces, Parquet files written in bounded chunks: memory holds at most `chunk_steps` steps, each
chunk one row group, so a 1M-step run costs disk, not RAM.

- trace.parquet: one row per (step, module); columns `step`, `layer` (the module's index), `module` (its
  path), `kind` (src.stats.modules.KINDS) and one float32 column per name in src.stats.names.LAYER_STATS.
- time_trace.parquet: one row per (step, recurrent module, time step); columns `step`, `module`, `time`
  (0 = the first step of the sequence) and `backprop_norm` (||dL/dh_t||, float64: exact zeros are kept).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from src.stats.parquet import ParquetAppender


class TraceWriter:
    def __init__(self, path: str | Path, columns: tuple[str, ...], modules: list[str], kinds: list[str],
                 chunk_steps: int = 1024):
        if chunk_steps <= 0:
            raise ValueError(f"chunk_steps must be positive, got {chunk_steps}")
        self.path = Path(path)
        self.columns, self.n_layers, self.chunk_steps = columns, len(modules), chunk_steps
        self.modules, self.kinds = modules, kinds
        self._steps = np.empty(chunk_steps, dtype=np.int64)
        self._values = np.empty((chunk_steps, self.n_layers, len(columns)), dtype=np.float32)
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
            "module": pa.DictionaryArray.from_arrays(np.tile(np.arange(L, dtype=np.int32), n), self.modules),
            "kind": pa.DictionaryArray.from_arrays(np.tile(np.arange(L, dtype=np.int32), n), self.kinds),
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
    """{'steps': [T], 'layers': [L], 'modules': [L] paths, 'kinds': [L], stat: [T, L] for each stat column}: the
    trace as dense matrices."""
    table = pq.ParquetFile(path).read()  # read_table imports pyarrow.dataset, slower than the read
    steps = np.unique(table["step"].to_numpy())
    layers = np.unique(table["layer"].to_numpy())
    row = np.searchsorted(steps, table["step"].to_numpy())
    col = table["layer"].to_numpy().astype(np.int64)
    out: dict[str, np.ndarray] = {"steps": steps, "layers": layers}
    first = np.unique(col, return_index=True)[1]  # each module's first row, in the order of `layers`
    for name, key in (("module", "modules"), ("kind", "kinds")):
        out[key] = np.asarray(table[name].take(first).to_pylist(), dtype=object)
    for name in table.column_names:
        if name in ("step", "layer", "module", "kind"):
            continue
        m = np.full((len(steps), len(layers)), np.nan, dtype=np.float32)
        m[row, col] = table[name].to_numpy(zero_copy_only=False)
        out[name] = m
    return out


class TimeTraceWriter:
    """Rows (step, module, time, ||dL/dh_t||) of the signal through time, one row group per `chunk_steps`
    armed steps."""

    def __init__(self, path: str | Path, chunk_steps: int = 1024):
        self.path, self.chunk_steps = Path(path), chunk_steps
        self._parts: list[tuple[int, str, np.ndarray]] = []
        self._file = ParquetAppender(self.path)

    def append(self, step: int, module: str, norms: np.ndarray) -> None:
        self._parts.append((step, module, np.asarray(norms, dtype=np.float64)))
        if len(self._parts) >= self.chunk_steps:
            self.flush()

    def flush(self) -> None:
        if not self._parts:
            return
        sizes = [len(n) for _, _, n in self._parts]
        self._file.write(pa.table({
            "step": np.repeat([s for s, _, _ in self._parts], sizes).astype(np.int64),
            "module": np.repeat([m for _, m, _ in self._parts], sizes).tolist(),
            "time": np.concatenate([np.arange(n, dtype=np.int32) for n in sizes]),
            "backprop_norm": np.concatenate([n for _, _, n in self._parts]),
        }))
        self._parts = []

    def close(self) -> Path | None:
        self.flush()
        return self._file.close()


def read_time_trace(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """{module: {"steps": [S], "norms": [S, T]}}: ||dL/dh_t|| of each recurrent module at each armed step."""
    table = pq.ParquetFile(path).read()  # read_table imports pyarrow.dataset, slower than the read
    step, module = table["step"].to_numpy(), np.asarray(table["module"].to_pylist(), dtype=object)
    time, norm = table["time"].to_numpy(), table["backprop_norm"].to_numpy()
    out = {}
    for name in dict.fromkeys(module):  # in the order first written
        rows = module == name
        steps = np.unique(step[rows])
        m = np.full((len(steps), int(time[rows].max()) + 1), np.nan)
        m[np.searchsorted(steps, step[rows]), time[rows]] = norm[rows]
        out[str(name)] = {"steps": steps, "norms": m}
    return out
