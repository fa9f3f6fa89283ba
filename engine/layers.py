"""Fast-path graph layers: add, concat, batchnorm, lrn, global pools, softmax, sigmoid, tanh, clip.

x is (N, H, W, C) float32 NHWC; per-channel arrays are (C,). Each function matches its
*_reference in engine.layers_reference to float32 rounding (tests/unit/test_layers*.py). They are
whole-array NumPy passes (memory-bound, a few per layer), never Python loops over elements; lrn's
only loop runs over its window's `size` channel offsets. The elementwise ones (add, batchnorm,
sigmoid, tanh, clip) take `out=`, which may be their (first) input: a model overwrites a value
no later layer reads instead of allocating another.
"""

from __future__ import annotations

import numpy as np

from . import _args
from .errors import InputError, ShapeError


def _same(xs, op: str) -> list[np.ndarray]:
    if not isinstance(xs, (list, tuple)) or len(xs) < 2:
        raise InputError(f"{op} takes a list of at least 2 arrays", field="xs")
    arrays = [_args.input_array(x, "xs") for x in xs]
    return arrays


def _target(out, shape: tuple) -> np.ndarray | None:
    """Return out if it can take a result of this shape in place (float32, C order, writeable)."""
    if out is None:
        return None
    if (
        not isinstance(out, np.ndarray)
        or out.dtype != np.float32
        or out.shape != shape
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise InputError(
            f"out must be a writeable C-contiguous float32 array of shape {shape}", field="out"
        )
    return out


def add(xs, relu: bool = False, out=None) -> np.ndarray:
    """Return the elementwise sum of arrays of one shape (N, H, W, C), max(., 0) if relu."""
    arrays = _same(xs, "add")
    if len({a.shape for a in arrays}) > 1:
        shapes = ", ".join(str(a.shape) for a in arrays)
        raise ShapeError(f"add needs arrays of one shape, got {shapes}", field="xs")
    out = np.add(arrays[0], arrays[1], out=_target(out, arrays[0].shape))
    for a in arrays[2:]:
        out += a
    if relu:
        np.maximum(out, 0.0, out=out)
    return out


def concat(xs) -> np.ndarray:
    """Return arrays (N, H, W, C_i) joined along channels: (N, H, W, sum C_i)."""
    arrays = _same(xs, "concat")
    if len({a.shape[:3] for a in arrays}) > 1:
        shapes = ", ".join(str(a.shape) for a in arrays)
        raise ShapeError(f"concat needs arrays of one (N, H, W), got {shapes}", field="xs")
    return np.concatenate(arrays, axis=3)


def _channel(value, c: int, name: str) -> np.ndarray:
    return _args.param(value, (c,), name).astype(np.float64)


def batchnorm_affine(scale, shift, mean, var, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Return (a, b) float64 (C,) with batchnorm(x) = x * a + b: a = scale / sqrt(var + eps)."""
    c = int(np.size(scale)) if np.ndim(scale) == 1 else 0
    s, t, m, v = (
        _channel(arr, c, name)
        for arr, name in ((scale, "scale"), (shift, "shift"), (mean, "mean"), (var, "var"))
    )
    if not eps > 0 or (v + eps <= 0).any():
        raise ShapeError("batchnorm needs var + eps > 0 in every channel", field="var")
    a = s / np.sqrt(v + eps)
    return a, t - m * a


def batchnorm(x, scale, shift, mean, var, eps: float = 1e-5, out=None) -> np.ndarray:
    """Return (x - mean) / sqrt(var + eps) * scale + shift per channel (inference mode)."""
    x = _args.input_array(x)
    if np.ndim(scale) != 1 or np.shape(scale)[0] != x.shape[3]:
        raise ShapeError(
            f"scale must have shape ({x.shape[3]},), got {np.shape(scale)}", field="scale"
        )
    a, b = batchnorm_affine(scale, shift, mean, var, eps)
    out = np.multiply(x, a.astype(np.float32), out=_target(out, x.shape))
    out += b.astype(np.float32)
    return out


def lrn(x, size: int, alpha: float = 1e-4, beta: float = 0.75, bias: float = 1.0) -> np.ndarray:
    """Return x[c] / (bias + alpha/size * sum of x[c']^2 over the size channels around c)^beta.

    The window is c - floor((size-1)/2) .. c + ceil((size-1)/2), clipped to [0, C) (ONNX LRN).
    """
    x = _args.input_array(x)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ShapeError(f"size must be an integer >= 1, got {size!r}", field="size")
    c = x.shape[3]
    lo = (size - 1) // 2
    sq = np.square(x)
    total = np.zeros_like(sq)
    for off in range(-lo, size - lo):
        if abs(off) >= c:
            continue
        if off >= 0:
            total[..., : c - off] += sq[..., off:]
        else:
            total[..., -off:] += sq[..., : c + off]
    total *= np.float32(alpha / size)
    total += np.float32(bias)
    np.power(total, np.float32(-beta), out=total)
    total *= x
    return total


def global_avg_pool(x) -> np.ndarray:
    """Return the mean over height and width: (N, 1, 1, C)."""
    x = _args.input_array(x)
    return x.mean(axis=(1, 2), keepdims=True, dtype=np.float64).astype(np.float32)


def global_max_pool(x) -> np.ndarray:
    """Return the max over height and width: (N, 1, 1, C)."""
    x = _args.input_array(x)
    if x.shape[1] * x.shape[2] == 0:
        raise InputError(f"x has no pixels: shape {x.shape}", field="x")
    return x.max(axis=(1, 2), keepdims=True)


def softmax(x) -> np.ndarray:
    """Return exp(x - max) / sum(exp(x - max)) over channels at each position."""
    x = _args.input_array(x)
    out = np.subtract(x, x.max(axis=3, keepdims=True))
    np.exp(out, out=out)
    out /= out.sum(axis=3, keepdims=True)
    return out


def sigmoid(x, out=None) -> np.ndarray:
    """Return 1 / (1 + exp(-x)) elementwise, as 0.5 * tanh(x / 2) + 0.5 (no overflow)."""
    x = _args.input_array(x)
    out = np.multiply(x, np.float32(0.5), out=_target(out, x.shape))
    np.tanh(out, out=out)
    out *= np.float32(0.5)
    out += np.float32(0.5)
    return out


def tanh(x, out=None) -> np.ndarray:
    """Return tanh(x) elementwise."""
    x = _args.input_array(x)
    return np.tanh(x, out=_target(out, x.shape))


def clip(x, lo: float | None = None, hi: float | None = None, out=None) -> np.ndarray:
    """Return x clamped to [lo, hi] elementwise; None leaves that side open (ReLU6: 0, 6)."""
    x = _args.input_array(x)
    target = _target(out, x.shape)
    if lo is None and hi is None:
        if target is None:
            return x.copy()
        target[...] = x
        return target
    return np.clip(
        x,
        np.float32(lo) if lo is not None else None,
        np.float32(hi) if hi is not None else None,
        out=target,
    )
