"""Embedding files: uncompressed Arrow IPC (file format), memory-mapped zero-copy reads.

A dataset folder (`data/emb/<name>/`) holds shards `part-NNNNN.arrow`, optional extra
tables (e.g. `texts.arrow`), `manifest.json` and `report.json`. Vector columns are
`fixed_size_list<float16|float32>[d]`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from pyarrow import ipc

from pipeline.atomic import atomic_path
from pipeline.readers import readable

SHARD_GLOB = "part-*.arrow"


def vector_array(mat: np.ndarray, null: np.ndarray | None = None) -> pa.FixedSizeListArray:
    """A (n, d) float array as an Arrow fixed_size_list column (no copy of the values);
    rows where the boolean `null` is true are null (their values stay in the buffer)."""
    mat = np.ascontiguousarray(mat)
    if mat.ndim != 2:
        raise ValueError(f"expected a 2-d array, got shape {mat.shape}")
    mask = pa.array(null, pa.bool_()) if null is not None and null.any() else None
    return pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1)), mat.shape[1], mask=mask)


def write_table(path: str | Path, table: pa.Table) -> None:
    """Write `table` atomically as an uncompressed Arrow IPC file (mmap-able)."""
    with (
        atomic_path(path) as tmp,
        pa.OSFile(str(tmp), "wb") as sink,
        ipc.new_file(sink, table.schema) as writer,
    ):
        writer.write_table(table)


def read_table(path: str | Path) -> pa.Table:
    """Memory-map an Arrow IPC file; the returned table's buffers point into the map.

    A corrupt or non-Arrow file is a `UserError`; a missing one a `FileNotFoundError`.
    """
    with readable(path, "a readable Arrow IPC file"):
        source = pa.memory_map(str(path), "r")
        return ipc.open_file(source).read_all()


def read_dataset(folder: str | Path, pattern: str = SHARD_GLOB) -> pa.Table:
    """All shards of a folder (sorted by name) as one memory-mapped table."""
    paths = sorted(Path(folder).glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no {pattern} files in {folder}")
    tables = [read_table(p) for p in paths]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed_size_list column as an (n, d) numpy array.

    Zero-copy when the column has a single chunk (the values buffer is viewed, not
    copied); chunks are concatenated otherwise. (`FixedSizeListArray.to_numpy` cannot be
    zero-copy, so the flat `.values` buffer is reshaped instead.)
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    d = column.type.list_size
    views = []
    for chunk in chunks:
        flat = chunk.values
        if chunk.offset or len(flat) != len(chunk) * d:
            flat = flat.slice(chunk.offset * d, len(chunk) * d)
        views.append(flat.to_numpy(zero_copy_only=True).reshape(-1, d))
    if not views:
        return np.zeros((0, d), dtype=column.type.value_type.to_pandas_dtype())
    return views[0] if len(views) == 1 else np.concatenate(views)
