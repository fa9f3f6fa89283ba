"""Winograd F(2x2, 3x3) for 3x3 stride-1 convs (any dilation, any pads) on the micro-kernel.

Each tile of 2x2 outputs (rows y0, y0+D; columns x0, x0+D) reads a 4x4 input patch
d[i, j] = x[n, y0 - top + D*i, x0 - left + D*j, :] and needs 16 products instead of 36:
    V = B^T d B,   U = G g G^T,   M[xi] = V[xi] @ U[xi] (over channels),   Y = A^T M A.
Per group of T tiles the 16 products are 16 GEMMs (T, C) @ (C, K) on engine._gemm's kernel:
2.25x fewer multiply-adds than im2col + GEMM, plus transforms that are adds along NHWC's
contiguous channel axis. The transforms add rounding (a few float32 ulps times the sums of
|values|), within the tolerances the tests hold every path to.

Tiles follow the dilation: along an axis, outputs y and y+D share a tile, so positions are
grouped by phase (y mod D) and paired within a phase; an odd one out makes a tile with one
valid output.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._gemm import _data, claim, plan_blocks, tile_gemm

# F(2, 3): G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]] maps a 3-tap filter to
# 4 points, B^T a 4-point input patch to 4, A^T 4 products to 2 outputs (written out below).
TILES = 48  # most tiles per GEMM group: a multiple of the micro-kernel's MR rows


def group_size(tiles: int, nthreads: int) -> int:
    """Return tiles per group (<= TILES) giving every thread about as many tiles (results do
    not depend on it: each tile's row of the GEMMs is computed on its own)."""
    rounds = -(-tiles // (nthreads * TILES))
    return min(TILES, -(-tiles // (nthreads * rounds)))


# Floats added to each of the 16 planes of a buffer so planes are not a multiple of 4 KiB apart:
# 16 streams at such a stride share one L1 set and evict each other (measured 10x slower).
SKEW = 16


def tile_origins(out: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Return each tile's first output position and its count of valid outputs (1 or 2)."""
    starts, counts = [], []
    for phase in range(min(d, out)):
        positions = list(range(phase, out, d))
        for i in range(0, len(positions), 2):
            starts.append(positions[i])
            counts.append(2 if i + 1 < len(positions) else 1)
    return np.array(starts, np.int64), np.array(counts, np.int64)


def pack_filters(w: np.ndarray, family: str = "avx512") -> tuple[np.ndarray, np.ndarray]:
    """Return U = G g G^T for w (K, 3, 3, C) as 16 packed weight sets (16, ...) and their table.

    Set xi = 4*i + j is U[i, j] as a (C, K) matrix in engine._gemm's block layout of a family.
    """
    k, _, _, c = w.shape
    widths = plan_blocks(k, family)
    table = np.empty((len(widths), 3), np.int64)
    offset = j0 = 0
    for b, nr in enumerate(widths):
        table[b] = offset, nr, j0
        offset, j0 = offset + c * nr, j0 + nr
    blocks = np.zeros((16, offset + SKEW), np.float32)
    taps = np.empty((9, c * k + SKEW), np.float32)
    taps[:, : c * k] = w.transpose(1, 2, 3, 0).reshape(9, c * k)
    _transform_filters(taps, c, k, blocks, table)
    return blocks, table


@njit(cache=True, inline="always")
def _filter_row(blocks, i, col, a0, a1, a2, half):
    """Write row i of U: (a0, a1, a2) times G^T = a0, (a0 + a1 + a2)/2, (a0 - a1 + a2)/2, a2."""
    blocks[np.uintp(4 * i), col] = a0
    blocks[np.uintp(4 * i + 1), col] = half * (a0 + a1 + a2)
    blocks[np.uintp(4 * i + 2), col] = half * (a0 - a1 + a2)
    blocks[np.uintp(4 * i + 3), col] = a2


@njit(cache=True)
def _transform_filters(g, c, nk, blocks, table):
    """Write G g G^T of every 3x3 filter into its place in the 16 sets; g (9, C*K + SKEW) holds
    tap (a, b) of filter (c, k) at g[3a + b, c*K + k]."""
    half = np.float32(0.5)
    # one thread: ~20 us of work for 64x64 filters, less than waking a second thread costs
    for ch in range(c):
        for b in range(table.shape[0]):
            offset, nr, j0 = table[b, 0], table[b, 1], table[b, 2]
            for k in range(j0, min(nk, j0 + nr)):
                q, col = np.uintp(ch * nk + k), np.uintp(offset + ch * nr + k - j0)
                g00, g01, g02 = g[np.uintp(0), q], g[np.uintp(1), q], g[np.uintp(2), q]
                g10, g11, g12 = g[np.uintp(3), q], g[np.uintp(4), q], g[np.uintp(5), q]
                g20, g21, g22 = g[np.uintp(6), q], g[np.uintp(7), q], g[np.uintp(8), q]
                # rows of G g: g0, (g0 + g1 + g2)/2, (g0 - g1 + g2)/2, g2
                _filter_row(blocks, 0, col, g00, g01, g02, half)
                _filter_row(
                    blocks,
                    1,
                    col,
                    half * (g00 + g10 + g20),
                    half * (g01 + g11 + g21),
                    half * (g02 + g12 + g22),
                    half,
                )
                _filter_row(
                    blocks,
                    2,
                    col,
                    half * (g00 - g10 + g20),
                    half * (g01 - g11 + g21),
                    half * (g02 - g12 + g22),
                    half,
                )
                _filter_row(blocks, 3, col, g20, g21, g22, half)


# Each transform step is a loop over the channels of flat arrays at explicit offsets, reading
# two or three rows and writing one: LLVM vectorises it (16 rows in one loop defeat its alias
# checks), and no array views are made per tile (each costs reference-count traffic).
@njit(cache=True, inline="always")
def _comb2(dst, d0, a, a0, b, b0, sign, count):
    """dst[d0:] = a[a0:] + sign * b[b0:] over count channels."""
    for q in range(count):
        dst[np.uintp(d0 + q)] = a[np.uintp(a0 + q)] + sign * b[np.uintp(b0 + q)]


@njit(cache=True, inline="always")
def _comb3(dst, d0, a, a0, b, b0, c, c0, sign, count):
    """dst[d0:] = a[a0:] + sign * (b[b0:] + c[c0:]) over count channels."""
    for q in range(count):
        both = b[np.uintp(b0 + q)] + c[np.uintp(c0 + q)]
        dst[np.uintp(d0 + q)] = a[np.uintp(a0 + q)] + sign * both


@njit(cache=True, inline="always")
def _finish(dst, d0, a, a0, b, b0, c, c0, sign, bias, bias0, relu, acc, count):
    """dst[d0:] = a + sign * (b + c) + bias[bias0:] (+ dst[d0:] if acc), then ReLU (NaN kept)."""
    for q in range(count):
        v = a[np.uintp(a0 + q)] + sign * (b[np.uintp(b0 + q)] + c[np.uintp(c0 + q)])
        v += bias[np.uintp(bias0 + q)]
        if acc:
            v += dst[np.uintp(d0 + q)]
        if relu and v < 0.0:
            v = 0.0
        dst[np.uintp(d0 + q)] = v


@njit(cache=True)
def _input_tile(xf, h, w, c, patch, tmp, v, vt0, vstride, n, y0, x0, dh, dw):
    """Gather the 4x4xC patch (zeros outside x) into patch (16*C); write V = B^T d B at v[vt0]
    with the 16 transformed rows vstride apart. All are flat data pointers: array arguments
    would cost atomic reference counting on every tile."""
    for i in range(4):
        iy = y0 + dh * i
        for j in range(4):
            ix = x0 + dw * j
            dst = (i * 4 + j) * c
            if 0 <= iy < h and 0 <= ix < w:
                src = ((n * h + iy) * w + ix) * c
                for q in range(c):
                    patch[np.uintp(dst + q)] = xf[np.uintp(src + q)]
            else:
                for q in range(c):
                    patch[np.uintp(dst + q)] = 0.0
    # B^T d: rows 0..3 = d0 - d2, d1 + d2, d2 - d1, d1 - d3 (a row is four channel rows)
    for j in range(4):
        _comb2(tmp, j * c, patch, j * c, patch, (8 + j) * c, -1.0, c)
        _comb2(tmp, (4 + j) * c, patch, (4 + j) * c, patch, (8 + j) * c, 1.0, c)
        _comb2(tmp, (8 + j) * c, patch, (8 + j) * c, patch, (4 + j) * c, -1.0, c)
        _comb2(tmp, (12 + j) * c, patch, (4 + j) * c, patch, (12 + j) * c, -1.0, c)
    # (B^T d) B: the same combination along each row
    for i in range(0, 16, 4):
        _comb2(v, vt0 + i * vstride, tmp, i * c, tmp, (i + 2) * c, -1.0, c)
        _comb2(v, vt0 + (i + 1) * vstride, tmp, (i + 1) * c, tmp, (i + 2) * c, 1.0, c)
        _comb2(v, vt0 + (i + 2) * vstride, tmp, (i + 2) * c, tmp, (i + 1) * c, -1.0, c)
        _comb2(v, vt0 + (i + 3) * vstride, tmp, (i + 1) * c, tmp, (i + 3) * c, -1.0, c)


@njit(cache=True)
def _output_tile(
    m, mt0, mstride, tmp, bias, k0, k, of, ldo, hout, wout, n, y0, x0, ny, nx, dh, dw, relu, acc
):
    """Write Y = A^T M A (+ bias, + what of holds if acc, ReLU) for the tile at m[mt0] (16 rows
    mstride apart, k channels) to the ny x nx valid outputs of of, the flat (N, Hout, Wout, ldo)
    output, as its channels k0 .. k0+k-1 (all data pointers)."""
    # A^T M: row 0 = m0 + m1 + m2, row 1 = m1 - m2 - m3 (a row is four channel rows)
    for j in range(4):
        _comb3(
            tmp,
            j * k,
            m,
            mt0 + j * mstride,
            m,
            mt0 + (4 + j) * mstride,
            m,
            mt0 + (8 + j) * mstride,
            1.0,
            k,
        )
        _comb3(
            tmp,
            (4 + j) * k,
            m,
            mt0 + (4 + j) * mstride,
            m,
            mt0 + (8 + j) * mstride,
            m,
            mt0 + (12 + j) * mstride,
            -1.0,
            k,
        )
    for i in range(ny):
        row = ((n * hout + y0 + dh * i) * wout + x0) * ldo + k0
        r = 4 * i * k
        _finish(of, row, tmp, r, tmp, r + k, tmp, r + 2 * k, 1.0, bias, k0, relu, acc, k)
        if nx == 2:
            at = row + dw * ldo
            _finish(
                of, at, tmp, r + k, tmp, r + 2 * k, tmp, r + 3 * k, -1.0, bias, k0, relu, acc, k
            )


@njit(parallel=True, cache=True)
def conv3x3(
    x,
    blocks,
    table,
    bias,
    out,
    ty0,
    tyn,
    tx0,
    txn,
    dh,
    dw,
    top,
    left,
    v,
    m,
    patch,
    group,
    relu,
    counter,
    acc,
    splits,
):
    """Fill out (N, Hout, Wout, K) with conv(x) for a 3x3 stride-1 window of dilation (dh, dw).

    out's pixels may be further apart than K (a channel slice of a wider NHWC buffer); with
    acc the conv is added to what out holds (a residual) before the ReLU.

    blocks (16, ...) and table are the transformed filters (pack_filters); per thread t the
    workspaces are v[t] (16, T*C + SKEW), m[t] (16, T*K + SKEW), patch[t] (2, 16, max(C, K));
    groups of `group` <= T tiles. Work is handed out as (group, column part) pairs, the parts
    being the filter blocks splits[j] <= b < splits[j + 1] (as in _conv.conv_im2col_mk): a
    thread transforms a group's input tiles once for all the parts it takes in a row.
    """
    n_img, h, w, c = x.shape
    hout, wout, k = out.shape[1], out.shape[2], out.shape[3]
    ldo = out.strides[2] // 4
    xf, of, biasp = _data(x), _data(out), _data(bias)
    nty, ntx = ty0.shape[0], tx0.shape[0]
    per_image = nty * ntx
    total = n_img * per_image
    ngroups = (total + group - 1) // group
    zero = np.zeros(k, np.float32)
    parts = splits.shape[0] - 1
    nthreads = v.shape[0]
    for th in prange(nthreads):
        vt, mt = v[th], m[th]  # (16, T*C + SKEW), (16, T*K + SKEW)
        vf, mf = _data(vt), _data(mt)
        pin, ptmp = _data(patch[th, 0]), _data(patch[th, 1])
        have = -1
        q = claim(counter)  # items go to whichever thread is free (counter zero on entry)
        while q < ngroups * parts:
            g, j = q // parts, q % parts
            b0, b1 = splits[j], splits[j + 1]
            k0 = table[b0, 2]
            k1 = min(k, table[b1 - 1, 2] + table[b1 - 1, 1])
            g0 = g * group
            count = min(group, total - g0)
            for t in range(count if g != have else 0):
                n, rem = divmod(g0 + t, per_image)
                a, b = divmod(rem, ntx)
                _input_tile(
                    xf,
                    h,
                    w,
                    c,
                    pin,
                    ptmp,
                    vf,
                    t * c,
                    vt.shape[1],
                    n,
                    ty0[a] - top,
                    tx0[b] - left,
                    dh,
                    dw,
                )
            for xi in range(16):
                # whole planes: the micro-kernel may read (never store) rows past count
                a_xi = vt[xi, : TILES * c].reshape((TILES, c))
                m_xi = mt[xi, : TILES * k].reshape((TILES, k))
                tile_gemm(a_xi, 0, count, blocks[xi], table, zero, m_xi, 0, False, False, b0, b1)
            have = g
            for t in range(count):
                n, rem = divmod(g0 + t, per_image)
                a, b = divmod(rem, ntx)
                _output_tile(
                    mf,
                    t * k + k0,
                    mt.shape[1],
                    ptmp,
                    biasp,
                    k0,
                    k1 - k0,
                    of,
                    ldo,
                    hout,
                    wout,
                    n,
                    ty0[a],
                    tx0[b],
                    tyn[a],
                    txn[b],
                    dh,
                    dw,
                    relu,
                    acc,
                )
            q = claim(counter)
