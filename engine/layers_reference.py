"""Plain-loop graph layers written straight from their definitions (float64 accumulation).

What engine.layers is tested against; x is (N, H, W, C) float32 NHWC, per-channel arrays (C,).
"""

from __future__ import annotations

import math

import numpy as np


def _out(x) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64)
    return x, np.zeros(x.shape, np.float64)


def _positions(shape):
    n, h, w = shape[:3]
    for i in range(n):
        for y in range(h):
            for x in range(w):
                yield i, y, x


def add_reference(xs, relu: bool = False) -> np.ndarray:
    """Sum equal-shape arrays, then max(., 0) if relu."""
    first, out = _out(xs[0])
    for idx in np.ndindex(first.shape):
        total = sum(float(np.asarray(x)[idx]) for x in xs)
        out[idx] = max(total, 0.0) if relu else total
    return out.astype(np.float32)


def concat_reference(xs) -> np.ndarray:
    """Join along channels: the output's channels are xs[0]'s, then xs[1]'s, and so on."""
    n, h, w = np.shape(xs[0])[:3]
    channels = [np.shape(x)[3] for x in xs]
    out = np.zeros((n, h, w, sum(channels)), np.float32)
    for pos in _positions(out.shape):
        k = 0
        for x, c in zip(xs, channels, strict=True):
            for ci in range(c):
                out[pos + (k,)] = x[pos + (ci,)]
                k += 1
    return out


def batchnorm_reference(x, scale, shift, mean, var, eps: float = 1e-5) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * scale + shift per channel."""
    x, out = _out(x)
    for pos in _positions(x.shape):
        for c in range(x.shape[3]):
            norm = (x[pos + (c,)] - float(mean[c])) / math.sqrt(float(var[c]) + eps)
            out[pos + (c,)] = norm * float(scale[c]) + float(shift[c])
    return out.astype(np.float32)


def lrn_reference(x, size: int, alpha=1e-4, beta=0.75, bias=1.0) -> np.ndarray:
    """x[c] / (bias + alpha/size * sum of x[c']^2)^beta.

    c' runs over [c - floor((size-1)/2), c + ceil((size-1)/2)] within [0, C).
    """
    x, out = _out(x)
    c_all = x.shape[3]
    for pos in _positions(x.shape):
        for c in range(c_all):
            lo = max(0, c - (size - 1) // 2)
            hi = min(c_all - 1, c + math.ceil((size - 1) / 2))
            total = sum(x[pos + (j,)] ** 2 for j in range(lo, hi + 1))
            out[pos + (c,)] = x[pos + (c,)] / (bias + alpha / size * total) ** beta
    return out.astype(np.float32)


def global_avg_pool_reference(x) -> np.ndarray:
    """Mean of each channel over all H x W positions: (N, 1, 1, C)."""
    x = np.asarray(x, np.float64)
    n, h, w, c = x.shape
    out = np.zeros((n, 1, 1, c))
    for i in range(n):
        for k in range(c):
            out[i, 0, 0, k] = sum(x[i, y, xx, k] for y in range(h) for xx in range(w)) / (h * w)
    return out.astype(np.float32)


def global_max_pool_reference(x) -> np.ndarray:
    """Max of each channel over all H x W positions: (N, 1, 1, C)."""
    x = np.asarray(x, np.float64)
    n, h, w, c = x.shape
    out = np.zeros((n, 1, 1, c))
    for i in range(n):
        for k in range(c):
            out[i, 0, 0, k] = max(x[i, y, xx, k] for y in range(h) for xx in range(w))
    return out.astype(np.float32)


def softmax_reference(x) -> np.ndarray:
    """exp(x_c - max) / sum_c' exp(x_c' - max) over channels at each position."""
    x, out = _out(x)
    for pos in _positions(x.shape):
        top = max(x[pos])
        exps = [math.exp(v - top) for v in x[pos]]
        total = sum(exps)
        for c, e in enumerate(exps):
            out[pos + (c,)] = e / total
    return out.astype(np.float32)


def _elementwise(x, f) -> np.ndarray:
    x, out = _out(x)
    for idx in np.ndindex(x.shape):
        out[idx] = f(float(x[idx]))
    return out.astype(np.float32)


def sigmoid_reference(x) -> np.ndarray:
    """1 / (1 + exp(-x)), written so neither branch overflows."""
    return _elementwise(
        x, lambda v: 1 / (1 + math.exp(-v)) if v >= 0 else math.exp(v) / (1 + math.exp(v))
    )


def tanh_reference(x) -> np.ndarray:
    """tanh(x) elementwise."""
    return _elementwise(x, math.tanh)


def clip_reference(x, lo=None, hi=None) -> np.ndarray:
    """min(max(x, lo), hi) elementwise; a None bound is open."""

    def f(v):
        if lo is not None and v < lo:
            v = lo
        if hi is not None and v > hi:
            v = hi
        return v

    return _elementwise(x, f)
