"""engine.lean_ops: each Numba kernel against its numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import lean_ops

EDGES = np.array(
    [
        0.0,
        -0.0,
        1.0,
        65504.0,  # the largest half
        65519.99,  # rounds down to it
        65520.0,  # the tie past it: infinity
        -70000.0,
        2.0**-14,  # the smallest normal half
        2.0**-14 * (1 - 2.0**-12),  # rounds up into the normals
        2.0**-24,  # the smallest subnormal half
        2.0**-25,  # the tie to zero (even)
        2.0**-25 * 1.0000001,  # just past the tie: rounds up to 2**-24
        3 * 2.0**-25,  # a tie between subnormals 1 and 2: to 2 (even)
        1 + 2.0**-11,  # a tie between normals: to even (1.0)
        1 + 3 * 2.0**-11,  # a tie: to even (1 + 2**-9)
        1e-45,  # a float32 subnormal
        np.inf,
        -np.inf,
    ],
    np.float32,
)


def test_float16_is_numpys_rounding_bit_for_bit():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 2_000_000, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([bits.view(np.float32), EDGES, -EDGES]).reshape(1, 1, -1, 1)
    got, want = lean_ops.to_float16(x), lean_ops.to_float16_reference(x)
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(got.view(np.uint16)[finite], want.view(np.uint16)[finite])
    assert np.isnan(got[~finite]).all() and (~finite).sum() > 1000  # NaN stays NaN
    assert got.dtype == np.float16 and got.shape == x.shape


def test_float16_of_every_half_value_and_the_midpoints_between_them():
    halves = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    mids = (halves[:-1].astype(np.float64) + halves[1:]) / 2  # exact in float32: the ties
    x = np.concatenate([halves, mids.astype(np.float32)]).reshape(1, 1, -1, 1)
    got, want = lean_ops.to_float16(x), lean_ops.to_float16_reference(x)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def maps(n, h, w, k, seed=0, zeros=0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h, w, k)).astype(np.float32) * 5 + 2
    x[rng.random(x.shape) < zeros] = 0
    return x


@given(
    n=st.integers(1, 3),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    k=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_stats_and_uint8_match_their_references_on_any_shape(n, h, w, k, seed):
    x = maps(n, h, w, k, seed)
    got, want = lean_ops.channel_stats(x), lean_ops.channel_stats_reference(x)
    np.testing.assert_array_equal(got[..., [0, 1, 4]], want[..., [0, 1, 4]])
    np.testing.assert_allclose(got[..., 2:4], want[..., 2:4], rtol=1e-6, atol=1e-6)
    for fast, slow in zip(
        lean_ops.quantize_uint8(x), lean_ops.quantize_uint8_reference(x), strict=True
    ):
        np.testing.assert_array_equal(fast, slow)


def test_stats_on_big_maps_and_a_large_mean():
    x = maps(4, 27, 27, 96, seed=3)
    x[..., 5] += 1e4  # std of a channel far from zero: two passes keep its digits
    got, want = lean_ops.channel_stats(x), lean_ops.channel_stats_reference(x)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_nan_makes_its_channels_stats_nan_as_numpy_does():
    x = maps(2, 3, 3, 2)
    x[1, 0, 0, 1] = np.nan
    got, want = lean_ops.channel_stats(x), lean_ops.channel_stats_reference(x)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got[1, 1, :4]).all() and not np.isnan(got[0]).any()
    np.testing.assert_array_equal(got[1, 1, 4], want[1, 1, 4])


@pytest.mark.parametrize("value", [0.0, -3.5])
def test_uint8_of_a_constant_map_is_zero_with_scale_zero(value):
    q, scale, offset = lean_ops.quantize_uint8(np.full((1, 2, 2, 1), value, np.float32))
    assert not q.any() and scale[0, 0] == 0 and offset[0, 0] == value
