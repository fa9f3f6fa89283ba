"""Kernels for grouped convs of many groups with few filters each (ResNeXt's 32 groups of 4).

A GEMM per group would be 4 or 8 columns wide: most of a micro-kernel block's lanes wasted, and
a launch, an input copy and an output copy per group. These kernels vectorise across groups
instead: every lane is a different group doing the same multiply-add, all of them useful.

grouped_tiled (kernels grouped-avx512 and grouped-avx2): the input is copied once, regrouped in
blocks of L groups and zero-padded (regroup), so that channel ci of L consecutive groups is one
contiguous vector and every window lies inside; each register tile then holds the sums of
P adjacent output pixels x KGp filters x L groups (TILES) over every tap and channel, and stores
them transposed into NHWC. A block's input and weights are contiguous: with whole rows of all
groups interleaved, a tile used a quarter of each cache line and the weights fell out of L1.

grouped_direct (grouped-direct: any filter count and output width): one output pixel at a time,
sums in memory; xp (N, H, W, CG, G) is x with channels regrouped (xp[..., ci, g] =
x[..., g*CG + ci]), wp (FH, FW, CG, KG, G) holds filter g*KG + kj's tap (fy, fx) for channel ci
at wp[fy, fx, ci, kj, g], bp (KG, G) the bias likewise; out (N, Hout, Wout, K = G*KG).
"""

from __future__ import annotations

import types as pytypes

import numpy as np
from numba import njit, prange

from ._gemm import _data, _stack_block, own_name


@njit(cache=True, inline="always")
def _fma(acc, a0, x, x0, w, w0, count):
    """acc[a0:a0+count] += x[x0:] * w[w0:] on flat arrays (unsigned indices: it vectorises)."""
    for g in range(count):
        acc[np.uintp(a0 + g)] += x[np.uintp(x0 + g)] * w[np.uintp(w0 + g)]


@njit(parallel=True, cache=True)
def grouped_direct(xp, wp, bp, out, sh, sw, dh, dw, top, left, relu):
    """Fill out with the grouped conv of xp (see the module docstring), + bias, ReLU if relu.

    Each output row (n, y) is one task; each pixel's KG x G sums start at the bias, take every
    tap whose input pixel is inside the image (pads contribute nothing), and are stored
    transposed (filter g*KG + kj) with the ReLU.
    """
    n_img, h, w, cg, ng = xp.shape
    fh, fw, kg = wp.shape[0], wp.shape[1], wp.shape[3]
    hout, wout = out.shape[1], out.shape[2]
    xf = xp.reshape(xp.size)
    wf = wp.reshape(wp.size)
    bf = bp.reshape(bp.size)
    pixel = cg * ng
    tap = cg * kg * ng
    for task in prange(n_img * hout):
        n = task // hout
        y = task - n * hout
        acc = np.empty(kg * ng, np.float32)
        for xo in range(wout):
            for j in range(kg * ng):
                acc[j] = bf[j]
            for fy in range(fh):
                iy = y * sh - top + fy * dh
                if iy < 0 or iy >= h:
                    continue
                for fx in range(fw):
                    ix = xo * sw - left + fx * dw
                    if ix < 0 or ix >= w:
                        continue
                    x0 = ((n * h + iy) * w + ix) * pixel
                    w0 = (fy * fw + fx) * tap
                    for ci in range(cg):
                        for kj in range(kg):
                            _fma(acc, kj * ng, xf, x0 + ci * ng, wf, w0 + (ci * kg + kj) * ng, ng)
            o = out[n, y, xo]
            for g in range(ng):
                for kj in range(kg):
                    v = acc[kj * ng + g]
                    if relu and v < 0.0:
                        v = np.float32(0.0)
                    o[g * kg + kj] = v


# Register tiles of the tiled kernel: (P output pixels, KG filters per group, L groups) sums,
# P*KG vectors of L lanes, by vector family (L = 16 lanes for 512-bit, 8 for 256-bit registers)
# and filters per group (KG padded up to 2, 4 or 8).
TILES = {
    ("avx512", 2): (6, 16),
    ("avx512", 4): (6, 16),
    ("avx512", 8): (3, 16),
    ("avx2", 2): (6, 8),
    ("avx2", 4): (3, 8),
    ("avx2", 8): (1, 8),
}


def _make_tile(pixels: int, kg: int, lanes: int):
    """Build the kernel for one tile: `pixels` adjacent output pixels x kg filters x lanes
    groups, constants baked in so its loops unroll and the sums live in registers."""
    size = pixels * kg * lanes
    xsz, wsz = pixels * lanes, kg * lanes

    def tile(xf, x0, ps, toff, taps, cg, wf, w0, bf, b0, g0, of, o0, ops, ng, kr, relu):
        """Sum `taps` taps (input offsets toff[t]) of cg channels from x0 (pixel p at x0 +
        p*ps) with the weights from w0 and bias from b0 of one block of `lanes` groups, the
        first g0; store groups < ng, filters < kr at of[o0 + ...]."""
        acc = _stack_block(size)
        for p in range(pixels):
            for kj in range(kg):
                for lane in range(lanes):
                    acc[(p * kg + kj) * lanes + lane] = bf[b0 + kj * lanes + lane]
        xs = _stack_block(xsz)
        ws = _stack_block(wsz)
        tap_size = cg * kg * lanes
        for t in range(taps):
            xa = x0 + toff[t]
            wa = w0 + t * tap_size
            for ci in range(cg):
                # Operands first, then the products lane loop outermost: the one order in
                # which LLVM vectorised every tile shape (AVX2 build; the others left some
                # scalar, as engine._gemm found for its blocks).
                for p in range(pixels):
                    for lane in range(lanes):
                        xs[p * lanes + lane] = xf[xa + ci * lanes + p * ps + lane]
                for kj in range(kg):
                    for lane in range(lanes):
                        ws[kj * lanes + lane] = wf[wa + (ci * kg + kj) * lanes + lane]
                for lane in range(lanes):
                    for p in range(pixels):
                        for kj in range(kg):
                            acc[(p * kg + kj) * lanes + lane] += (
                                xs[p * lanes + lane] * ws[kj * lanes + lane]
                            )
        for p in range(pixels):
            for lane in range(lanes):
                g = g0 + lane
                if g < ng:
                    for kj in range(kg):
                        if kj < kr:
                            v = acc[(p * kg + kj) * lanes + lane]
                            if relu and v < 0.0:
                                v = np.float32(0.0)
                            of[o0 + p * ops + g * kr + kj] = v

    return njit(fastmath={"contract"}, cache=True)(own_name(tile, f"tile_{pixels}x{kg}x{lanes}"))


def tile(family: str, kg: int) -> tuple[int, int, int] | None:
    """Return (KGp, P pixels, L lanes) of family's tile for kg filters per group (KG padded up
    to 2, 4 or 8), None when kg is more than any tile holds."""
    kgp = next((f for f in (2, 4, 8) if kg <= f), None)
    return None if kgp is None else (kgp, *TILES[(family, kgp)])


@njit(parallel=True, cache=True)
def regroup(x, xpad, top, left, ng):
    """Fill xpad (N, B, Hp, Wp, CG, L) with x (N, H, W, ng*CG) regrouped in blocks of L groups
    (xpad[n, b, r, c, ci, l] = x[n, r - top, c - left, (b*L + l)*CG + ci]); zeros around the
    image and in groups >= ng."""
    n_img, blocks, hp, wpd, cg, lanes = xpad.shape
    h, w, c_in = x.shape[1], x.shape[2], x.shape[3]
    pixel = cg * lanes
    plane = hp * wpd * pixel  # one block of one image
    full = ng == blocks * lanes
    xf, df = _data(x), _data(xpad)
    for task in prange(n_img * hp):
        n = task // hp
        r = task - n * hp
        iy = r - top
        for b in range(blocks):
            d0 = (n * blocks + b) * plane + r * wpd * pixel
            if iy < 0 or iy >= h:
                for i in range(wpd * pixel):
                    df[d0 + i] = 0.0
                continue
            for c in range(wpd):
                ix = c - left
                d = d0 + c * pixel
                if ix < 0 or ix >= w:
                    for i in range(pixel):
                        df[d + i] = 0.0
                    continue
                src = ((n * h + iy) * w + ix) * c_in + b * lanes * cg
                if full:
                    for lane in range(lanes):
                        for ci in range(cg):
                            df[d + ci * lanes + lane] = xf[src + lane * cg + ci]
                else:
                    for lane in range(lanes):
                        ok = b * lanes + lane < ng
                        for ci in range(cg):
                            df[d + ci * lanes + lane] = xf[src + lane * cg + ci] if ok else 0.0


def _make_driver(pixels: int, kg: int, lanes: int, tile):
    """Build grouped_tiled for one tile shape (tile: its _make_tile kernel).

    One parallel function per shape, compiled when first used: with all six tiles in one, it
    took ~35 s to compile, one ~4 s. The function reaches its tile as the global _tile_kernel of
    a globals dict of its own, not through the closure: Numba keys cache entries by the
    closure's contents, and a compiled function pickles differently in every process (every
    load missed). The closure's three ints differ between shapes, so their entries do too.
    """

    def grouped_tiled(xpad, wp, bp, toff, out, sh, sw, ng, relu):
        """Fill out (N, Hout, Wout, ng*KG; channels contiguous) with the grouped conv of xpad.

        xpad (N, B, Hp, Wp, CG, L): the input as regroup leaves it, padded so every window is
        inside; wp (B, taps, CG, KGp, L) and bp (B, KGp, L): weights and bias by block of L =
        lanes groups, filters and groups zero-padded to the tile's KGp and B*L; toff[t]: tap
        t's offset in a block's xpad from a window's corner. A block's operands are
        contiguous: with whole rows of all groups, a tile read a quarter of each cache line
        and L1 thrashed. Each task is one output row of one block of groups; a row's last tile
        is moved back to end at Wout (its pixels recomputed, bit-identically).
        """
        n_img, blocks, hp, wpd, cg, _ = xpad.shape
        hout, wout = out.shape[1], out.shape[2]
        kr = out.shape[3] // ng
        on, oy, ox = out.strides[0] // 4, out.strides[1] // 4, out.strides[2] // 4
        col = cg * lanes
        tiles = -(-wout // pixels)
        taps = toff.shape[0]
        xf, wf, bf, of, tf = _data(xpad), _data(wp), _data(bp), _data(out), _data(toff)
        for task in prange(n_img * hout * blocks):
            rest = task // blocks
            b = task - rest * blocks
            n = rest // hout
            y = rest - n * hout
            w0, b0 = b * taps * cg * kg * lanes, b * kg * lanes
            for t in range(tiles):
                xo = min(t * pixels, wout - pixels)
                x0 = (((n * blocks + b) * hp + y * sh) * wpd + xo * sw) * col
                o0 = n * on + y * oy + xo * ox
                _tile_kernel(  # noqa: F821 - this function's own global (see above)
                    xf, x0, sw * col, tf, taps, cg, wf, w0, bf, b0, b * lanes, of, o0, ox, ng, kr,
                    relu,
                )  # fmt: skip

    code = grouped_tiled
    own = {**globals(), "_tile_kernel": tile}
    fn = pytypes.FunctionType(code.__code__, own, code.__name__, None, code.__closure__)
    fn.__doc__ = code.__doc__
    return njit(parallel=True, cache=True)(own_name(fn, f"grouped_tiled_{pixels}x{kg}x{lanes}"))


# The tiled kernel by (family, KGp): grouped_tiled[(family, KGp)](xpad, wp, bp, toff, out, sh,
# sw, ng, relu).
grouped_tiled = {
    (family, kg): _make_driver(pixels, kg, lanes, _make_tile(pixels, kg, lanes))
    for (family, kg), (pixels, lanes) in TILES.items()
}
