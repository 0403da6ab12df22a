"""The dense trace: bounded memory (chunked row groups) and a faithful round trip."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from src.stats.trace import TraceWriter, read_trace


def test_buffer_is_bounded_and_flushed_in_chunks(tmp_path):
    w = TraceWriter(tmp_path / "t.parquet", ("a", "b"), ["x", "y.0", "z"], ["linear", "conv", "norm"], chunk_steps=4)
    buffer_bytes = w._values.nbytes
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((3, 2)).astype(np.float32) for _ in range(10)]
    for step, v in enumerate(rows):
        w.append(step * 5, v)
        assert w._values.nbytes == buffer_bytes  # memory does not grow with the run
    assert w.rows_written == 8 * 3  # two full chunks are already on disk
    path = w.close()
    assert pq.ParquetFile(path).num_row_groups == 3
    trace = read_trace(path)
    assert trace["steps"].tolist() == [s * 5 for s in range(10)]
    assert trace["modules"].tolist() == ["x", "y.0", "z"] and trace["kinds"].tolist() == ["linear", "conv", "norm"]
    np.testing.assert_array_equal(trace["a"], np.stack([r[:, 0] for r in rows]))
    np.testing.assert_array_equal(trace["b"], np.stack([r[:, 1] for r in rows]))


def test_no_rows_no_file(tmp_path):
    assert TraceWriter(tmp_path / "t.parquet", ("a",), ["m"], ["linear"]).close() is None
