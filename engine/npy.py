"""The .npy format: read a header without touching its data (shape and dtype are checked before
a load), and write or view C-order arrays as .npy bytes; never pickled."""

from __future__ import annotations

import io

import numpy as np


def read_header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Return (shape, fortran_order, dtype) of the .npy at stream's position.

    Only formats 1.0 and 2.0 are read (ValueError otherwise); numpy's parser raises ValueError,
    SyntaxError, TypeError or EOFError on a malformed header, which callers turn into their own
    errors. Never unpickles: a header is a Python literal, parsed without evaluation.
    """
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(stream)
    raise ValueError(f"unsupported .npy format {version}")


def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """Return the .npy header that precedes the raw C-order bytes of an array shape, dtype."""
    info = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": tuple(int(d) for d in shape),
    }
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, info)
    except ValueError:  # a header over 64 KiB (absurdly many dimensions) needs format 2.0
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, info)
    return buf.getvalue()


def to_npy(array: np.ndarray) -> bytes:
    """Return array as .npy bytes (never pickled); one copy of the data."""
    array = np.ascontiguousarray(array)
    if array.dtype.hasobject:
        raise ValueError("object arrays are not stored")
    return b"".join([npy_header(array.shape, array.dtype), array.data.cast("B")])


def npy_layout(data) -> tuple[tuple[int, ...], np.dtype, int]:
    """Return (shape, dtype, data offset) of C-order .npy bytes; ValueError for anything else."""
    stream = io.BytesIO(bytes(memoryview(data)[: 65536 + 16]))  # the longest 2.0 header
    shape, fortran, dtype = read_header(stream)
    if fortran or dtype.hasobject:
        raise ValueError(
            f"stored array is {dtype} fortran={fortran}; only C-order plain "
            "dtypes are read (allow_pickle=False)"
        )
    return shape, dtype, stream.tell()


def from_npy(data) -> np.ndarray:
    """Read .npy bytes without copying them; object arrays are refused (allow_pickle=False)."""
    shape, dtype, offset = npy_layout(data)
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(data, dtype, count=count, offset=offset).reshape(shape)
