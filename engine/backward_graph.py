"""Backward passes of the graph layers (engine.layers), in NumPy: each is one or two
elementwise or channel-axis passes, given dout and what the forward pass saved.

x is (N, H, W, C) NHWC; every function returns float32 gradients shaped like its inputs.
"""

from __future__ import annotations

import numpy as np

from .layers import batchnorm_affine


def batchnorm_backward(dout, scale, shift, mean, var, eps=1e-5) -> np.ndarray:
    """Return dx of y = (x - mean) / sqrt(var + eps) * scale + shift (inference statistics)."""
    a, _ = batchnorm_affine(scale, shift, mean, var, eps)
    return (dout * a.astype(np.float32)).astype(np.float32)


def lrn_backward(x, dout, size, alpha=1e-4, beta=0.75, bias=1.0) -> np.ndarray:
    """Return dx of lrn (ONNX/PyTorch): y_c = x_c * d_c^-beta, d_c = bias + alpha/size * S_c,
    S_c the sum of x^2 over channels [c - floor((size-1)/2), c + ceil((size-1)/2)].

    dx_c = dout_c d_c^-beta - 2 alpha beta / size * x_c * sum over the c' whose window holds c
    of dout_c' x_c' d_c'^(-beta-1).
    """
    x64, g64 = x.astype(np.float64), dout.astype(np.float64)
    c = x.shape[-1]
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    d = bias + alpha / size * _window_sum(x64 * x64, lo, hi, c)
    t = g64 * x64 * d ** (-beta - 1)
    back = _window_sum(t, hi, lo, c)  # c' in [c - hi, c + lo]: the windows that hold c
    return (g64 * d**-beta - 2 * alpha * beta / size * x64 * back).astype(np.float32)


def _window_sum(v: np.ndarray, lo: int, hi: int, c: int) -> np.ndarray:
    """Return s_c = sum of v over channels [c - lo, c + hi] clipped to [0, C)."""
    cum = np.concatenate([np.zeros((*v.shape[:-1], 1)), np.cumsum(v, axis=-1)], axis=-1)
    idx = np.arange(c)
    top = np.minimum(idx + hi + 1, c)
    bottom = np.maximum(idx - lo, 0)
    return cum[..., top] - cum[..., bottom]


def softmax_backward(y, dout) -> np.ndarray:
    """Return dx of a softmax over channels given its output y: y * (dout - sum(dout * y))."""
    y64 = y.astype(np.float64)
    g64 = dout.astype(np.float64)
    return (y64 * (g64 - (g64 * y64).sum(axis=-1, keepdims=True))).astype(np.float32)


def sigmoid_backward(y, dout) -> np.ndarray:
    """Return dout * y * (1 - y) given the sigmoid's output y."""
    return (dout * y * (1 - y)).astype(np.float32)


def tanh_backward(y, dout) -> np.ndarray:
    """Return dout * (1 - y^2) given tanh's output y."""
    return (dout * (1 - y * y)).astype(np.float32)


def clip_backward(x, dout, lo=None, hi=None) -> np.ndarray:
    """Return dout where lo <= x <= hi (bounds included, as PyTorch's clamp), else 0."""
    keep = np.ones(x.shape, bool)
    if lo is not None:
        keep &= x >= lo
    if hi is not None:
        keep &= x <= hi
    return np.where(keep, dout, 0).astype(np.float32)


def global_avg_pool_backward(dout, hw) -> np.ndarray:
    """Return dx (N, H, W, C): each channel's dout (N, 1, 1, C) spread evenly over H x W."""
    h, w = hw
    share = (dout / np.float32(h * w)).astype(np.float32)
    return np.ascontiguousarray(np.broadcast_to(share, (dout.shape[0], h, w, dout.shape[3])))


def global_max_pool_backward(x, dout) -> np.ndarray:
    """Return dx: each channel's dout to its first maximum in row-major order (as max_pool2d)."""
    n, h, w, c = x.shape
    flat = x.reshape(n, h * w, c)
    at = np.argmax(flat, axis=1)  # first maximum; a NaN counts as the maximum, like the forward
    nan = np.isnan(flat)
    if nan.any():
        last_nan = h * w - 1 - np.argmax(nan[:, ::-1], axis=1)
        at = np.where(nan.any(axis=1), last_nan, at)
    dx = np.zeros((n, h * w, c), np.float32)
    dx[np.arange(n)[:, None], at, np.arange(c)[None, :]] = dout.reshape(n, c)
    return dx.reshape(x.shape)


def concat_backward(dout, channels: list[int]) -> list[np.ndarray]:
    """Return dout split along channels into the concatenated inputs' parts."""
    cuts = np.cumsum(channels)[:-1]
    return [np.ascontiguousarray(part) for part in np.split(dout, cuts, axis=-1)]
