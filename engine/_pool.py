"""Numba kernels for pooling, ReLU and input preprocessing, parallel over rows, vectorised.

x is (N, H, W, C) float32, out is (N, Hout, Wout, C); window geometry as in engine.geometry.
Windows are clipped to the image instead of padding it: a max over the clipped window equals a
max with -inf pads, and an average divides by the clipped count (or FH*FW with count_pad).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def max_pool(x, out, fh, fw, sh, sw, dh, dw, top, left):
    """Fill out with the max of each window; an all-padding window gives -inf.

    Per output row: the max over the window's input rows first (whole W*C rows), then over
    each output pixel's columns of that. np.maximum, not a compare-and-select loop: Numba
    vectorises it (about 5x faster, measured) and it keeps NaN winning like PyTorch and the
    reference.
    """
    n_img, h, w, c = x.shape
    hout, wout = out.shape[1], out.shape[2]
    for row in prange(n_img * hout):
        n = row // hout
        y = row - n * hout
        iy0 = y * sh - top
        rows = np.full(w * c, -np.inf, np.float32)
        for fy in range(fh):
            iy = iy0 + fy * dh
            if 0 <= iy < h:
                np.maximum(rows, x[n, iy].reshape(w * c), rows)
        o = out[n, y]
        o[:] = -np.inf
        for xo in range(wout):
            ix0 = xo * sw - left
            for fx in range(fw):
                ix = ix0 + fx * dw
                if 0 <= ix < w:
                    np.maximum(o[xo], rows[ix * c : (ix + 1) * c], o[xo])


@njit(parallel=True, cache=True)
def avg_pool(x, out, fh, fw, sh, sw, top, left, count_pad):
    """Fill out with the mean of each window, over FH*FW (count_pad) or the in-image cells."""
    n_img, h, w, c = x.shape
    hout, wout = out.shape[1], out.shape[2]
    for row in prange(n_img * hout):
        n = row // hout
        y = row - n * hout
        iy0 = y * sh - top
        y_lo, y_hi = max(iy0, 0), min(iy0 + fh, h)
        for xo in range(wout):
            ix0 = xo * sw - left
            x_lo, x_hi = max(ix0, 0), min(ix0 + fw, w)
            acc = out[n, y, xo]
            acc[:] = 0.0
            for iy in range(y_lo, y_hi):
                for ix in range(x_lo, x_hi):
                    src = x[n, iy, ix]
                    for ch in range(c):
                        acc[ch] += src[ch]
            count = fh * fw if count_pad else max(1, (y_hi - y_lo) * (x_hi - x_lo))
            scale = np.float32(1.0 / count)
            for ch in range(c):
                acc[ch] *= scale


@njit(parallel=True, cache=True)
def relu_flat(x, out):
    """out = x where x > 0 else 0 over flat arrays (NaN -> 0, like the reference)."""
    for i in prange(x.size):
        v = x[i]
        out[i] = v if v > 0.0 else np.float32(0.0)


@njit(parallel=True, cache=True)
def preprocess(images, scale, mean_row, std_row, out):
    """out = (float32(images) * scale - mean) / std in one pass; images (N, H, W*C) uint8.

    mean_row and std_row (W*C,) float32 repeat the per-channel values along a row, so the inner
    loop has no channel index to wrap and vectorises. Each step rounds to float32 in the order
    NumPy's astype, *=, -=, /= would (no fastmath: no fused multiply-subtract, no reciprocal).
    """
    n_img, h, row = images.shape
    for r in prange(n_img * h):
        n = r // h
        y = r - n * h
        for j in range(row):
            v = np.float32(images[n, y, j]) * scale
            out[n, y, j] = (v - mean_row[j]) / std_row[j]
