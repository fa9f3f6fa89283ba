"""Plain-loop layers written straight from the definition; what every fast path is tested against.

x is (N, H, W, C) float32 NHWC. Each output position is
V[n, y, x, k] = sum(X[n, window(y, x), :] * W_k) + b_k, accumulated in float64.
Output sizes floor like PyTorch; a model's `fit` check happens before any layer runs.
"""

from __future__ import annotations

import numpy as np

from .geometry import Window


def _padded(x: np.ndarray, win: Window, value: float) -> np.ndarray:
    return np.pad(
        x.astype(np.float64),
        ((0, 0), (win.top, win.bottom), (win.left, win.right), (0, 0)),
        constant_values=value,
    )


def _window(xp: np.ndarray, n: int, y: int, x: int, win: Window) -> np.ndarray:
    y0, x0 = y * win.sh, x * win.sw
    return xp[
        n,
        y0 : y0 + win.dh * (win.fh - 1) + 1 : win.dh,
        x0 : x0 + win.dw * (win.fw - 1) + 1 : win.dw,
        :,
    ]


def conv2d_reference(x, w, b=None, stride=1, pad=0, dilation=1, relu=False, groups=1) -> np.ndarray:
    """Convolve x (N, H, W, C) with w (K, FH, FW, C/groups) and bias b (K,); return (N, Hout,
    Wout, K). Filter k sees channels [g*C/groups, (g+1)*C/groups) of x, g = k // (K/groups)."""
    n_, h, w_, _ = x.shape
    k, cg = w.shape[0], w.shape[3]
    kg = k // groups
    win = Window.make([w.shape[1], w.shape[2]], stride, pad, dilation)
    hout, wout = win.out_hw(h, w_)
    xp = _padded(x, win, 0.0)
    wd = w.astype(np.float64)
    bias = np.zeros(k) if b is None else b.astype(np.float64)
    out = np.empty((n_, hout, wout, k), np.float64)
    for n in range(n_):
        for y in range(hout):
            for xo in range(wout):
                patch = _window(xp, n, y, xo, win)
                for kk in range(k):
                    c0 = kk // kg * cg
                    out[n, y, xo, kk] = np.sum(patch[..., c0 : c0 + cg] * wd[kk]) + bias[kk]
    if relu:
        out = np.maximum(out, 0.0)
    return out.astype(np.float32)


def local2d_reference(x, w, b=None, stride=1, pad=0, dilation=1, relu=False) -> np.ndarray:
    """Locally-connected layer: w (Hout, Wout, K, FH, FW, C) unshared, b (Hout, Wout, K)."""
    n_, h, w_, _ = x.shape
    hout, wout, k = w.shape[:3]
    win = Window.make([w.shape[3], w.shape[4]], stride, pad, dilation)
    if win.out_hw(h, w_) != (hout, wout):
        raise ValueError(
            f"local weights are for a {hout}x{wout} output, input gives {win.out_hw(h, w_)}"
        )
    xp = _padded(x, win, 0.0)
    wd = w.astype(np.float64)
    bias = np.zeros((hout, wout, k)) if b is None else b.astype(np.float64)
    out = np.empty((n_, hout, wout, k), np.float64)
    for n in range(n_):
        for y in range(hout):
            for xo in range(wout):
                patch = _window(xp, n, y, xo, win)
                for kk in range(k):
                    out[n, y, xo, kk] = np.sum(patch * wd[y, xo, kk]) + bias[y, xo, kk]
    if relu:
        out = np.maximum(out, 0.0)
    return out.astype(np.float32)


def max_pool2d_reference(x, size, stride=None, pad=0, dilation=1) -> np.ndarray:
    """Max over each window; pads count as -inf so they never win."""
    win = Window.make(size, size if stride is None else stride, pad, dilation)
    n_, h, w_, c = x.shape
    hout, wout = win.out_hw(h, w_)
    xp = _padded(x, win, -np.inf)
    out = np.empty((n_, hout, wout, c), np.float64)
    for n in range(n_):
        for y in range(hout):
            for xo in range(wout):
                out[n, y, xo] = _window(xp, n, y, xo, win).max(axis=(0, 1))
    return out.astype(np.float32)


def avg_pool2d_reference(x, size, stride=None, pad=0, count_pad=False) -> np.ndarray:
    """Mean over each window; with count_pad=False pads are left out of the divisor."""
    win = Window.make(size, size if stride is None else stride, pad)
    n_, h, w_, c = x.shape
    hout, wout = win.out_hw(h, w_)
    xp = _padded(x, win, 0.0)
    inside = _padded(np.ones((1, h, w_, 1), np.float32), win, 0.0)
    out = np.empty((n_, hout, wout, c), np.float64)
    for n in range(n_):
        for y in range(hout):
            for xo in range(wout):
                total = _window(xp, n, y, xo, win).sum(axis=(0, 1))
                count = win.fh * win.fw if count_pad else _window(inside, 0, y, xo, win).sum()
                out[n, y, xo] = total / count
    return out.astype(np.float32)


def relu_reference(x) -> np.ndarray:
    """max(x, 0) elementwise."""
    return np.where(x > 0, x, 0).astype(np.float32)
