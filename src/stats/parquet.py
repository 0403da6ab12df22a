"""A Parquet file written one row group at a time, opened on the first write: the trace and the histograms
keep at most one chunk in memory however long the run."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


class ParquetAppender:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._writer: pq.ParquetWriter | None = None
        self.row_groups = 0

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.path, table.schema, compression="zstd")
        self._writer.write_table(table)
        self.row_groups += 1

    def close(self) -> Path | None:
        """The file, or None when nothing was ever written."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.path if self.path.exists() else None
