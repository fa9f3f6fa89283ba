"""Read a .npy header without touching its data, so shape and dtype are checked before a load."""

from __future__ import annotations

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
