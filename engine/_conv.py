"""Numba kernels for conv: tiled im2col + per-tile GEMM, bias and ReLU in the tile's epilogue.

Shapes (NHWC, float32): x (N, H, W, C); wmat (FH*FW*C, K), the OHWI weights flattened and
transposed once; bias (K,); out2d (N*Hout*Wout, K), the output viewed as one row per position.
Row r of the virtual im2col matrix is position (n, y, x) = divmod chain of r, its columns ordered
(fy, fx, c) like the weights. Each image's Hout*Wout rows are split the same way into tiles of
at most `tile` rows, never across images, so an image's result does not depend on the batch it
came in (BLAS sums a row in an order that depends on where the row sits in its GEMM). Thread t
packs each tile it takes into its own slot cols[t] (T, tile, FH*FW*C) of a workspace the caller
owns and reuses, so the column buffer is T*tile*Kc floats whatever N is. The BLAS kernels give
thread t tiles t, t+T, ...; the micro-kernel ones hand tiles out from an atomic counter (a
one-element int64 array, zero on entry), so a descheduled thread's share goes to the others.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._gemm import MR, claim, row_gemm, tile_gemm


@njit(cache=True, inline="always")
def _epilogue(o, bias, relu):
    """Add bias to every row of an (m, K) tile and, when asked, clamp it at 0 (NaN stays NaN)."""
    m, k = o.shape
    for r in range(m):
        for j in range(k):
            v = o[r, j] + bias[j]
            if relu and v < 0.0:
                v = 0.0
            o[r, j] = v


@njit(cache=True, inline="always")
def _tile_rows(i, per_image, tile, tiles_per_image):
    """Return rows [r0, r1) of tile i: tile i % tiles_per_image of image i // tiles_per_image."""
    n = i // tiles_per_image
    r0 = n * per_image + (i - n * tiles_per_image) * tile
    return r0, min(n * per_image + per_image, r0 + tile)


@njit(cache=True, inline="always")
def _copy(dst, d0, src, s0, count):
    """dst[d0:d0+count] = src[s0:s0+count] on flat arrays, indices unsigned so LLVM vectorises."""
    for j in range(count):
        dst[np.uintp(d0 + j)] = src[np.uintp(s0 + j)]


@njit(cache=True, inline="always")
def _zero(dst, d0, count):
    for j in range(count):
        dst[np.uintp(d0 + j)] = 0.0


@njit(cache=True, inline="always")
def _pack(x, buf, r0, r1, hout, wout, fh, fw, sh, sw, dh, dw, top, left):
    """Write im2col rows r0..r1 into buf (r1-r0, FH*FW*C), zeros where the window is padding."""
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    xf = x.reshape(x.size)
    per_image = hout * wout
    width = buf.shape[1]
    flat = buf.reshape(buf.size)
    run = fw * c  # one window row: contiguous in x when dilation is 1 and it is inside the image
    for r in range(r0, r1):
        n = r // per_image
        rem = r - n * per_image
        y = rem // wout
        xo = rem - y * wout
        row0 = (r - r0) * width
        iy0 = y * sh - top
        ix0 = xo * sw - left
        inside_x = dw == 1 and ix0 >= 0 and ix0 + fw <= w
        for fy in range(fh):
            iy = iy0 + fy * dh
            j0 = row0 + fy * run
            if iy < 0 or iy >= h:
                _zero(flat, j0, run)
            elif inside_x:
                _copy(flat, j0, xf, ((n * h + iy) * w + ix0) * c, run)
            else:
                for fx in range(fw):
                    ix = ix0 + fx * dw
                    if ix < 0 or ix >= w:
                        _zero(flat, j0 + fx * c, c)
                    else:
                        _copy(flat, j0 + fx * c, xf, ((n * h + iy) * w + ix) * c, c)


@njit(parallel=True, cache=True)
def conv_im2col(
    x, wmat, bias, out2d, cols, tile, hout, wout, fh, fw, sh, sw, dh, dw, top, left, relu
):
    """Fill out2d (N*Hout*Wout, K) with conv(x) + bias, packing one tile of im2col at a time."""
    per_image = hout * wout
    tiles_per_image = (per_image + tile - 1) // tile
    ntiles = x.shape[0] * tiles_per_image
    nthreads = cols.shape[0]
    for t in prange(nthreads):
        slot = cols[t]
        for i in range(t, ntiles, nthreads):
            r0, r1 = _tile_rows(i, per_image, tile, tiles_per_image)
            buf = slot[: r1 - r0]
            _pack(x, buf, r0, r1, hout, wout, fh, fw, sh, sw, dh, dw, top, left)
            o = out2d[r0:r1]
            np.dot(buf, wmat, o)
            _epilogue(o, bias, relu)


@njit(parallel=True, cache=True)
def conv_pointwise(x2d, wmat, bias, out2d, per_image, nthreads, tile, relu):
    """1x1, stride 1, no pad: out2d (M, K) = x2d (M, C) @ wmat (C, K) + bias, no im2col at all."""
    tiles_per_image = (per_image + tile - 1) // tile
    ntiles = (out2d.shape[0] // per_image) * tiles_per_image
    for t in prange(nthreads):
        for i in range(t, ntiles, nthreads):
            r0, r1 = _tile_rows(i, per_image, tile, tiles_per_image)
            o = out2d[r0:r1]
            np.dot(x2d[r0:r1], wmat, o)
            _epilogue(o, bias, relu)


@njit(parallel=True, cache=True)
def conv_im2col_mk(
    x,
    blocks,
    table,
    bias,
    out2d,
    cols,
    tile,
    hout,
    wout,
    fh,
    fw,
    sh,
    sw,
    dh,
    dw,
    top,
    left,
    relu,
    counter,
    acc,
    splits,
):
    """conv_im2col with the micro-kernel: weights packed by _gemm.pack_weights, slots of cols
    rounded up to a multiple of MR rows (rows past the tile are read, never stored). out2d's
    rows may be a channel slice of a wider buffer; with acc the conv is added to out2d.

    Work is handed out as (row tile, column part) pairs, the parts being the weight blocks
    splits[j] <= b < splits[j + 1]: with few row tiles (one small image) the threads share a
    tile's columns instead of waiting on one another's rows, each packing the tile once."""
    per_image = hout * wout
    tiles_per_image = (per_image + tile - 1) // tile
    ntiles = x.shape[0] * tiles_per_image
    parts = splits.shape[0] - 1
    for t in prange(cols.shape[0]):
        slot = cols[t]
        packed = -1
        q = claim(counter)
        while q < ntiles * parts:
            i, j = q // parts, q % parts
            r0, r1 = _tile_rows(i, per_image, tile, tiles_per_image)
            if i != packed:
                _pack(x, slot, r0, r1, hout, wout, fh, fw, sh, sw, dh, dw, top, left)
                packed = i
            tile_gemm(
                slot, 0, r1 - r0, blocks, table, bias, out2d, r0, relu, acc,
                splits[j], splits[j + 1],
            )  # fmt: skip
            q = claim(counter)


@njit(parallel=True, cache=True)
def conv_pointwise_mk(
    x2d, blocks, table, bias, out2d, cols, per_image, tile, relu, counter, acc, splits
):
    """conv_pointwise with the micro-kernel, reading x2d in place; only a tile whose last
    MR-row block would run past the end of x2d is first copied into its thread's slot.
    out2d, acc and splits (column parts) as for conv_im2col_mk."""
    m_all = x2d.shape[0]
    tiles_per_image = (per_image + tile - 1) // tile
    ntiles = (m_all // per_image) * tiles_per_image
    parts = splits.shape[0] - 1
    for t in prange(cols.shape[0]):
        slot = cols[t]
        q = claim(counter)
        while q < ntiles * parts:
            i, j = q // parts, q % parts
            b0, b1 = splits[j], splits[j + 1]
            r0, r1 = _tile_rows(i, per_image, tile, tiles_per_image)
            m = r1 - r0
            if r0 + (m + MR - 1) // MR * MR <= m_all:
                tile_gemm(x2d, r0, m, blocks, table, bias, out2d, r0, relu, acc, b0, b1)
            else:
                slot[:m] = x2d[r0:r1]
                tile_gemm(slot, 0, m, blocks, table, bias, out2d, r0, relu, acc, b0, b1)
            q = claim(counter)


@njit(parallel=True, cache=True)
def conv_implicit_mk(
    xp, offs, blocks, table, bias, out2d, nthreads, hout, wout, sh, sw, relu, counter
):
    """Implicit GEMM: no column buffer, the micro-kernel reads windows straight from xp.

    xp (N, Hp, Wp, C) is x with its pads already in place; offs (FH*FW*C,) holds each window
    element's offset (fy*DH*Wp + fx*DW)*C + c from the window's corner. One output row (n, y)
    is one tile; Wout >= 8.
    """
    n_img, hp, wp, c = xp.shape
    xf = xp.reshape(xp.size)
    ntiles = n_img * hout
    for _ in prange(nthreads):
        i = claim(counter)
        while i < ntiles:
            n = i // hout
            y = i - n * hout
            base = (n * hp + y * sh) * wp * c
            row_gemm(xf, base, sw * c, offs, wout, blocks, table, bias, out2d, i * wout, relu)
            i = claim(counter)


@njit(parallel=True, cache=True)
def local_gemm(x, w2d, bias, out, cols, fh, fw, sh, sw, dh, dw, top, left, relu):
    """Locally-connected: out (N, Hout, Wout, K) from w2d (Hout, Wout, K, Kc), bias (Hout, Wout, K).

    Each output position has its own (K, Kc) weights, so the product is per position: each
    image's patch (packed into cols[t], one row) times that position's weights, one image per
    product. A product of a block of images would sum each row in an order that depends on the
    block's size (BLAS), so an image's result would depend on its batch; one image at a time
    it does not, and it ran as fast (AMD EPYC Zen 1, 2 threads, blocks of 64 -> one image:
    N=32 14x14x64 K=64 3x3 16.1 -> 13.3 ms, N=8 7x7x256 K=256 24.6 -> 14.9 ms, N=32 25x25x16
    K=16 9x9 10.8 -> 11.9 ms).
    """
    n_img, hout, wout, k = out.shape
    nthreads = cols.shape[0]
    positions = hout * wout
    for t in prange(nthreads):
        row = cols[t, :1]
        res = np.empty((1, k), np.float32)
        for p in range(t, positions, nthreads):
            y = p // wout
            xo = p - y * wout
            wt = w2d[y, xo].T  # (Kc, K), F-contiguous: np.dot reads it as a transposed GEMM
            for n in range(n_img):
                r = (n * hout + y) * wout + xo
                _pack(x, row, r, r + 1, hout, wout, fh, fw, sh, sw, dh, dw, top, left)
                np.dot(row, wt, res)
                for j in range(k):
                    v = res[0, j] + bias[y, xo, j]
                    if relu and v < 0.0:
                        v = 0.0
                    out[n, y, xo, j] = v


@njit(parallel=True, cache=True)
def conv_depthwise(x, wd, bias, out, sh, sw, dh, dw, top, left, relu):
    """Depthwise conv, direct: out (N, Hout, Wout, K) from x (N, H, W, C), wd (FH, FW, m, C).

    K = C*m; output channel ci*m + q reads input channel ci only, with weight wd[fy, fx, q, ci]
    (filters regrouped multiplier-major, so each tap is m contiguous runs of C multiply-adds
    over x's pixel; with m > 1 the sums are kept (m, C) and stored transposed once per pixel).
    Each output is FH*FW multiply-adds: im2col would copy FH*FW values to multiply each by one
    weight. Each output row (n, y) is one task; each pixel's sums start at the bias, take every
    tap whose input pixel is inside the image (pads contribute nothing), then the ReLU. Pixel by
    pixel, not tap by tap over the whole row: the running sums stay in L1 (N=32 56x56x128:
    33 vs 43 ms, 2 threads).
    """
    n_img, h, w, c = x.shape
    hout, wout, k = out.shape[1], out.shape[2], out.shape[3]
    fh, fw, m = wd.shape[0], wd.shape[1], wd.shape[2]
    for task in prange(n_img * hout):
        n = task // hout
        y = task - n * hout
        o = out[n, y]
        acc = np.empty((m, c), np.float32)
        for xo in range(wout):
            oo = o[xo]
            if m == 1:
                for j in range(k):
                    oo[j] = bias[j]
            else:
                for q in range(m):
                    for ci in range(c):
                        acc[q, ci] = bias[ci * m + q]
            for fy in range(fh):
                iy = y * sh - top + fy * dh
                if iy < 0 or iy >= h:
                    continue
                xr = x[n, iy]
                for fx in range(fw):
                    ix = xo * sw - left + fx * dw
                    if ix < 0 or ix >= w:
                        continue
                    xi = xr[ix]
                    wk = wd[fy, fx]
                    if m == 1:
                        w0 = wk[0]
                        for j in range(k):
                            oo[j] += xi[j] * w0[j]
                    else:
                        for q in range(m):
                            aq = acc[q]
                            wq = wk[q]
                            for ci in range(c):
                                aq[ci] += xi[ci] * wq[ci]
            if m > 1:
                for ci in range(c):
                    for q in range(m):
                        oo[ci * m + q] = acc[q, ci]
            if relu:
                for j in range(k):
                    if oo[j] < 0.0:
                        oo[j] = 0.0
