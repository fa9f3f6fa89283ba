"""Grouped and depthwise conv (conv2d groups=) against the reference, PyTorch and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_ops import CONV_PATHS, assert_matches, force_path, rand, restore_path

from engine import ShapeError, kernels, ops
from engine import reference as ref

# (N, H, W, C, K, groups, (FH, FW), stride, (top, left, bottom, right), dilation)
GROUPED = {
    "alexnet-conv2-like": (1, 13, 13, 8, 12, 2, (5, 5), 1, (2, 2, 2, 2), 1),
    "3x3-winograd-groups": (2, 10, 9, 64, 64, 2, (3, 3), 1, (1, 1, 1, 1), 1),
    "1x1-pointwise-groups": (2, 7, 9, 12, 18, 3, (1, 1), 1, (0, 0, 0, 0), 1),
    "stride3-remainder": (1, 17, 16, 6, 9, 3, (3, 3), 3, (1, 0, 0, 1), 1),
    "dilated-asymmetric": (2, 12, 14, 4, 8, 2, (3, 2), (2, 1), (0, 2, 1, 0), (2, 3)),
    "depthwise-3x3": (2, 9, 10, 7, 7, 7, (3, 3), 1, (1, 1, 1, 1), 1),
    "depthwise-stride2-odd": (1, 15, 11, 16, 16, 16, (3, 3), 2, (1, 1, 1, 1), 1),
    "depthwise-multiplier3": (2, 8, 9, 5, 15, 5, (3, 3), 1, (0, 1, 2, 0), 1),
    "depthwise-5x5-dilated": (1, 14, 13, 6, 6, 6, (5, 5), (1, 2), (2, 3, 4, 1), (2, 1)),
    "depthwise-pad-wider-than-image": (1, 2, 3, 3, 6, 3, (3, 3), 2, (2, 3, 2, 3), 1),
    # few filters per group, many groups: the grouped kernels (engine._grouped_kernel)
    "resnext-32-groups-of-4": (2, 7, 8, 128, 128, 32, (3, 3), 1, (1, 1, 1, 1), 1),
    "grouped-stride2-dilated": (1, 9, 11, 64, 32, 16, (3, 3), 2, (0, 1, 2, 1), (2, 1)),
    "grouped-17-groups-odd-lanes": (2, 5, 6, 34, 51, 17, (2, 3), 1, (1, 0, 0, 2), 1),
    "grouped-wide-row-last-tile-moved": (1, 4, 23, 96, 96, 32, (3, 3), 1, (1, 1, 1, 1), 1),
    "grouped-3-filters-20-groups": (1, 6, 13, 60, 60, 20, (3, 3), 1, (1, 1, 1, 1), 1),
    "grouped-8-filters-of-4-channels": (2, 5, 9, 64, 128, 16, (3, 3), 1, (1, 1, 1, 1), 1),
}


def case_arrays(case, seed=0):
    n, h, w, c, k, g, size, stride, pad, dilation = case
    x = rand(n, h, w, c, seed=seed)
    wt = rand(k, *size, c // g, seed=seed + 1)
    b = rand(k, seed=seed + 2)
    return x, wt, b, dict(stride=stride, pad=pad, dilation=dilation, groups=g)


@pytest.mark.parametrize("path", list(CONV_PATHS))
@pytest.mark.parametrize("case", GROUPED.values(), ids=GROUPED.keys())
def test_grouped_conv_matches_reference(path, case):
    x, wt, b, kw = case_arrays(case, seed=3)
    before = force_path(path)
    try:
        got = ops.conv2d(x, wt, b, relu=True, **kw)
    finally:
        restore_path(before)
    assert_matches(got, ref.conv2d_reference(x, wt, b, relu=True, **kw))


@pytest.mark.parametrize("case", GROUPED.values(), ids=GROUPED.keys())
def test_groups_equal_separate_convs_on_channel_slices(case):
    # The definition, built from ungrouped convs: group g is conv(x[..., C_g], w[K_g]).
    x, wt, b, kw = case_arrays(case, seed=5)
    g = kw.pop("groups")
    cg, kg = x.shape[3] // g, wt.shape[0] // g
    parts = [
        ops.conv2d(
            x[..., i * cg : (i + 1) * cg], wt[i * kg : (i + 1) * kg], b[i * kg : (i + 1) * kg], **kw
        )
        for i in range(g)
    ]
    got = ops.conv2d(x, wt, b, groups=g, **kw)
    assert_matches(got, np.concatenate(parts, axis=3))


def test_depthwise_matches_float64_reference_closely():
    # The direct kernel sums 9 taps in float32; against a float64 sum it is within a few ulps.
    x, wt, b, kw = case_arrays(GROUPED["depthwise-3x3"], seed=9)
    want = ref.conv2d_reference(x.astype(np.float64), wt.astype(np.float64), b, **kw)
    assert_matches(ops.conv2d(x, wt, b, **kw), want, rtol=1e-5, atol=1e-6)


def test_conv_weights_carry_groups_and_bias():
    x, wt, b, kw = case_arrays(GROUPED["alexnet-conv2-like"], seed=11)
    cw = ops.ConvWeights(wt, b, groups=kw.pop("groups"))
    got = ops.conv2d(x, cw, **kw)
    assert_matches(got, ref.conv2d_reference(x, wt, b, groups=2, **kw))
    assert cw.nbytes > 0 and len(cw.group_parts()) == 2
    # a bias given to conv2d wins over the one the ConvWeights hold
    zero = np.zeros_like(b)
    assert_matches(ops.conv2d(x, cw, zero, **kw), ref.conv2d_reference(x, wt, None, groups=2, **kw))


def test_depthwise_taps_made_once():
    x, wt, b, kw = case_arrays(GROUPED["depthwise-3x3"], seed=13)
    cw = ops.ConvWeights(wt, groups=kw.pop("groups"))
    first = ops.conv2d(x, cw, b, **kw)
    taps = cw.depthwise_taps()
    np.testing.assert_array_equal(ops.conv2d(x, cw, b, **kw), first)
    assert cw.depthwise_taps() is taps and taps.shape == (3, 3, 1, 7)


def test_grouped_result_does_not_depend_on_batch():
    x, wt, b, kw = case_arrays(GROUPED["depthwise-multiplier3"], seed=15)
    whole = ops.conv2d(x, wt, b, **kw)
    np.testing.assert_array_equal(ops.conv2d(x[1:], wt, b, **kw), whole[1:])
    x, wt, b, kw = case_arrays(GROUPED["alexnet-conv2-like"], seed=15)
    x = np.concatenate([x, rand(*x.shape, seed=16)])
    whole = ops.conv2d(x, wt, b, **kw)
    np.testing.assert_array_equal(ops.conv2d(x[1:], wt, b, **kw), whole[1:])


@pytest.mark.parametrize(
    "c,k,groups,wc,match",
    [
        (6, 8, 3, 2, "must divide the filter count K=8"),  # K not divisible
        (6, 8, 4, 1, "6 channels but w expects"),  # groups=4 does not divide C=6
        (6, 6, 2, 2, "6 channels but w expects"),  # w's last axis is not C/groups
        (6, 6, 0, 6, "int >= 1"),
        (6, 6, True, 6, "int >= 1"),
        (6, 6, 1.5, 4, "int >= 1"),
    ],
)
def test_bad_groups_raise_shape_error(c, k, groups, wc, match):
    with pytest.raises(ShapeError, match=match) as info:
        ops.conv2d(rand(1, 5, 5, c), rand(k, 3, 3, wc), groups=groups)
    assert info.value.field == "groups"


def test_conv_weights_groups_conflict_raises():
    cw = ops.ConvWeights(rand(4, 3, 3, 2), groups=2)
    with pytest.raises(ShapeError, match="made with groups=2"):
        ops.conv2d(rand(1, 5, 5, 4), cw, groups=4)


def test_reference_groups_one_is_plain_conv():
    x, wt, b = rand(1, 6, 7, 4, seed=17), rand(5, 3, 3, 4, seed=18), rand(5, seed=19)
    np.testing.assert_array_equal(
        ref.conv2d_reference(x, wt, b, pad=1, groups=1), ref.conv2d_reference(x, wt, b, pad=1)
    )


@st.composite
def grouped_cases(draw):
    """Draw groups, channels per group, a multiplier, a window and an input it fits."""
    g = draw(st.integers(1, 5))
    cg = draw(st.sampled_from([1, 1, 2, 3]))  # depthwise half the time
    kg = draw(st.integers(1, 3)) if cg == 1 else draw(st.integers(1, 9))
    fh, fw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    pad = tuple(draw(st.integers(0, 2)) for _ in range(4))
    h = draw(st.integers(max(1, dh * (fh - 1) + 1 - pad[0] - pad[2]), 12))
    w = draw(st.integers(max(1, dw * (fw - 1) + 1 - pad[1] - pad[3]), 14))
    n = draw(st.integers(1, 2))
    return (n, h, w, g * cg, g * kg, g, (fh, fw), (sh, sw), pad, (dh, dw))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=grouped_cases(), seed=st.integers(0, 2**16), relu=st.booleans())
def test_grouped_conv_sweep(case, seed, relu):
    x, wt, b, kw = case_arrays(case, seed=seed)
    got = ops.conv2d(x, wt, b, relu=relu, **kw)
    assert_matches(got, ref.conv2d_reference(x, wt, b, relu=relu, **kw))


@pytest.mark.parametrize("name", ["grouped-avx512", "grouped-avx2", "grouped-direct"])
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(case=grouped_cases(), seed=st.integers(0, 2**16), relu=st.booleans())
def test_grouped_kernel_sweep(name, case, seed, relu):
    # each grouped kernel forced for every drawn case, whatever its groups and filters per
    # group (the tiled ones where their tile fits: at most 8 filters, Wout >= tile pixels)
    x, wt, b, kw = case_arrays(case, seed=seed)
    assume(1 < kw["groups"] < x.shape[3])  # grouped, not depthwise
    before = kernels.GROUPED_MAX_KG, kernels.GROUPED_MIN_GROUPS
    kernels.GROUPED_MAX_KG, kernels.GROUPED_MIN_GROUPS = 10**6, 2
    try:
        with kernels.forced([name, "grouped-direct"]):
            used = ops.conv_kernel(x.shape, wt, **kw)
            got = ops.conv2d(x, wt, b, relu=relu, **kw)
    finally:
        kernels.GROUPED_MAX_KG, kernels.GROUPED_MIN_GROUPS = before
    assert_matches(got, ref.conv2d_reference(x, wt, b, relu=relu, **kw))
    fits = wt.shape[0] // kw["groups"] <= 8 and got.shape[2] >= 6  # tiles are <= 6 pixels
    assert used == name or (not fits and used == "grouped-direct")


def test_grouped_direct_taps_made_once():
    cw = ops.ConvWeights(rand(64, 3, 3, 2, seed=3), groups=32)
    x = rand(1, 5, 5, 64, seed=4)
    first = ops.conv2d(x, cw, pad=1)
    taps = cw.grouped_taps()[0]
    assert cw.nbytes >= taps.nbytes > 0
    np.testing.assert_array_equal(ops.conv2d(x, cw, pad=1), first)
    assert cw.grouped_taps()[0] is taps


torch_cases = pytest.mark.parametrize("case", GROUPED.values(), ids=GROUPED.keys())


@torch_cases
def test_grouped_conv_matches_torch(case):
    torch = pytest.importorskip("torch")
    x, wt, b, kw = case_arrays(case, seed=21)
    top, left, bottom, right = kw["pad"]
    xt = torch.nn.functional.pad(
        torch.from_numpy(x).permute(0, 3, 1, 2), (left, right, top, bottom)
    )
    want = torch.nn.functional.conv2d(
        xt,
        torch.from_numpy(wt).permute(0, 3, 1, 2),
        torch.from_numpy(b),
        stride=kw["stride"],
        dilation=kw["dilation"],
        groups=kw["groups"],
    )
    got = ops.conv2d(x, wt, b, **kw)
    assert_matches(got, want.permute(0, 2, 3, 1).contiguous().numpy(), rtol=1e-4, atol=1e-4)
