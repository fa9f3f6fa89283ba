"""Plain-loop backward passes written straight from the forward definitions (engine.reference).

Each takes the forward's arguments plus dout, the gradient of a scalar objective with respect to
the forward's output, and returns the gradient with respect to its inputs, accumulated in
float64. x is (N, H, W, C); dout is (N, Hout, Wout, K). Every loop scatters dout back through the
window it came from: for a conv, dX[window(y, x)] += dout[y, x, k] * W_k.
"""

from __future__ import annotations

import numpy as np

from .geometry import Window


def _padded_zeros(x: np.ndarray, win: Window) -> np.ndarray:
    n, h, w, c = x.shape
    return np.zeros((n, h + win.top + win.bottom, w + win.left + win.right, c), np.float64)


def _crop(xp: np.ndarray, x: np.ndarray, win: Window) -> np.ndarray:
    h, w = x.shape[1], x.shape[2]
    return xp[:, win.top : win.top + h, win.left : win.left + w]


def _rows(y: int, win: Window) -> slice:
    return slice(y * win.sh, y * win.sh + win.dh * (win.fh - 1) + 1, win.dh)


def _cols(x: int, win: Window) -> slice:
    return slice(x * win.sw, x * win.sw + win.dw * (win.fw - 1) + 1, win.dw)


def conv2d_backward_reference(x, w, dout, stride=1, pad=0, dilation=1, groups=1):
    """Return (dx (N, H, W, C), dw (K, FH, FW, C/groups), db (K,)) of conv2d, float32.

    With groups, each group's filters see only their slice of channels: one ungrouped backward
    per group, the slices put back side by side.
    """
    if groups > 1:
        cg, kg = x.shape[3] // groups, w.shape[0] // groups
        parts = [
            conv2d_backward_reference(
                x[..., i * cg : (i + 1) * cg],
                w[i * kg : (i + 1) * kg],
                dout[..., i * kg : (i + 1) * kg],
                stride,
                pad,
                dilation,
            )
            for i in range(groups)
        ]
        return tuple(
            np.concatenate(p, axis=a)
            for p, a in zip(zip(*parts, strict=True), (-1, 0, 0), strict=True)
        )
    win = Window.make([w.shape[1], w.shape[2]], stride, pad, dilation)
    xd = np.pad(
        x.astype(np.float64), ((0, 0), (win.top, win.bottom), (win.left, win.right), (0, 0))
    )
    wd, gd = w.astype(np.float64), dout.astype(np.float64)
    dxp, dw = _padded_zeros(x, win), np.zeros(w.shape, np.float64)
    n_, hout, wout, k_ = dout.shape
    for n in range(n_):
        for y in range(hout):
            for xo in range(wout):
                rows, cols = _rows(y, win), _cols(xo, win)
                for k in range(k_):
                    g = gd[n, y, xo, k]
                    dxp[n, rows, cols] += g * wd[k]
                    dw[k] += g * xd[n, rows, cols]
    db = gd.sum(axis=(0, 1, 2))
    return (
        _crop(dxp, x, win).astype(np.float32),
        dw.astype(np.float32),
        db.astype(np.float32),
    )


def local2d_backward_reference(x, w, dout, stride=1, pad=0, dilation=1):
    """Return (dx, dw (Hout, Wout, K, FH, FW, C), db (Hout, Wout, K)) of local2d, float32."""
    win = Window.make([w.shape[3], w.shape[4]], stride, pad, dilation)
    xd = np.pad(
        x.astype(np.float64), ((0, 0), (win.top, win.bottom), (win.left, win.right), (0, 0))
    )
    wd, gd = w.astype(np.float64), dout.astype(np.float64)
    dxp, dw = _padded_zeros(x, win), np.zeros(w.shape, np.float64)
    n_, hout, wout, k_ = dout.shape
    for n in range(n_):
        for y in range(hout):
            for xo in range(wout):
                rows, cols = _rows(y, win), _cols(xo, win)
                for k in range(k_):
                    g = gd[n, y, xo, k]
                    dxp[n, rows, cols] += g * wd[y, xo, k]
                    dw[y, xo, k] += g * xd[n, rows, cols]
    db = gd.sum(axis=0)
    return (
        _crop(dxp, x, win).astype(np.float32),
        dw.astype(np.float32),
        db.astype(np.float32),
    )


def max_pool2d_backward_reference(x, dout, size, stride=None, pad=0, dilation=1):
    """Return dx: each window's dout goes to its first maximum in row-major order (as PyTorch).

    A NaN wins like in the forward pass (the last NaN of a window); a window of only -inf
    gives its gradient to its first cell inside the image.
    """
    win = Window.make(size, size if stride is None else stride, pad, dilation)
    n_, h, w_, c_ = x.shape
    dx = np.zeros(x.shape, np.float64)
    _, hout, wout, _ = dout.shape
    for n in range(n_):
        for y in range(hout):
            for xo in range(wout):
                for c in range(c_):
                    best, at = -np.inf, None
                    for fy in range(win.fh):
                        iy = y * win.sh - win.top + fy * win.dh
                        for fx in range(win.fw):
                            ix = xo * win.sw - win.left + fx * win.dw
                            if not (0 <= iy < h and 0 <= ix < w_):
                                continue
                            v = x[n, iy, ix, c]
                            if at is None or v > best or np.isnan(v):
                                best, at = v, (iy, ix)
                    if at is not None:
                        dx[n, at[0], at[1], c] += dout[n, y, xo, c]
    return dx.astype(np.float32)


def avg_pool2d_backward_reference(x, dout, size, stride=None, pad=0, count_pad=False):
    """Return dx: each window's dout / count spread over its cells inside the image."""
    win = Window.make(size, size if stride is None else stride, pad)
    n_, h, w_, _ = x.shape
    dxp = _padded_zeros(x, win)
    inside = np.zeros((h + win.top + win.bottom, w_ + win.left + win.right))
    inside[win.top : win.top + h, win.left : win.left + w_] = 1.0
    _, hout, wout, _ = dout.shape
    for n in range(n_):
        for y in range(hout):
            for xo in range(wout):
                rows, cols = _rows(y, win), _cols(xo, win)
                count = win.fh * win.fw if count_pad else inside[rows, cols].sum()
                dxp[n, rows, cols] += dout[n, y, xo].astype(np.float64) / max(count, 1.0)
    return _crop(dxp, x, win).astype(np.float32)


def relu_backward_reference(y, dout):
    """Return dout where the ReLU's output y (or input) is > 0, else 0 (PyTorch's choice at 0)."""
    return np.where(y > 0, dout, 0).astype(np.float32)
