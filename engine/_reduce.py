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
    even: what numpy's astype(float16) gives, overflow to infinity and NaN kept NaN.

    Every case is computed and the right one selected, without branches, so the loop runs on
    vector registers (a branch per value kept it scalar: ~5 ns a value).
    """
    u32 = np.uint32  # Numba widens uint32 arithmetic to 64 bits; each result is cut back
    for i in prange(bits.size):
        u = u32(bits[i])
        sign = u32((u >> u32(16)) & u32(0x8000))
        a = u32(u & u32(0x7FFFFFFF))
        # 2**-14 and up: a normal half; rebias 127 -> 15, round the 13 dropped bits to even
        v = u32(a - u32(0x38000000))
        odd = u32((v >> u32(13)) & u32(1))
        normal = u32(u32(v + u32(0x0FFF) + odd) >> u32(13))
        # below: a subnormal half (m * 2**-24) or zero; a shift past 24 leaves 0 either way,
        # so it is held at 25 (a shift of 32 or more is undefined)
        shift = u32(min(u32(126) - min(u32(a >> u32(23)), u32(126)), u32(25)))
        m = u32((a & u32(0x7FFFFF)) | u32(0x800000))
        low = u32(m >> shift)
        rem = u32(m & u32(u32(u32(1) << shift) - u32(1)))
        half = u32(u32(1) << u32(shift - u32(1)))
        up = (rem > half) | ((rem == half) & ((low & u32(1)) == u32(1)))
        low = u32(low + u32(1)) if up else low
        # infinity, or NaN with its payload's top bits (at least one set)
        payload = u32(max(u32(u32(a & u32(0x7FFFFF)) >> u32(13)), u32(1)))
        special = u32(u32(0x7C00) + payload) if a > u32(0x7F800000) else u32(0x7C00)
        h = normal if a >= u32(0x38800000) else low
        h = u32(0x7C00) if a >= u32(0x477FF000) else h  # 65520 and up: infinity
        h = special if a >= u32(0x7F800000) else h
        out[i] = np.uint16(sign | h)


@numba.njit(parallel=True, cache=True, nogil=True)
def channel_stats(x, out):  # pragma: no cover - compiled
    """out[n, k] = min, max, mean, std, fraction of zeros of x[n, :, k] (float64 sums; two
    passes, so std does not lose digits to a large mean). A channel with a NaN gets NaN stats
    but its zero fraction. The inner loops run over channels without branches (selects and
    counts), so they run on vector registers."""
    n, p, k = x.shape
    for i in prange(n):
        lo = np.full(k, np.inf, np.float32)
        hi = np.full(k, -np.inf, np.float32)
        total = np.zeros(k)
        zeros = np.zeros(k)
        nans = np.zeros(k)
        for j in range(p):
            for c in range(k):
                v = x[i, j, c]
                lo[c] = min(lo[c], v)  # a NaN is counted below; min/max then do not matter
                hi[c] = max(hi[c], v)
                total[c] += v
                zeros[c] += 1.0 if v == 0 else 0.0
                nans[c] += 1.0 if v != v else 0.0
        mean = total / p
        squares = np.zeros(k)
        for j in range(p):
            for c in range(k):
                d = x[i, j, c] - mean[c]
                squares[c] += d * d
        for c in range(k):
            if nans[c] > 0:
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
