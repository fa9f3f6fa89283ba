"""Numba kernels of the backward passes: im2col / col2im, pooling, ReLU and local scatters.

x and dx are (N, H, W, C) float32, dout is (N, Hout, Wout, K); window geometry as in
engine.geometry (fh, fw, sh, sw, dh, dw, top, left). Scatters that windows may overlap in run
one image per thread, so no two threads add into the same cell.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True)
def _im2col(xn, cols, hout, wout, fh, fw, sh, sw, dh, dw, top, left):
    """Fill cols (Hout*Wout, FH*FW*C) with the windows of one image xn (H, W, C); pads are 0."""
    h, w, c = xn.shape
    for y in range(hout):
        for xo in range(wout):
            r = y * wout + xo
            col = 0
            for fy in range(fh):
                iy = y * sh - top + fy * dh
                for fx in range(fw):
                    ix = xo * sw - left + fx * dw
                    if 0 <= iy < h and 0 <= ix < w:
                        for ch in range(c):
                            cols[r, col + ch] = xn[iy, ix, ch]
                    else:
                        for ch in range(c):
                            cols[r, col + ch] = 0.0
                    col += c


@njit(cache=True)
def _col2im(cols, dxn, hout, wout, fh, fw, sh, sw, dh, dw, top, left):
    """Add each row of cols (Hout*Wout, FH*FW*C) back into its window of one image dxn."""
    h, w, c = dxn.shape
    for y in range(hout):
        for xo in range(wout):
            r = y * wout + xo
            col = 0
            for fy in range(fh):
                iy = y * sh - top + fy * dh
                for fx in range(fw):
                    ix = xo * sw - left + fx * dw
                    if 0 <= iy < h and 0 <= ix < w:
                        for ch in range(c):
                            dxn[iy, ix, ch] += cols[r, col + ch]
                    col += c


@njit(parallel=True, cache=True)
def conv_dx(dout, w2d, dx, nthreads, fh, fw, sh, sw, dh, dw, top, left):
    """dx (zeroed) += col2im(dout_n (P, K) @ w2d (K, FH*FW*C)) per image, images over threads."""
    n_img, hout, wout, k = dout.shape
    p = hout * wout
    for t in prange(nthreads):
        for n in range(t, n_img, nthreads):
            cols = np.dot(dout[n].reshape(p, k), w2d)
            _col2im(cols, dx[n], hout, wout, fh, fw, sh, sw, dh, dw, top, left)


@njit(parallel=True, cache=True)
def conv_dw(x, dout, partial, cols, fh, fw, sh, sw, dh, dw, top, left):
    """partial[t] (K, FH*FW*C) = sum over thread t's images of dout_n.T @ im2col(x_n).

    cols is (threads, Hout*Wout, FH*FW*C) workspace; the caller sums partial over threads.
    """
    n_img, hout, wout, k = dout.shape
    nthreads = partial.shape[0]
    p = hout * wout
    for t in prange(nthreads):
        for n in range(t, n_img, nthreads):
            _im2col(x[n], cols[t], hout, wout, fh, fw, sh, sw, dh, dw, top, left)
            partial[t] += np.dot(dout[n].reshape(p, k).T, cols[t])


@njit(parallel=True, cache=True)
def dilate(dout, big, sh, sw, top, left):
    """Place dout (N, Hout, Wout, K) into zeroed big at rows top + y*sh, columns left + x*sw."""
    n_img, hout, wout, k = dout.shape
    for r in prange(n_img * hout):
        n = r // hout
        y = r - n * hout
        by = top + y * sh
        if by < 0 or by >= big.shape[1]:
            continue
        for xo in range(wout):
            bx = left + xo * sw
            if 0 <= bx < big.shape[2]:
                for ch in range(k):
                    big[n, by, bx, ch] = dout[n, y, xo, ch]


@njit(parallel=True, cache=True)
def max_pool_argmax(x, out, idx, fh, fw, sh, sw, dh, dw, top, left):
    """Fill out with each window's max and idx with its first maximum's iy*W + ix (as PyTorch).

    A NaN wins (the last NaN of a window); a window of only -inf keeps its first in-image cell;
    an all-padding window gives -inf and idx -1.
    """
    n_img, h, w, c = x.shape
    hout, wout = out.shape[1], out.shape[2]
    for row in prange(n_img * hout):
        n = row // hout
        y = row - n * hout
        for xo in range(wout):
            for ch in range(c):
                out[n, y, xo, ch] = -np.inf
                idx[n, y, xo, ch] = -1
            for fy in range(fh):
                iy = y * sh - top + fy * dh
                if iy < 0 or iy >= h:
                    continue
                for fx in range(fw):
                    ix = xo * sw - left + fx * dw
                    if ix < 0 or ix >= w:
                        continue
                    for ch in range(c):
                        v, a = x[n, iy, ix, ch], out[n, y, xo, ch]
                        if v > a or v != v or idx[n, y, xo, ch] < 0:
                            out[n, y, xo, ch] = v
                            idx[n, y, xo, ch] = iy * w + ix


@njit(parallel=True, cache=True)
def max_pool_backward(dout, idx, dx):
    """Add dout to dx at each window's argmax idx (flat iy*W + ix); dx zeroed by the caller."""
    n_img, hout, wout, c = dout.shape
    w = dx.shape[2]
    for n in prange(n_img):
        for y in range(hout):
            for xo in range(wout):
                for ch in range(c):
                    i = idx[n, y, xo, ch]
                    if i >= 0:
                        iy = i // w
                        dx[n, iy, i - iy * w, ch] += dout[n, y, xo, ch]


@njit(parallel=True, cache=True)
def avg_pool_backward(dout, dx, fh, fw, sh, sw, top, left, count_pad):
    """Spread each window's dout / count over its in-image cells of dx (zeroed by the caller)."""
    n_img, h, w, c = dx.shape
    hout, wout = dout.shape[1], dout.shape[2]
    for n in prange(n_img):
        for y in range(hout):
            iy0 = y * sh - top
            y_lo, y_hi = max(iy0, 0), min(iy0 + fh, h)
            for xo in range(wout):
                ix0 = xo * sw - left
                x_lo, x_hi = max(ix0, 0), min(ix0 + fw, w)
                count = fh * fw if count_pad else max(1, (y_hi - y_lo) * (x_hi - x_lo))
                scale = np.float32(1.0 / count)
                for iy in range(y_lo, y_hi):
                    for ix in range(x_lo, x_hi):
                        for ch in range(c):
                            dx[n, iy, ix, ch] += dout[n, y, xo, ch] * scale


@njit(parallel=True, cache=True)
def relu_backward(y, dout, out):
    """out = dout where y > 0 else 0, over flat arrays."""
    for i in prange(y.size):
        out[i] = dout[i] if y[i] > 0.0 else np.float32(0.0)


@njit(parallel=True, cache=True)
def local_backward_dx(dout, w, dx, fh, fw, sh, sw, dh, dw, top, left):
    """dx[window(y, x)] += sum_k dout[y, x, k] * w[y, x, k]; w (Hout, Wout, K, FH, FW, C)."""
    n_img, h, wi, c = dx.shape
    hout, wout, k = dout.shape[1], dout.shape[2], dout.shape[3]
    for n in prange(n_img):
        for y in range(hout):
            for xo in range(wout):
                for fy in range(fh):
                    iy = y * sh - top + fy * dh
                    if iy < 0 or iy >= h:
                        continue
                    for fx in range(fw):
                        ix = xo * sw - left + fx * dw
                        if ix < 0 or ix >= wi:
                            continue
                        for kk in range(k):
                            g = dout[n, y, xo, kk]
                            for ch in range(c):
                                dx[n, iy, ix, ch] += g * w[y, xo, kk, fy, fx, ch]


@njit(parallel=True, cache=True)
def local_backward_dw(x, dout, dwt, fh, fw, sh, sw, dh, dw, top, left):
    """dwt[y, x, k] = sum_n dout[n, y, x, k] * window(y, x) of x[n]; one position per thread."""
    n_img, h, wi, c = x.shape
    hout, wout, k = dout.shape[1], dout.shape[2], dout.shape[3]
    for p in prange(hout * wout):
        y = p // wout
        xo = p - y * wout
        for n in range(n_img):
            for fy in range(fh):
                iy = y * sh - top + fy * dh
                if iy < 0 or iy >= h:
                    continue
                for fx in range(fw):
                    ix = xo * sw - left + fx * dw
                    if ix < 0 or ix >= wi:
                        continue
                    for kk in range(k):
                        g = dout[n, y, xo, kk]
                        for ch in range(c):
                            dwt[y, xo, kk, fy, fx, ch] += g * x[n, iy, ix, ch]
