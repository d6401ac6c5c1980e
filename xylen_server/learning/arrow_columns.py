"""Arrow columns to and from numpy without pyarrow's conversion layer, so a serving process
never imports pandas or ``pyarrow.compute``.

pyarrow's convenient calls pull in far more than they use, once per process, for good:

- ``pa.array(...)`` asks whether its argument is a pandas object, and asking imports pandas
  (with dateutil and pytz: ~36 MiB of RSS in a server) whenever pandas is installed;
- ``Array.cast``, ``Array.to_numpy`` and ``ListArray.flatten`` import ``pyarrow.compute``
  (~13 MiB: a Python wrapper and docstring for every kernel);
- ``pq.read_table(path)`` goes through ``pyarrow.dataset``, which does both.

The prediction log's flusher and the feedback store's compactor run in the server for its
whole life, so they build their columns from buffers (``Array.from_buffers``) and read them
back with ``np.frombuffer``, and read Parquet with ``pq.ParquetFile``: none of these imports
either. ``tests/server/learning/test_arrow_imports.py`` holds them to it. Tools and the
retrain job (their own processes) use polars and the ordinary pyarrow calls freely.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_NUMPY: dict[pa.DataType, type[np.generic]] = {
    pa.int8(): np.int8,
    pa.int32(): np.int32,
    pa.int64(): np.int64,
    pa.float32(): np.float32,
    pa.float64(): np.float64,
}


def _numpy_dtype(arrow_type: pa.DataType) -> type[np.generic]:
    if pa.types.is_timestamp(arrow_type):
        return np.int64  # milliseconds (or the type's unit) since the epoch
    try:
        return _NUMPY[arrow_type]
    except KeyError:
        raise TypeError(f"no fixed-width numpy layout for {arrow_type}") from None


def fixed(
    values: np.ndarray | Sequence[int] | Sequence[float], arrow_type: pa.DataType
) -> pa.Array:
    """A column of ``arrow_type`` (an int, float or timestamp type) holding ``values``, no
    nulls; a timestamp column takes integer counts of its unit since the epoch."""
    data = np.ascontiguousarray(values, dtype=_numpy_dtype(arrow_type))
    if data.ndim != 1:
        raise ValueError(f"a column is one-dimensional, got shape {data.shape}")
    return pa.Array.from_buffers(arrow_type, len(data), [None, pa.py_buffer(data)], null_count=0)


def nullable(values: Sequence[float | int | None], arrow_type: pa.DataType) -> pa.Array:
    """A column of ``arrow_type`` where None is null."""
    missing = np.fromiter((v is None for v in values), dtype=bool, count=len(values))
    data = np.fromiter(
        (0 if v is None else v for v in values), dtype=_numpy_dtype(arrow_type), count=len(values)
    )
    nulls = int(missing.sum())
    validity = pa.py_buffer(np.packbits(~missing, bitorder="little")) if nulls else None
    return pa.Array.from_buffers(
        arrow_type, len(data), [validity, pa.py_buffer(data)], null_count=nulls
    )


def strings(values: Sequence[str | None]) -> pa.Array:
    """A ``pa.string()`` column of ``values`` (UTF-8); None is null."""
    encoded = [b"" if v is None else v.encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError(f"{offsets[-1]} bytes of strings do not fit one Arrow string column")
    missing = np.fromiter((v is None for v in values), dtype=bool, count=len(values))
    nulls = int(missing.sum())
    validity = pa.py_buffer(np.packbits(~missing, bitorder="little")) if nulls else None
    return pa.Array.from_buffers(
        pa.string(),
        len(encoded),
        [validity, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(encoded))],
        null_count=nulls,
    )


def strings_from_fixed(values: np.ndarray) -> pa.Array:
    """A ``pa.string()`` column from a numpy bytes array (dtype ``S<k>``, UTF-8), each value
    without its trailing NUL padding (as numpy reads it): built with numpy, no Python object
    per row, so a 50,000-row copy costs its bytes and not ~80 bytes of ``str`` a row."""
    count, width = len(values), values.dtype.itemsize
    if count == 0 or width == 0:
        return strings([""] * count)
    matrix = np.ascontiguousarray(values).view(np.uint8).reshape(count, width)
    filled = matrix != 0
    lengths = np.where(filled.any(axis=1), width - np.argmax(filled[:, ::-1], axis=1), 0)
    offsets = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = matrix[np.arange(width) < lengths[:, None]]  # row by row, each row's bytes
    return pa.Array.from_buffers(
        pa.string(),
        count,
        [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)],
        null_count=0,
    )


def float32_lists(offsets: np.ndarray, flat: np.ndarray) -> pa.Array:
    """A ``list<float32>`` column: row ``i`` is ``flat[offsets[i]:offsets[i + 1]]``."""
    return pa.ListArray.from_arrays(fixed(offsets, pa.int32()), fixed(flat, pa.float32()))


def _one_chunk(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks()
    return column


def to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The values of a fixed-width column without nulls (a timestamp column: int64 counts
    of its unit), as a read-only numpy array over Arrow's buffer."""
    array = _one_chunk(column)
    if array.null_count:
        raise ValueError(f"column of {array.type} has {array.null_count} nulls")
    dtype = np.dtype(_numpy_dtype(array.type))
    buffer = array.buffers()[1]
    if buffer is None:
        return np.empty(0, dtype)
    return np.frombuffer(
        buffer, dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize
    )


def float32_lists_to_numpy(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, flat) of a ``list<float32>`` column: row ``i`` is
    ``flat[offsets[i]:offsets[i + 1]]``."""
    array = _one_chunk(column)
    assert isinstance(array, pa.ListArray)
    return to_numpy(array.offsets), to_numpy(array.values)


def read_parquet(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """One Parquet file (``columns`` of it, or all) as a table, without ``pyarrow.dataset``."""
    with pq.ParquetFile(path) as file:
        return file.read(columns=list(columns) if columns is not None else None)
