"""Numba kernels of engine.lean_ops: float16 rounding, per-channel stats and uint8 quantisation.

x is (N, P, K) float32: N images, P = H*W positions, K channels (C-contiguous NHWC maps).
Each kernel runs in parallel over images; its reference is in engine.lean_ops.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange


@numba.njit(parallel=True, cache=True, nogil=True)
def half_bits(bits, out):  # pragma: no cover - compiled
    """Write the IEEE binary16 bits of each float32 (given as uint32 bits), rounded to nearest
    even: what numpy's astype(float16) gives, overflow to infinity and NaN kept NaN."""
    for i in prange(bits.size):
        u = np.uint32(bits[i])
        sign = np.uint32((u >> np.uint32(16)) & np.uint32(0x8000))
        a = u & np.uint32(0x7FFFFFFF)
        if a >= np.uint32(0x7F800000):  # infinity or NaN (the payload's top bits kept)
            h = np.uint32(0x7C00)
            if a > np.uint32(0x7F800000):
                m = (a & np.uint32(0x7FFFFF)) >> np.uint32(13)
                h = np.uint32(0x7C00) + (m if m > 0 else np.uint32(1))
        elif a >= np.uint32(0x477FF000):  # 65520 and up round past 65504: infinity
            h = np.uint32(0x7C00)
        elif a >= np.uint32(0x38800000):  # 2**-14 and up: a normal half; rebias 127 -> 15
            v = a - np.uint32(0x38000000)
            h = (v + np.uint32(0x0FFF) + ((v >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
        else:  # a subnormal half (m * 2**-24) or zero
            e = a >> np.uint32(23)
            shift = np.uint32(126) - e
            if shift > np.uint32(24):
                h = np.uint32(0)
            else:
                m = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
                h = m >> shift
                rem = m & ((np.uint32(1) << shift) - np.uint32(1))
                half = np.uint32(1) << (shift - np.uint32(1))
                if rem > half or (rem == half and (h & np.uint32(1))):
                    h += np.uint32(1)
        out[i] = np.uint16(sign | h)


@numba.njit(parallel=True, cache=True, nogil=True)
def channel_stats(x, out):  # pragma: no cover - compiled
    """out[n, k] = min, max, mean, std, fraction of zeros of x[n, :, k] (float64 sums; two
    passes, so std does not lose digits to a large mean). A channel with a NaN gets NaN stats
    but its zero fraction."""
    n, p, k = x.shape
    for i in prange(n):
        lo = np.full(k, np.inf)
        hi = np.full(k, -np.inf)
        total = np.zeros(k)
        zeros = np.zeros(k)
        nans = np.zeros(k, np.bool_)
        for j in range(p):
            for c in range(k):
                v = x[i, j, c]
                if v != v:
                    nans[c] = True
                    continue
                if v < lo[c]:
                    lo[c] = v
                if v > hi[c]:
                    hi[c] = v
                total[c] += v
                if v == 0:
                    zeros[c] += 1
        mean = total / p
        squares = np.zeros(k)
        for j in range(p):
            for c in range(k):
                d = x[i, j, c] - mean[c]
                squares[c] += d * d
        for c in range(k):
            if nans[c]:
                out[i, c, 0] = out[i, c, 1] = out[i, c, 2] = out[i, c, 3] = np.nan
            else:
                out[i, c, 0] = lo[c]
                out[i, c, 1] = hi[c]
                out[i, c, 2] = mean[c]
                out[i, c, 3] = np.sqrt(squares[c] / p)
            out[i, c, 4] = zeros[c] / p


@numba.njit(parallel=True, cache=True, nogil=True)
def quantize(x, lo, inverse, out):  # pragma: no cover - compiled
    """out[n, j, k] = rint((x[n, j, k] - lo[n, k]) * inverse[n, k]) clipped to 0..255, in
    float64 (x finite float32, lo float32, inverse float64)."""
    n, p, k = x.shape
    for i in prange(n):
        for j in range(p):
            for c in range(k):
                q = np.rint((np.float64(x[i, j, c]) - np.float64(lo[i, c])) * inverse[i, c])
                out[i, j, c] = np.uint8(min(max(q, 0.0), 255.0))
