"""Check and normalise the fast layers' array arguments: dtype, shape, contiguity, read-only.

Every failure raises InputError (the images) or ShapeError (weights, bias) naming the field.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError, ShapeError


def read_only(arr: np.ndarray) -> np.ndarray:
    """Return a read-only view: Numba compiles read-only and writeable arrays separately, and
    inputs arrive both ways (np.frombuffer, safetensors), so every kernel takes read-only
    inputs and warmup() covers them all with one signature each."""
    view = arr.view()
    view.flags.writeable = False
    return view


def input_array(x, name: str = "x") -> np.ndarray:
    """Return x as C-contiguous float32 (N, H, W, C), or raise InputError naming the field."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise InputError(f"{name} must be a float32 array, got dtype {arr.dtype}", field=name)
    if arr.ndim != 4:
        raise InputError(f"{name} must be 4-d (N, H, W, C), got shape {arr.shape}", field=name)
    if arr.shape[3] == 0:
        raise InputError(f"{name} has no channels: shape {arr.shape}", field=name)
    return read_only(np.ascontiguousarray(arr, dtype=np.float32))


def param(value, shape: tuple, name: str) -> np.ndarray:
    """Return weights/bias as C-contiguous float32 of the given shape, or raise ShapeError."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiub":
        raise ShapeError(f"{name} must be a float32 array, got dtype {arr.dtype}", field=name)
    if arr.shape != shape:
        raise ShapeError(f"{name} must have shape {shape}, got {arr.shape}", field=name)
    return read_only(np.ascontiguousarray(arr, dtype=np.float32))


def weights(w, ndim: int, layout: str) -> np.ndarray:
    """Return w as read-only C-contiguous float32 with ndim axes, none empty, or ShapeError."""
    arr = np.asarray(w)
    if arr.ndim != ndim:
        raise ShapeError(f"w must be {ndim}-d {layout}, got shape {arr.shape}", field="w")
    if 0 in arr.shape:
        raise ShapeError(f"w has an empty axis: shape {arr.shape}", field="w")
    return param(arr, arr.shape, "w")


def channels(x: np.ndarray, c: int) -> None:
    """Raise ShapeError unless x (N, H, W, C) has the c channels the weights expect."""
    if x.shape[3] != c:
        raise ShapeError(
            f"x has {x.shape[3]} channels but w expects {c} (the last axis of both)", field="w"
        )
