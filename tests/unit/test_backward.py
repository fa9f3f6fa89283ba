"""Backward passes against the plain-loop references, finite differences, the transposed conv."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ops import assert_matches, rand

from engine import ShapeError, ops
from engine import backward as bw
from engine import backward_reference as ref
from engine import reference as fwd
from engine.geometry import Window

SWEEP = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (N, H, W, C, K, (FH, FW), stride, pad, dilation)
CONV = {
    "1x1": (2, 5, 4, 3, 6, (1, 1), 1, 0, 1),
    "3x3-same": (2, 7, 7, 4, 5, (3, 3), 1, 1, 1),
    "asymmetric-pads": (1, 7, 6, 3, 4, (3, 2), 1, (1, 0, 2, 1), 1),
    "stride2-remainder": (2, 10, 9, 2, 3, (3, 3), 2, 1, 1),
    "stride3-remainder": (1, 12, 11, 3, 5, (3, 3), 3, (0, 1, 1, 0), 1),
    "dilated": (1, 11, 10, 3, 4, (3, 3), 1, 2, (2, 3)),
    "dilated-strided": (2, 13, 12, 2, 3, (3, 2), (2, 3), (1, 2, 0, 1), 2),
    "nonsquare-big-pad": (1, 5, 8, 2, 3, (1, 3), 1, (2, 0, 2, 3), 1),
    "alexnet-like": (1, 31, 31, 3, 4, (11, 11), 4, 0, 1),
    "winograd": (1, 9, 10, 40, 8, (3, 3), 1, 1, 1),
}


def _conv_case(name, seed=0):
    n, h, w, c, k, size, stride, pad, dilation = CONV[name]
    x = rand(n, h, w, c, seed=seed)
    wt = rand(k, *size, c, seed=seed + 1)
    hout, wout = Window.make(size, stride, pad, dilation).out_hw(h, w)
    dout = rand(n, hout, wout, k, seed=seed + 2)
    return x, wt, dout, stride, pad, dilation


@pytest.mark.parametrize("name", list(CONV))
def test_conv2d_backward_matches_reference(name):
    x, wt, dout, stride, pad, dilation = _conv_case(name)
    got = bw.conv2d_backward(x, wt, dout, stride, pad, dilation)
    want = ref.conv2d_backward_reference(x, wt, dout, stride, pad, dilation)
    for g, r in zip(got, want, strict=True):
        assert_matches(g, r, atol=1e-4)


@pytest.mark.parametrize("name", list(CONV))
@pytest.mark.parametrize("via_conv", [True, False])
def test_both_input_gradient_routes_match_reference(name, via_conv):
    x, wt, dout, stride, pad, dilation = _conv_case(name, seed=5)
    got = bw.conv2d_backward_input(dout, wt, x.shape[1:3], stride, pad, dilation, via_conv)
    want = ref.conv2d_backward_reference(x, wt, dout, stride, pad, dilation)[0]
    assert_matches(got, want, atol=1e-4)


@pytest.mark.parametrize("name", ["stride2-remainder", "dilated-strided", "asymmetric-pads"])
def test_input_gradient_is_the_flipped_filter_convolution(name):
    """dx = (dout dilated by the stride, padded by D(F-1)) conv (flipped, transposed w), cropped."""
    x, wt, dout, stride, pad, dilation = _conv_case(name, seed=9)
    win = Window.make(wt.shape[1:3], stride, pad, dilation)
    n, hout, wout, k = dout.shape
    ph, pw = win.dh * (win.fh - 1), win.dw * (win.fw - 1)
    hp, wp = x.shape[1] + win.top + win.bottom, x.shape[2] + win.left + win.right
    big = np.zeros((n, hp + ph, wp + pw, k), np.float32)
    big[:, ph : ph + hout * win.sh : win.sh, pw : pw + wout * win.sw : win.sw] = dout
    flipped = wt[:, ::-1, ::-1, :].transpose(3, 1, 2, 0)
    dxp = fwd.conv2d_reference(big, flipped, None, 1, 0, (win.dh, win.dw))
    want_dx = dxp[:, win.top : win.top + x.shape[1], win.left : win.left + x.shape[2]]
    assert_matches(bw.conv2d_backward(x, wt, dout, stride, pad, dilation)[0], want_dx, atol=1e-4)


def _objective(out, dout):
    return float(np.sum(out.astype(np.float64) * dout))


@pytest.mark.parametrize("name", ["stride2-remainder", "dilated-strided", "nonsquare-big-pad"])
def test_conv2d_backward_matches_finite_differences(name):
    """The objective sum(dout * conv(x, w)) is linear in x and in w: a unit step is exact."""
    x, wt, dout, stride, pad, dilation = _conv_case(name, seed=3)
    dx, dw, db = bw.conv2d_backward(x, wt, dout, stride, pad, dilation)
    base = _objective(fwd.conv2d_reference(x, wt, None, stride, pad, dilation), dout)
    rng = np.random.default_rng(0)
    for _ in range(6):
        i = tuple(rng.integers(0, s) for s in x.shape)
        xs = x.copy()
        xs[i] += 1.0
        step = _objective(fwd.conv2d_reference(xs, wt, None, stride, pad, dilation), dout) - base
        assert step == pytest.approx(dx[i], rel=1e-3, abs=1e-3)
        j = tuple(rng.integers(0, s) for s in wt.shape)
        ws = wt.copy()
        ws[j] += 1.0
        step = _objective(fwd.conv2d_reference(x, ws, None, stride, pad, dilation), dout) - base
        assert step == pytest.approx(dw[j], rel=1e-3, abs=1e-3)
    ones = np.ones(wt.shape[0], np.float32)
    step = _objective(fwd.conv2d_reference(x, wt, ones, stride, pad, dilation), dout) - base
    assert step == pytest.approx(float(db.sum()), rel=1e-4, abs=1e-3)


@pytest.mark.parametrize(
    "size,stride,pad,dilation",
    [(3, 2, 1, 1), ((2, 3), (1, 2), (0, 1, 1, 0), 1), (3, 1, 2, 2), (2, 2, 0, 1), (5, 3, 2, 1)],
)
def test_max_pool_backward_matches_reference_and_finite_differences(size, stride, pad, dilation):
    x = rand(2, 11, 9, 3, seed=4)
    out, idx = bw.max_pool2d_argmax(x, size, stride, pad, dilation)
    assert_matches(out, ops.max_pool2d(x, size, stride, pad, dilation), 0, 0)
    dout = rand(*out.shape, seed=6)
    dx = bw.max_pool2d_backward(x, dout, size, stride, pad, dilation)
    assert_matches(dx, ref.max_pool2d_backward_reference(x, dout, size, stride, pad, dilation))
    base = _objective(fwd.max_pool2d_reference(x, size, stride, pad, dilation), dout)
    for i in [(0, 3, 4, 1), (1, 10, 8, 2), (0, 0, 0, 0), (1, 5, 2, 0)]:
        xs = x.copy()
        xs[i] += 1e-2  # no ties in random data: a small step keeps each window's winner
        step = _objective(fwd.max_pool2d_reference(xs, size, stride, pad, dilation), dout) - base
        assert step / 1e-2 == pytest.approx(dx[i], rel=1e-2, abs=1e-3)


def test_max_pool_ties_send_the_gradient_to_the_first_maximum():
    x = np.zeros((1, 4, 4, 2), np.float32)
    x[0, 1, 1, 1] = x[0, 1, 0, 1] = 5.0
    dx = bw.max_pool2d_backward(x, np.ones((1, 2, 2, 2), np.float32), 2, 2)
    assert dx[0, 0, 0, 0] == 1.0 and dx[0, :, :, 0].sum() == 4.0  # first of the equal zeros
    assert dx[0, 1, 0, 1] == 1.0 and dx[0, 1, 1, 1] == 0.0


@pytest.mark.parametrize("count_pad", [False, True])
@pytest.mark.parametrize("size,stride,pad", [(3, 2, 1), ((2, 3), (1, 2), (0, 1, 1, 0)), (3, 3, 0)])
def test_avg_pool_backward_matches_reference_and_finite_differences(size, stride, pad, count_pad):
    x = rand(2, 10, 7, 3, seed=2)
    out = ops.avg_pool2d(x, size, stride, pad, count_pad)
    dout = rand(*out.shape, seed=3)
    dx = bw.avg_pool2d_backward(x, dout, size, stride, pad, count_pad)
    assert_matches(dx, ref.avg_pool2d_backward_reference(x, dout, size, stride, pad, count_pad))
    base = _objective(fwd.avg_pool2d_reference(x, size, stride, pad, count_pad), dout)
    for i in [(0, 0, 0, 0), (1, 9, 6, 2), (0, 4, 3, 1)]:
        xs = x.copy()
        xs[i] += 1.0
        step = _objective(fwd.avg_pool2d_reference(xs, size, stride, pad, count_pad), dout) - base
        assert step == pytest.approx(dx[i], rel=1e-3, abs=1e-4)


def test_local2d_backward_matches_reference_and_finite_differences():
    x = rand(2, 8, 7, 3, seed=1)
    w = rand(4, 4, 2, 3, 2, 3, seed=2)  # 4x4 outputs of a (3, 2) window, stride 2, pads 0,1,1,0
    args = (2, (0, 1, 1, 0), 1)
    dout = rand(2, 4, 4, 2, seed=3)
    got = bw.local2d_backward(x, w, dout, *args)
    for g, r in zip(got, ref.local2d_backward_reference(x, w, dout, *args), strict=True):
        assert_matches(g, r)
    assert_matches(bw.local2d_backward_input(dout, w, x.shape[1:3], *args), got[0])
    base = _objective(fwd.local2d_reference(x, w, None, *args), dout)
    xs = x.copy()
    xs[1, 2, 3, 1] += 1.0
    step = _objective(fwd.local2d_reference(xs, w, None, *args), dout) - base
    assert step == pytest.approx(got[0][1, 2, 3, 1], rel=1e-3, abs=1e-4)


def test_relu_backward():
    y = ops.relu(rand(3, 4, 5, 2))
    dout = rand(3, 4, 5, 2, seed=1)
    assert_matches(bw.relu_backward(y, dout), ref.relu_backward_reference(y, dout), 0, 0)
    assert np.all(bw.relu_backward(y, dout)[y == 0] == 0)


def test_wrong_dout_shapes_are_shape_errors():
    x, wt = rand(1, 5, 5, 2), rand(3, 3, 3, 2)
    with pytest.raises(ShapeError, match="dout"):
        bw.conv2d_backward(x, wt, rand(1, 3, 3, 4))
    with pytest.raises(ShapeError, match="dout"):
        bw.max_pool2d_backward(x, rand(1, 3, 3, 2), 2, 2)
    with pytest.raises(ShapeError, match="dout"):
        bw.relu_backward(x, rand(1, 5, 5, 1))
    with pytest.raises(ShapeError):
        bw.conv2d_backward(x, rand(3, 3, 3, 4), rand(1, 3, 3, 3))


@st.composite
def conv_cases(draw):
    fh, fw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    pads = tuple(draw(st.integers(0, 3)) for _ in range(4))
    n, c, k = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 9))
    h = draw(st.integers(max(1, dh * (fh - 1) + 1 - pads[0] - pads[2]), 12))
    w = draw(st.integers(max(1, dw * (fw - 1) + 1 - pads[1] - pads[3]), 12))
    seed = draw(st.integers(0, 2**16))
    win = Window.make([fh, fw], (sh, sw), pads, (dh, dw))
    hout, wout = win.out_hw(h, w)
    x = rand(n, h, w, c, seed=seed)
    return x, rand(k, fh, fw, c, seed=seed + 1), rand(n, hout, wout, k, seed=seed + 2), win


@SWEEP
@given(case=conv_cases(), via_conv=st.booleans())
def test_conv2d_backward_sweep(case, via_conv):
    x, wt, dout, win = case
    args = ((win.sh, win.sw), win.pad, (win.dh, win.dw))
    want = ref.conv2d_backward_reference(x, wt, dout, *args)
    got = bw.conv2d_backward(x, wt, dout, *args)
    for g, r in zip(got, want, strict=True):
        assert_matches(g, r, atol=1e-4)
    dx = bw.conv2d_backward_input(dout, wt, x.shape[1:3], *args, via_conv=via_conv)
    assert_matches(dx, want[0], atol=1e-4)


@SWEEP
@given(case=conv_cases(), count_pad=st.booleans())
def test_pool_backward_sweep(case, count_pad):
    x, wt, _, win = case
    size, stride = (win.fh, win.fw), (win.sh, win.sw)
    dil = (win.dh, win.dw)
    dout = rand(*ops.max_pool2d(x, size, stride, win.pad, dil).shape, seed=7)
    got = bw.max_pool2d_backward(x, dout, size, stride, win.pad, dil)
    assert_matches(got, ref.max_pool2d_backward_reference(x, dout, size, stride, win.pad, dil))
    try:
        out = ops.avg_pool2d(x, size, stride, win.pad, count_pad)
    except ShapeError:  # without dilation the window may no longer fit the same way
        return
    dout = rand(*out.shape, seed=8)
    got = bw.avg_pool2d_backward(x, dout, size, stride, win.pad, count_pad)
    want = ref.avg_pool2d_backward_reference(x, dout, size, stride, win.pad, count_pad)
    assert_matches(got, want)


# (N, H, W, C, K, (FH, FW), stride, pad, dilation, groups)
GROUPED = {
    "g2": (2, 7, 6, 4, 6, (3, 3), 1, 1, 1, 2),
    "depthwise": (1, 8, 9, 5, 5, (3, 3), 1, (1, 0, 2, 1), 1, 5),
    "depthwise-x2-strided": (2, 9, 8, 3, 6, (3, 2), 2, 1, (1, 2), 3),
    "g3-stride3": (1, 11, 10, 6, 9, (3, 3), 3, 0, 1, 3),
}


@pytest.mark.parametrize("name", list(GROUPED))
@pytest.mark.parametrize("via_conv", [None, True, False])
def test_grouped_conv2d_backward_matches_reference(name, via_conv):
    n, h, w, c, k, size, stride, pad, dilation, groups = GROUPED[name]
    x = rand(n, h, w, c, seed=1)
    wt = rand(k, *size, c // groups, seed=2)
    out = ops.conv2d(x, wt, None, stride, pad, dilation, groups=groups)
    dout = rand(*out.shape, seed=3)
    want = ref.conv2d_backward_reference(x, wt, dout, stride, pad, dilation, groups)
    for g, r in zip(
        bw.conv2d_backward(x, wt, dout, stride, pad, dilation, groups), want, strict=True
    ):
        assert_matches(g, r, atol=1e-4)
    dx = bw.conv2d_backward_input(dout, wt, (h, w), stride, pad, dilation, via_conv, groups)
    assert_matches(dx, want[0], atol=1e-4)
