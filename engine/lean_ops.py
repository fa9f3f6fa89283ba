"""Shrink activation maps for storage: float16, per-channel stats, uint8 quantisation.

maps is (N, H, W, K) float32. Each fast function matches its *_reference (numpy) beside it:
to_float16 bit for bit, quantize_uint8 exactly, channel_stats to float64 rounding
(tests/unit/test_lean_ops.py). They exist because numpy's float16 cast runs ~14 ns a value and
std over two axes makes float64 temporaries: on the 32-image pool1 maps (2.2 M values) 32 ms and
22 ms against a few ms here (bench/service.py table 1b).
"""

from __future__ import annotations

import numpy as np

from . import _cache, _threads

with _cache.versioned():
    from . import _reduce

STATS = ("min", "max", "mean", "std", "zeros")


def _flat(maps: np.ndarray) -> np.ndarray:
    n, h, w, k = maps.shape
    return np.ascontiguousarray(maps, dtype=np.float32).reshape(n, h * w, k)


def to_float16(maps: np.ndarray) -> np.ndarray:
    """Return maps as float16 (round to nearest even, overflow to inf); as astype(float16)."""
    x = np.ascontiguousarray(maps, dtype=np.float32)
    out = np.empty(x.shape, np.float16)
    if x.size:
        _threads.enter(x.size)
        _reduce.half_bits(x.reshape(-1).view(np.uint32), out.reshape(-1).view(np.uint16))
    return out


def to_float16_reference(maps: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # past 65504 is infinity, as documented
        return np.asarray(maps, np.float32).astype(np.float16)


def channel_stats(maps: np.ndarray) -> np.ndarray:
    """Return (N, K, 5) float32: each image's per-channel min, max, mean, std, zero fraction."""
    x = _flat(maps)
    out = np.empty((x.shape[0], x.shape[2], len(STATS)), np.float64)
    if x.size:
        _threads.enter(x.size)
        _reduce.channel_stats(x, out)
    return out.astype(np.float32)


def channel_stats_reference(maps: np.ndarray) -> np.ndarray:
    axes = (1, 2)
    out = np.empty((maps.shape[0], maps.shape[3], len(STATS)), np.float32)
    out[..., 0] = maps.min(axis=axes)
    out[..., 1] = maps.max(axis=axes)
    out[..., 2] = maps.mean(axis=axes, dtype=np.float64)
    out[..., 3] = maps.std(axis=axes, dtype=np.float64)
    out[..., 4] = np.count_nonzero(maps == 0, axis=axes) / (maps.shape[1] * maps.shape[2])
    return out


def _range(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (offset = min, scale = (max - min) / 255 as float32, 1 / scale in float64 or 0)."""
    lo = maps.min(axis=(1, 2))
    scale = ((maps.max(axis=(1, 2)).astype(np.float64) - lo) / 255).astype(np.float32)
    # float64 with the float32 scale: the stored scale and offset then keep the scale/2 bound
    inverse = np.divide(1.0, scale, out=np.zeros(scale.shape), where=scale > 0)
    return lo.astype(np.float32), scale, inverse


def quantize_uint8(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (q uint8 maps, scale, offset float32 (N, K)): maps ~= scale * q + offset per image
    and channel, within scale / 2. maps must be finite."""
    offset, scale, inverse = _range(maps)
    x = _flat(maps)
    out = np.empty(x.shape, np.uint8)
    if x.size:
        _threads.enter(x.size)
        _reduce.quantize(x, offset, inverse, out)
    return out.reshape(maps.shape), scale, offset


def quantize_uint8_reference(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    offset, scale, inverse = _range(maps)
    shift = offset[:, None, None, :].astype(np.float64)
    q = np.rint((maps - shift) * inverse[:, None, None, :])
    return np.clip(q, 0, 255).astype(np.uint8), scale, offset


def warmup() -> None:
    """Compile, or load from Numba's on-disk cache, each kernel's one signature."""
    x = np.zeros((1, 2, 2, 3), np.float32)
    to_float16(x)
    channel_stats(x)
    quantize_uint8(x)
