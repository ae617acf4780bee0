"""NumPy <-> Arrow without pandas: the columns a run writes (steps, requests) and the tables it reads.

``pyarrow.array(ndarray)`` and ``Array.to_numpy()`` import pandas on first use (pyarrow's pandas shim
checks every input for pandas types), which costs a whole run more than writing its results. These
helpers wrap NumPy memory in Arrow buffers and back, which pyarrow does without that check. Values
and types are the ones ``pa.Table.from_pandas`` and ``to_pandas`` give, so the Parquet files written
from them are byte-identical to the pandas route's.
"""
from __future__ import annotations

import numpy as np


def from_numpy(a: np.ndarray, *, nan_is_null: bool = False):
    """A numeric ``pa.Array`` over ``a`` (copied only when not contiguous). ``nan_is_null``: NaN
    entries become nulls, as ``from_pandas`` makes them."""
    import pyarrow as pa

    a = np.ascontiguousarray(a)
    if a.dtype.kind not in "iuf":
        raise TypeError(f"from_numpy: numeric arrays only, not {a.dtype}")
    validity, nulls = None, 0
    if nan_is_null and a.dtype.kind == "f":
        isnan = np.isnan(a)
        nulls = int(isnan.sum())
        if nulls:
            validity = pa.py_buffer(np.packbits(~isnan, bitorder="little"))
    return pa.Array.from_buffers(pa.from_numpy_dtype(a.dtype), a.size, [validity, pa.py_buffer(a)], nulls)


def strings(values: list[str], large: bool = False):
    """A ``pa.string()`` (or ``large_string``) array of ``values`` (none null)."""
    import pyarrow as pa

    data = [v.encode() for v in values]
    offsets = np.zeros(len(data) + 1, dtype=np.int64 if large else np.int32)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    return pa.Array.from_buffers(pa.large_string() if large else pa.string(), len(data),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])


def categorical(codes: np.ndarray, categories: list[str]):
    """``pd.Categorical.from_codes(codes, categories)`` as Arrow gets it from pandas (3.x): a dictionary
    of ``large_string`` values with the smallest signed index type that holds the categories, not
    ordered."""
    import pyarrow as pa

    n = len(categories)
    dtype = np.int8 if n <= 127 else np.int16 if n <= 32767 else np.int32
    return pa.DictionaryArray.from_arrays(from_numpy(np.asarray(codes).astype(dtype, copy=False)),
                                          strings(categories, large=True))


def to_numpy(column) -> np.ndarray:
    """A ``pa.Array`` or ``ChunkedArray`` as NumPy, as pandas reads it: numbers as their dtype (with
    nulls: float64 and NaN), strings as an object array of ``str``."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    t = column.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return np.array(column.to_pylist(), dtype=object)
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise TypeError(f"to_numpy: numeric or string columns only, not {t}")
    dtype = np.dtype(t.to_pandas_dtype())
    n, off = len(column), column.offset
    values = np.frombuffer(column.buffers()[1], dtype=dtype, count=off + n)[off:]
    if column.null_count == 0:
        return values.copy()
    valid = np.unpackbits(np.frombuffer(column.buffers()[0], dtype=np.uint8), bitorder="little")[off:off + n]
    out = values.astype(np.float64)
    out[valid == 0] = np.nan
    return out
