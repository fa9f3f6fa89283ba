"""A direct kernel for grouped convs with few channels per group (ResNeXt's 32 groups of 4).

Shapes: xp (N, H, W, CG, G) is x (N, H, W, C = G*CG) with its channels regrouped so that channel
ci of every group is contiguous (xp[..., ci, g] = x[..., g*CG + ci]); wp (FH, FW, CG, KG, G) holds
filter g*KG + kj's tap (fy, fx) for its channel ci at wp[fy, fx, ci, kj, g]; bp (KG, G) the bias
likewise; out (N, Hout, Wout, K = G*KG). Per tap each output pixel takes CG*KG multiply-adds of G
contiguous lanes (all useful), where the per-group GEMM pads KG filters to a 48-lane block and
pays a kernel launch, an input copy and an output copy per group.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


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
