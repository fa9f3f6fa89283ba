"""A Hypothesis sweep of the fast layers against the reference over random geometry."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_ops import CONV_PATHS, assert_matches, force_path, restore_path

from engine import ShapeError, ops
from engine import reference as ref
from engine.geometry import Window

SWEEP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def windows(draw, dilation=True):
    """Draw a window (size, stride, 4 pads, dilation) and an input (N, H, W, C) it fits."""
    fh, fw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = (draw(st.integers(1, 3)), draw(st.integers(1, 3))) if dilation else (1, 1)
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    # at least the dilated window, minus the pads, so the window always fits
    h_min = max(1, dh * (fh - 1) + 1 - pads[0] - pads[2])
    w_min = max(1, dw * (fw - 1) + 1 - pads[1] - pads[3])
    # wide enough, often, for implicit GEMM (8+ outputs per row)
    h, w = draw(st.integers(h_min, h_min + 6)), draw(st.integers(w_min, w_min + 14))
    seed = draw(st.integers(0, 2**16))
    x = np.random.default_rng(seed).standard_normal((n, h, w, c)).astype(np.float32)
    return x, (fh, fw), (sh, sw), pads, (dh, dw), seed


@pytest.mark.parametrize("path", list(CONV_PATHS))
@SWEEP
@given(case=windows(), k=st.integers(1, 70), relu=st.booleans())
def test_conv2d_sweep(path, case, k, relu):
    x, (fh, fw), stride, pad, dilation, seed = case
    rng = np.random.default_rng(seed + 1)
    w = rng.standard_normal((k, fh, fw, x.shape[3])).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    before = force_path(path)
    try:
        got = ops.conv2d(x, w, b, stride=stride, pad=pad, dilation=dilation, relu=relu)
    finally:
        restore_path(before)
    assert_matches(got, ref.conv2d_reference(x, w, b, stride, pad, dilation, relu))


@SWEEP
@given(case=windows(), k=st.integers(1, 5))
def test_local2d_sweep(case, k):
    x, (fh, fw), stride, pad, dilation, seed = case
    hout, wout = Window.make([fh, fw], stride, pad, dilation).out_hw(x.shape[1], x.shape[2])
    rng = np.random.default_rng(seed + 2)
    w = rng.standard_normal((hout, wout, k, fh, fw, x.shape[3])).astype(np.float32)
    b = rng.standard_normal((hout, wout, k)).astype(np.float32)
    got = ops.local2d(x, w, b, stride=stride, pad=pad, dilation=dilation)
    assert_matches(got, ref.local2d_reference(x, w, b, stride, pad, dilation))


@SWEEP
@given(case=windows())
def test_max_pool2d_sweep(case):
    x, size, stride, pad, dilation, _ = case
    assert_matches(
        ops.max_pool2d(x, size, stride, pad, dilation),
        ref.max_pool2d_reference(x, size, stride, pad, dilation),
    )


@SWEEP
@given(case=windows(dilation=False), count_pad=st.booleans())
def test_avg_pool2d_sweep(case, count_pad):
    x, size, stride, pad, _, _ = case
    # a window wholly inside the padding has no cells to average (the reference divides 0 by 0);
    # PyTorch forbids such pads outright
    assume(count_pad or (max(pad[0], pad[2]) < size[0] and max(pad[1], pad[3]) < size[1]))
    assert_matches(
        ops.avg_pool2d(x, size, stride, pad, count_pad),
        ref.avg_pool2d_reference(x, size, stride, pad, count_pad),
    )


@SWEEP
@given(
    h=st.integers(1, 6),
    f=st.integers(1, 9),
    s=st.integers(1, 3),
    p=st.integers(0, 2),
    d=st.integers(1, 3),
)
def test_conv2d_output_size_or_shape_error(h, f, s, p, d):
    """Every geometry either gives PyTorch's floor size or a ShapeError naming `size`."""
    x = np.ones((1, h, h, 1), np.float32)
    w = np.ones((1, f, f, 1), np.float32)
    span = h + 2 * p - d * (f - 1) - 1
    if span < 0:
        with pytest.raises(ShapeError) as info:
            ops.conv2d(x, w, stride=s, pad=p, dilation=d)
        assert info.value.field == "size"
    else:
        assert ops.conv2d(x, w, stride=s, pad=p, dilation=d).shape[1] == span // s + 1
